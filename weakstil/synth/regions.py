"""The ``regions`` family: every pixel gets a region label from smooth random fields, and cell bodies
are rasterised per type; written independently of ``lattice`` and ``cells`` (as a held-out generator).

**What it draws.** Geometry comes from smooth random fields on a 2-µm grid, resampled bilinearly to
level 0 (so region borders are smooth at any mpp): a tissue outline (a rotated ellipse with radial
harmonics, sometimes a second fragment, thin tears), fat lobules biased to the periphery (adipocytes
from a jittered hexagonal Voronoi tessellation), tumour nests from one of four patterns (nests,
cords/trabeculae, sheets, a mix) thresholded to the slide's tumour fraction, comedo necrosis deep in
large nests, vessels in stroma (wall, endothelium, lumen with red cells). Cells are rasterised one by
one: pleomorphic vesicular tumour nuclei with nucleoli and mitoses, spindle fibroblasts along wavy
collagen fibres, lymphocytes (dense round nucleus and a thin rim) and plasma cells, whose density is
solved per slide so the realised sTIL% hits a target drawn from a skewed mixture (90 %
100·Beta(1.15, 5), 10 % U(40, 92)), stratified over the cohort. Colour is Beer–Lambert mixing of
per-slide H, E and "red" OD vectors; then scanner blur, line-scan stripes, noise, pen marks, folds and
(hard) out-of-focus patches.

**Truth.** Each level-0 pixel has one region (glass, stroma, tumour, fat, necrosis, vessel lumen);
each inflammatory cell's body is the pixels where its alpha is above 0.5. The area of a lymphocyte is
its *whole cell body* (nucleus and rim; for a plasma cell the whole oval cell). ``lymph_in_stroma``
counts a pixel inside a cell body whose region is stroma: a cell centred in stroma turns the pixels
under it into stroma and counts in full; cells centred in tumour, fat, necrosis or a lumen keep the
region under them and do not count. **Vessel lumens are not stroma** (tissue, but neither stroma,
tumour nor fat); ``necrosis`` is its own map. Artefacts are applied after the truth and do not change
it. The maps are written in the format of :mod:`weakstil.synth.truth`. **Labels** are the truth with a
pathologist's error, ``v = stil·exp(0.15·z0) + (1 + 0.06·stil)·z1`` (z clipped to ±2), rounded to 1
below 10 and to 5 from 10 up.

Settings: ``standard`` and ``hard`` (tumour 10–85 % of the tissue, dense intratumoral inflammatory
cells in 60 % of the slides that do not count, twice the stain variation, darker tumour nuclei in some
slides, more necrosis and artefacts). A given (seed, setting, size, mpps) draws the same scenes as the
stand-alone generator this code was moved from (``gen.py`` of the held-out set). The drawing is in
:mod:`weakstil.synth.regions_render` (the scene) and :mod:`weakstil.synth.regions_sprites` (fields,
canvas, cell sprites); this module plans cohorts and writes slides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from weakstil.synth.regions_render import render
from weakstil.synth.truth import TRUTH_UM, stil_from_truth

# reference stain vectors in OD space (rows: R,G,B absorbance per unit stain)
REF_H = np.array([0.5626, 0.7201, 0.4062])
REF_E = np.array([0.2159, 0.8012, 0.5581])
REF_R = np.array([0.21, 0.69, 0.69])  # red-cell haemoglobin/eosin "red" channel


def unit(v):
    v = np.clip(np.asarray(v, float), 0.02, None)
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- plan
def _make_plans(n, seed, setting, size_um, prefix, mpps=(0.25, 0.5)):
    """Every parameter of every slide (dicts); ``size_um`` = (width, height)."""
    hard = setting == 'hard'
    ss = np.random.SeedSequence([seed, 7 if hard else 3])
    rng = np.random.default_rng(ss.spawn(1)[0])
    child = ss.spawn(n)
    # stratified targets from a skewed mixture (median ~16, tail to ~85)
    big = np.where(rng.random(200000) < 0.10, rng.uniform(40, 92, 200000),
                   100 * rng.beta(1.15, 5.0, 200000))
    u = (rng.permutation(n) + rng.random(n)) / n
    targets = np.clip(np.quantile(big, u), 0.7, 92)
    # an equal share per resolution (the remainder to the last ones), in random order
    counts = [n // len(mpps)] * len(mpps)
    for k in range(n % len(mpps)):
        counts[-1 - k] += 1
    mpps = np.repeat(np.asarray(mpps, dtype=float), counts)
    rng.shuffle(mpps)
    sv = 2.0 if hard else 1.0
    plans = []
    for i in range(n):
        r = np.random.default_rng(child[i])
        p = dict(slide_id=f"{prefix}-{i:03d}", index=i, setting=setting,
                 render_seed=int(r.integers(2**62)), mpp=float(mpps[i]),
                 width_um=float(size_um[0]), height_um=float(size_um[1]),
                 target_stil=float(targets[i]))
        # ---- tissue
        p['tissue'] = dict(cx=r.uniform(0.4, 0.6), cy=r.uniform(0.4, 0.6),
                           rx=r.uniform(0.36, 0.56), ry=r.uniform(0.34, 0.52),
                           ang=r.uniform(0, np.pi), harm=[[float(r.normal(0, 0.09 / math.sqrt(k))),
                                                           float(r.uniform(0, 2 * np.pi))] for k in range(2, 7)],
                           n_tears=int(r.poisson(1.2 if hard else 0.4)),
                           second=bool(r.random() < 0.3))
        # ---- compartments
        p['tumour_frac'] = float(r.uniform(0.10, 0.85) if hard else r.uniform(0.20, 0.50))
        p['fat_frac'] = float(0.0 if r.random() < 0.3 else r.uniform(0.03, 0.28))
        p['pattern'] = str(r.choice(['nests', 'cords', 'sheets', 'mixed']))
        p['nest_scale'] = float(r.uniform(25, 80))
        p['bed_weight'] = float(r.uniform(0.3, 1.3))
        p['necrosis'] = bool(r.random() < (0.4 if hard else 0.25))
        p['necrosis_depth'] = float(r.uniform(35, 80))
        p['n_vessels_per_mm2'] = float(r.uniform(10, 40))
        p['adipocyte_um'] = float(r.uniform(55, 100))
        # ---- tumour cells
        grade = int(r.choice([1, 2, 3], p=[0.15, 0.4, 0.45]))
        p['grade'] = grade
        p['tum_nuc_um'] = float(r.uniform(3.4, 4.6) + 0.6 * grade)      # semi-axis, um
        p['tum_pleo'] = float(0.06 + 0.06 * grade + r.uniform(0, 0.05))
        p['tum_spacing'] = float(p['tum_nuc_um'] * r.uniform(2.3, 2.9))
        p['tum_h'] = float(r.uniform(0.55, 0.95) if not hard else r.uniform(0.55, 1.35))
        p['nucleoli'] = float(0.2 + 0.35 * grade)
        p['mitosis_frac'] = float(0.002 + 0.008 * grade * r.random())
        p['tum_cyto_e'] = float(r.uniform(0.25, 0.45))
        p['tum_cyto_h'] = float(r.uniform(0.10, 0.22))
        # ---- stroma
        p['stroma_e'] = float(r.uniform(0.45, 0.8))
        p['fibre_lambda'] = [float(r.uniform(3.5, 7)), float(r.uniform(3.5, 7))]
        p['fibre_theta'] = [float(r.uniform(0, np.pi)), float(r.uniform(0, np.pi))]
        p['fibre_warp'] = float(r.uniform(0.6, 2.2))
        p['fibroblast_per_mm2'] = float(r.uniform(300, 1100))
        # ---- inflammatory cells
        p['lym_spacing'] = float(r.uniform(7.0, 7.8))
        p['lym_r'] = float(r.uniform(2.8, 3.4))           # nuclear radius, um
        p['lym_h'] = float(r.uniform(1.9, 2.6))
        p['plasma_frac'] = float(r.uniform(0.02, 0.25))
        p['het_sigma'] = float(r.uniform(0.2, 1.0))
        p['het_scale'] = float(r.uniform(120, 350))
        p['clust_sigma'] = float(r.uniform(0.0, 1.2))
        p['clust_scale'] = float(r.uniform(12, 35))
        p['peri_beta'] = float(r.uniform(0, 3))
        p['peri_len'] = float(r.uniform(20, 90))
        p['n_aggregates'] = int(r.poisson(0.8 + 0.03 * targets[i]))
        if hard and r.random() < 0.6:
            p['it_factor'] = float(r.uniform(0.4, 1.6))    # intratumoral lymphs rel. to stroma
            p['it_floor'] = float(r.uniform(0.05, 0.35))   # absolute density floor in tumour
        else:
            p['it_factor'] = float(r.uniform(0.0, 0.12))
            p['it_floor'] = float(r.uniform(0.0, 0.02))
        # ---- stain & scanner
        p['vecH'] = unit(REF_H + r.normal(0, 0.045 * sv, 3)).tolist()
        p['vecE'] = unit(REF_E + r.normal(0, 0.045 * sv, 3)).tolist()
        p['vecR'] = unit(REF_R + r.normal(0, 0.03 * sv, 3)).tolist()
        p['sH'] = float(np.exp(r.normal(0, 0.13 * sv)))
        p['sE'] = float(np.exp(r.normal(0, 0.15 * sv)))
        p['bg_od'] = (np.array([0.025, 0.035, 0.03]) * r.uniform(0.4, 1.6, 3)).tolist()
        p['residual'] = (r.normal(0, 0.015 * sv, 3)).tolist()
        p['thick_sigma'] = float(r.uniform(0.04, 0.12) * sv)
        p['blur_um'] = float(r.uniform(0.2, 0.55) if not hard else r.uniform(0.2, 0.9))
        p['noise_sd'] = float(r.uniform(1.0, 3.0) * (1.6 if hard else 1.0))
        p['stripe_amp'] = float(r.uniform(0.0, 0.02) * sv)
        p['pen'] = bool(r.random() < (0.35 if hard else 0.1))
        p['pen_colour'] = str(r.choice(['green', 'blue', 'black']))
        p['fold'] = bool(r.random() < (0.3 if hard else 0.06))
        p['oof'] = bool(hard and r.random() < 0.25)
        # ---- label noise (applied to the realised truth)
        p['label_z'] = [float(r.normal()), float(r.normal())]
        plans.append(p)
    return plans


def noisy_label(stil, z):
    z0, z1 = (min(max(x, -2.0), 2.0) for x in z)
    v = stil * math.exp(0.15 * z0) + (1.0 + 0.06 * stil) * z1
    v = min(max(v, 0.0), 100.0)
    if v < 10:
        v = float(round(v))
    else:
        v = float(5 * round(v / 5))
    return min(max(v, 0.0), 100.0)


# ----------------------------------------------------------------------------- slides and cohorts
@dataclass(frozen=True, repr=False)
class RegionSpec:
    """One slide of a ``regions`` cohort: its ids, scan resolution and every drawing parameter."""

    slide_id: str
    patient_id: str
    mpp: float
    params: dict

    def __repr__(self) -> str:  # the plan string a rerun compares (JSON of every parameter)
        return json.dumps(self.params, sort_keys=True)


def plan(n: int, seed: int = 0, *, setting: str = "standard", mpps=(0.25, 0.5),
         size_um: tuple[float, float] = (2000.0, 1600.0), prefix: str = "REG") -> list[RegionSpec]:
    """Slides of a cohort: targets stratified over a skewed mixture, scans split equally between
    ``mpps`` in random order, one patient per slide. The random streams depend on (n, seed, setting)
    only, not on ``prefix``, ``size_um`` or ``mpps``' values."""
    from weakstil.synth import check_setting

    check_setting(setting, "regions")
    size = tuple(float(v) for v in size_um)
    return [RegionSpec(p["slide_id"], p["slide_id"], p["mpp"], p)
            for p in _make_plans(n, seed, setting, size, prefix, tuple(mpps))]


def write_slide(spec: RegionSpec, slide_path, truth_path) -> tuple[str, float]:
    """Render and write one slide and its truth (both atomically); returns (slide_id, label)."""
    from weakstil.synth.truth import write_truth
    from weakstil.wsi.writer import write_aperio_tiff

    img, truth, counts = render(spec.params)
    write_aperio_tiff(slide_path, img, spec.mpp, quality=90, min_level_px=256, maxworkers=1)
    del img
    stil = stil_from_truth(truth)
    label = noisy_label(stil, spec.params["label_z"])
    truth.update(um_per_px=np.float64(TRUTH_UM), stil=np.float64(stil), label=np.float64(label),
                 counts=np.str_(json.dumps(counts, sort_keys=True)))
    write_truth(truth_path, truth, slide_mpp=spec.mpp, plan=repr(spec))
    return spec.slide_id, label
