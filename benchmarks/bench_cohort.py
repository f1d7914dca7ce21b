"""Warm start on a small new cohort: fine-tuned vs from scratch vs the parent unchanged (issue 15).

A *parent* model is trained on a home cohort (synthetic, seed 0). A *new site* scans with another
stain (hematoxylin optical density x1.35, eosin x0.8, other seeds): a small labelled cohort of it
(``new_n`` slides, the 12-20 slides a new hospital can label) and a held-out test set of the same
site (``test_n`` slides). Three models are then measured on the test set with ``weakstil evaluate``'s
library call:

* ``parent``: the home model unchanged;
* ``scratch``: ``weakstil train`` on the small cohort alone;
* ``finetuned``: ``weakstil train --init parent`` on the small cohort.

Figures: test-set R² and AUC@30 (with the 95 % bootstrap interval in the note) of each; the ratio
column compares fine-tuned and scratch with the parent. All on the CPU with the random-init ResNet-18
(what the tests use); synthetic slides, so the figures show the mechanics, not clinical accuracy.
``run(mode)``: ``smoke`` builds tiny cohorts and trains 2 epochs (for tests), ``quick`` and ``full``
the sizes below.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Row

SIZES = {  # home slides, new-site training slides, new-site test slides, slide width µm, max epochs
    "smoke": (8, 6, 4, 400.0, 2),
    "quick": (24, 12, 16, 500.0, 20),
    "full": (40, 16, 24, 600.0, None),
}
NEW_STAIN = (1.35, 0.8)  # the new site's hematoxylin and eosin optical density factors


def write_site(root: Path, n: int, seed: int, prefix: str, width_um: float, stain=(1.0, 1.0)) -> Path:
    """A synthetic cohort (slides/, labels.csv) whose stain is scaled by ``stain`` (H, E)."""
    from weakstil.synth.lattice import (
        make_scene,
        plan_cohort,
        render_scene,
        scene_truth,
    )
    from weakstil.wsi.writer import write_aperio_tiff

    (root / "slides").mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in plan_cohort(n, seed, size_um=width_um, prefix=prefix):
        scene = make_scene(spec.params)
        light, od_h, od_e = scene.stain
        scene.stain = np.stack([light, od_h * stain[0], od_e * stain[1]])
        write_aperio_tiff(root / "slides" / f"{spec.slide_id}.svs", render_scene(scene, spec.mpp), spec.mpp)
        rows.append([spec.slide_id, spec.patient_id, f"{float(scene_truth(scene)['stil']):.3f}"])
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "patient_id", "stil"], *rows])
    return root


def _extract(folders, features: Path) -> None:
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    paths = [p for f in folders for p in find_slides(f / "slides")]
    result = extract_slides(slide_sources(paths), features, encoder=create_encoder("resnet18-random"), spec=TileSpec(),
                            tissue=TissueParams(), opts=ExtractOptions(progress=False, device="cpu"), qc=False)
    if result.failed:
        raise RuntimeError(f"extraction failed: {result.failed}")


def compare(root: Path, mode_name: str) -> dict:
    """Build the sites, train parent / scratch / fine-tuned, evaluate each on the test set."""
    from weakstil.mil.cohort import train_from_cache
    from weakstil.outputs.evaluate import evaluate_model

    n_home, n_new, n_test, width, epochs = SIZES[mode_name]
    t0 = time.perf_counter()
    home = write_site(root / "home", n_home, 0, "HOME", width)
    new = write_site(root / "new", n_new, 11, "NEW", width, NEW_STAIN)
    test = write_site(root / "test", n_test, 12, "TEST", width, NEW_STAIN)
    _extract([home, new, test], root / "features")
    prep = time.perf_counter() - t0
    kwargs = {"models_dir": root / "models", "progress": False, "accelerator": "cpu", "n_folds": 3 if n_new < 12 else 5}
    if epochs is not None:
        kwargs.update(max_epochs=epochs, patience=min(10, epochs))
    seconds = {}
    for name, labels, init in (("parent", home, None), ("scratch", new, None), ("finetuned", new, "parent")):
        t = time.perf_counter()
        train_from_cache(labels / "labels.csv", root / "features", name=name,
                         init=root / "models" / init if init else None, **kwargs)
        seconds[name] = time.perf_counter() - t
    out = {}
    for name in ("parent", "scratch", "finetuned"):
        result = evaluate_model(test / "labels.csv", root / "models" / name, features_dir=root / "features",
                                out_dir=root / "eval" / name, n_boot=500)
        out[name] = {"pooled": result.metrics["pooled"], "ci": result.metrics["pooled_ci95"],
                     "n_flagged": result.metrics["n_flagged"], "train_s": round(seconds[name], 1)}
    out["prep_s"] = round(prep, 1)
    out["sizes"] = {"home": n_home, "new": n_new, "test": n_test, "width_um": width}
    return out


def run(mode, device: str = "cpu") -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        res = compare(Path(tmp), mode.name)
    rows = []
    parent = res["parent"]["pooled"]
    sizes = res["sizes"]
    for name in ("parent", "scratch", "finetuned"):
        r = res[name]
        for metric in ("r2", "auc@30"):
            value = r["pooled"].get(metric)
            lo, hi = r["ci"].get(metric) or (None, None)
            ref = parent.get(metric)
            rows.append(Row(
                "warmstart", f"{name} {metric} on the new site's test set", float("nan") if value is None else value,
                metric, reference="parent unchanged" if name != "parent" else "", ref_value=ref if name != "parent" else None,
                ratio=(value / ref if name != "parent" and value is not None and ref not in (None, 0) else None),
                note=(f"95% CI [{lo if lo is None else round(lo, 3)}, {hi if hi is None else round(hi, 3)}]; "
                      f"{sizes['home']} home / {sizes['new']} new / {sizes['test']} test slides; "
                      f"trained in {r['train_s']} s; {r['n_flagged']} test slides QC-flagged"),
                extra=r))
    return rows
