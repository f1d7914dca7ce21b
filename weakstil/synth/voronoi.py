"""The ``voronoi`` family: tissue from thresholded noise fields, tumour and fat as Voronoi
tessellations, inflammatory cells on a jittered lattice; written independently of ``lattice``,
``cells`` and ``regions`` (as a held-out generator, by an engineer who had read none of them).

**What it draws** (:mod:`weakstil.synth.voronoi_render`, at 0.5 µm/px). Layout: coarse (2-µm)
noise fields thresholded at per-slide quantiles give the tissue (a radial falloff plus noise, small
holes), fat and tumour (one of four architectures: nests, cords, glands with lumens, a mix; slivers
thinner than a cell removed), comedo necrosis deep in large nests, resampled bilinearly to level 0.
Stroma is collagen from four oriented fibre fields blended by smooth weights and warped (wavy), with
pale clefts, vessels (lumen, wall, red cells, endothelium) and spindle fibroblasts along the fibres.
Fat is a Voronoi tessellation of adipocytes; tumour cells are a Voronoi tessellation of jittered
hexagonal seeds (per-cell cytoplasm, membranes where the two nearest seeds are equally far), each
with a vesicular, hyperchromatic, coarse-granular or mitotic nucleus. Lymphocytes and plasma cells
sit on a jittered hexagonal lattice (6.3-6.9 µm): each site is accepted with the probability of a
density field (noise, aggregates, perivascular cuffs, a rise near tumour) scaled so the stromal cover
meets the slide's sTIL% target, plus an independent intratumoral density in tumour and a few in
necrosis; neutrophils and eosinophils overwrite them. Colour is Beer-Lambert with per-slide H and E
vectors and intensities and uneven staining; then a fold, a pen mark, focus blur varying across the
slide, stitching seams, noise and JPEG (Q 85-92; hard 68-83).

**Truth.** ``lymph_in_stroma`` is the lymphocyte/plasma-cell body (alpha > 0.5) on stroma pixels,
less what granulocytes overwrite; bodies over tumour, fat or necrosis do not count. Vessel lumens are
stroma; ``necrosis`` is an extra map. The maps are taken before the stain and scanner effects. The
true ``stil`` is 100·Σlymph_in_stroma/Σstroma of the float32 maps, as the generator computed it.
**Labels**: ``stil + N(0, sd)`` with ``sd = (1 + 0.15·stil)·(1.35 in hard)``, floored at 0 and
rounded to 1 or 5 (below 10) or to 5 or 10 (from 10 up), the noise drawn in slide order from one
cohort stream (so a label depends on ``n`` as well as the seed; the scenes do not).

Settings: ``standard`` and ``hard`` (tumour 10-85 % instead of 20-60 %, intratumoral inflammatory
cells in 65 % of the slides at 8-45 % acceptance, twice the stain variation, more necrosis,
granulocytes, folds, pens, seams, blur, noise and lower JPEG quality). A given (seed, setting, n,
width) draws the same scenes, truth and labels as the stand-alone generator this was moved from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakstil.synth.truth import TRUTH_UM

@dataclass(frozen=True, repr=False)
class VoronoiSpec:
    """One slide of a ``voronoi`` cohort: its ids, scan resolution, canvas, random stream and the
    pathologist's noise draws (z, u) for its label."""

    slide_id: str
    patient_id: str
    mpp: float
    seed: int
    index: int
    setting: str
    size_um: tuple[float, float]
    label_draws: tuple[float, float]

    def __repr__(self) -> str:  # the plan string a rerun compares
        return json.dumps({"family": "voronoi", "slide_id": self.slide_id, "mpp": self.mpp,
                           "seed": self.seed, "index": self.index, "setting": self.setting,
                           "size_um": list(self.size_um), "label_draws": list(self.label_draws)},
                          sort_keys=True)


def _slide_rng(seed: int, index: int, setting: str, width_um: float) -> np.random.Generator:
    """The slide's random stream (it depends on the seed, its index, the setting and the width)."""
    ss = np.random.SeedSequence([int(seed), int(index), 1 if setting == "hard" else 0, int(width_um)])
    return np.random.default_rng(ss)


def _pick_mpp(rng: np.random.Generator, mpps: tuple[float, ...]) -> float:
    """The scan resolution: the stream's first draw picks one of ``mpps`` with equal chance."""
    return float(mpps[int(rng.uniform() * len(mpps))])


def pathologist_label(stil: float, z: float, u: float, hard: bool) -> float:
    """A pathologist's estimate of ``stil`` from a standard normal ``z`` and a uniform ``u``."""
    sd = (1.0 + 0.15 * stil) * (1.35 if hard else 1.0)
    v = max(stil + (0.0 + sd * z), 0.0)  # = stil + rng.normal(0, sd)
    if v < 10:
        base = 1 if u < 0.5 else 5
    else:
        base = 5 if u < 0.6 else 10
    return float(np.clip(base * round(v / base), 0, 100))


def plan(n: int, seed: int = 0, *, setting: str = "standard", mpps=(0.25, 0.5),
         size_um: tuple[float, float] = (2000.0, 1600.0), prefix: str = "VOR") -> list[VoronoiSpec]:
    """Slides of a cohort, one patient per slide. Each scene depends on (seed, index, setting,
    width) only; the scan resolution is drawn per slide (equal chances, not an equal split); the
    label noise comes from one stream of (seed, setting, n), in slide order."""
    from weakstil.synth import check_setting

    check_setting(setting, "voronoi")
    width, height = float(size_um[0]), float(round(float(size_um[1])))
    mpps = tuple(float(m) for m in mpps)
    hard = setting == "hard"
    lrng = np.random.default_rng(np.random.SeedSequence([int(seed), 991, 1 if hard else 0, int(n)]))
    specs = []
    for i in range(n):
        mpp = _pick_mpp(_slide_rng(seed, i, setting, width), mpps)
        z = float(lrng.standard_normal())
        u = float(lrng.uniform())
        sid = f"{prefix}-{i:03d}"
        specs.append(VoronoiSpec(sid, sid, mpp, int(seed), i, setting, (width, height), (z, u)))
    return specs


def write_slide(spec: VoronoiSpec, slide_path, truth_path) -> tuple[str, float]:
    """Render and write one slide and its truth (both atomically); returns (slide_id, label)."""
    from PIL import Image

    from weakstil.synth.truth import write_truth
    from weakstil.synth.voronoi_render import RES, render
    from weakstil.wsi.writer import write_aperio_tiff

    rng = _slide_rng(spec.seed, spec.index, spec.setting, spec.size_um[0])
    rng.uniform()  # the scan-resolution draw (spec.mpp)
    hard = spec.setting == "hard"
    out = render(rng, hard, spec.size_um[1], spec.size_um[0])
    img = out.img
    if spec.mpp != RES:  # rendered at 0.5 µm/px; a 0.25 µm/px scan is that image upsampled (bicubic)
        h, w = img.shape[:2]
        size = (int(round(w * RES / spec.mpp)), int(round(h * RES / spec.mpp)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.BICUBIC))
    write_aperio_tiff(Path(slide_path), img, spec.mpp, quality=out.quality, maxworkers=1)
    del img
    label = pathologist_label(out.stil, *spec.label_draws, hard)
    truth = dict(out.truth, um_per_px=np.float64(TRUTH_UM), stil=np.float64(out.stil),
                 label=np.float64(label), scene=np.str_(json.dumps(out.scene, sort_keys=True)))
    write_truth(truth_path, truth, slide_mpp=spec.mpp, plan=repr(spec))
    return spec.slide_id, label
