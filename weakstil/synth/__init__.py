"""Synthetic H&E cohorts with known per-tile truth (the demo, the tests, the accuracy benchmark).

Four families, written independently of each other so that a recipe chosen on them is not tuned
to one way of drawing tissue:

* ``lattice`` (:mod:`weakstil.synth.lattice`): scenes of smooth compartment fields with nuclei
  stamped on jittered lattices; labels are the exact truth.
* ``cells`` (:mod:`weakstil.synth.cells`, :mod:`weakstil.synth.optics`): cell-level point
  processes per cell type, nests and glands, fat, necrosis, folds and pen marks, per-slide stain
  vectors in optical-density space and scanner effects; labels carry a pathologist's noise.
* ``regions`` (:mod:`weakstil.synth.regions`, moved from a held-out generator): every pixel gets a
  region label (glass, stroma, tumour, fat, necrosis, vessel lumen) from smooth random fields, and cell
  bodies are rasterised per type; a lymphocyte's area is its whole cell body, vessel lumens are not
  stroma; labels carry a pathologist's noise.
* ``voronoi`` (:mod:`weakstil.synth.voronoi`, :mod:`weakstil.synth.voronoi_render`,
  :mod:`weakstil.synth.voronoi_sprites`, moved from a held-out generator): tissue from thresholded
  noise fields, tumour cells and adipocytes as Voronoi tessellations, inflammatory cells on a
  jittered hexagonal lattice thinned by a density field; labels carry a pathologist's noise.

All write ``slides/*.svs`` (Aperio-like, 0.25 and 0.5 µm/px mixed), ``truth/<id>.npz`` (the format
of :mod:`weakstil.synth.truth`) and ``labels.csv`` (``slide_id, patient_id, stil``), in a
``standard`` or a ``hard`` setting (tumour 10-85 % of the tissue, intratumoral lymphocytes, twice
the stain variation); ``cells`` also has ``dark-nuclei`` (the standard slide with a share of the
tumour nuclei hyperchromatic, as dark as lymphocytes).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from weakstil.errors import ConfigError

FAMILIES = ("lattice", "cells", "regions", "voronoi")
SETTINGS = ("standard", "hard", "dark-nuclei")
FAMILY_SETTINGS = {"lattice": ("standard", "hard"), "cells": SETTINGS, "regions": ("standard", "hard"),
                   "voronoi": ("standard", "hard")}
DEFAULT_PREFIX = {"lattice": "SYN", "cells": "CEL", "regions": "REG", "voronoi": "VOR"}


def check_setting(setting: str, family: str | None = None) -> None:
    if setting not in SETTINGS:
        raise ConfigError(f"unknown synthetic setting {setting!r}",
                          fix=f"use one of: {', '.join(SETTINGS)}")
    if family is not None and setting not in FAMILY_SETTINGS[family]:
        raise ConfigError(f"the {family} family has no {setting!r} setting",
                          fix=f"use one of: {', '.join(FAMILY_SETTINGS[family])}, or --family "
                              + " / ".join(f for f, s in FAMILY_SETTINGS.items() if setting in s))


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown synthetic family {family!r}",
                          fix=f"use one of: {', '.join(FAMILIES)}")


def write_cohort(out: str | Path, *, family: str = "lattice", n: int = 40, seed: int = 0,
                 setting: str = "standard", prefix: str | None = None, workers: int | None = None,
                 progress: bool = True, size_um: float | tuple[float, float] | None = None,
                 mpps=(0.25, 0.5)) -> Path:
    """Write a synthetic cohort of ``family`` into ``out`` (slides/, truth/, labels.csv); returns ``out``.

    Deterministic for (family, n, seed, setting, size); resumes (finished slides are kept).
    ``size_um`` is the canvas (width, height) or its width (height 4/5 of it); default 2000 µm.
    """
    check_family(family)
    check_setting(setting, family)
    prefix = prefix or DEFAULT_PREFIX[family]
    if size_um is None:
        size_um = (2000.0, 1600.0)
    elif isinstance(size_um, (int, float)):
        size_um = (float(size_um), 0.8 * float(size_um))
    if family == "lattice":
        from weakstil.synth.lattice import synth_cohort

        return synth_cohort(out, n=n, seed=seed, mpps=mpps, size_um=size_um, workers=workers,
                            progress=progress, prefix=prefix, setting=setting)
    return _write_specs(Path(out), family, n=n, seed=seed, setting=setting, prefix=prefix,
                        workers=workers, progress=progress, size_um=tuple(size_um), mpps=mpps)


def _family_module(family: str):
    """The module of a family written slide by slide (``plan``, ``write_slide``): cells, regions,
    voronoi."""
    from importlib import import_module

    return import_module(f"weakstil.synth.{family}")


def _write_one(family: str, spec, root: Path) -> tuple[str, float]:
    """Write one slide of ``family`` unless the same one is there; returns (slide_id, label)."""
    from weakstil.synth.truth import finished_stil, load_truth

    svs = root / "slides" / f"{spec.slide_id}.svs"
    truth = root / "truth" / f"{spec.slide_id}.npz"
    if finished_stil(truth, svs, repr(spec)) is not None:
        return spec.slide_id, float(load_truth(truth)["label"])
    return spec.slide_id, _family_module(family).write_slide(spec, svs, truth)[1]


def _write_specs(root: Path, family: str, *, n, seed, setting, prefix, workers, progress, size_um,
                 mpps) -> Path:
    """Plan a cohort of ``family`` (cells, regions, voronoi) and write its slides in parallel, keeping the
    finished ones; then labels.csv."""
    from concurrent.futures import ProcessPoolExecutor

    from weakstil.synth.truth import atomic_open

    if n < 1 or not mpps or min(mpps) <= 0 or min(size_um) < 64:
        raise ConfigError(f"cannot plan a cohort of n={n}, mpps={mpps}, size_um={size_um}",
                          fix="use n >= 1, positive mpps (e.g. 0.25 0.5) and sizes of at least 64 µm")
    specs = _family_module(family).plan(n, seed, setting=setting, mpps=mpps, size_um=size_um,
                                        prefix=prefix)
    for sub in ("slides", "truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    labels = {}
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            done = pool.map(_write_one, [family] * len(specs), specs, [root] * len(specs))
            labels.update(_tick(done, len(specs), progress))
    else:
        labels.update(_tick((_write_one(family, s, root) for s in specs), len(specs), progress))
    with atomic_open(root / "labels.csv", "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "patient_id", "stil"])
        writer.writerows([s.slide_id, s.patient_id, f"{labels[s.slide_id]:g}"] for s in specs)
    return root


def _tick(results, total: int, enabled: bool):
    """Yield results while the project's progress display counts them (as the lattice family's
    writer does: bars in a terminal, plain lines in a log)."""
    from weakstil.progress import progress

    with progress(enabled) as bar:
        task = bar.add_task("synthetic slides", total=total, unit="slides")
        for item in results:
            bar.update(task, advance=1)
            yield item
