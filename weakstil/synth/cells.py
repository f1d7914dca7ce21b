"""The ``cells`` family: synthetic H&E built cell by cell, written independently of ``lattice``.

A slide is a layout of compartments on a 2-µm grid (an outline made of overlapping ellipses;
tumour nests and glands placed as a clustered process until a target tumour fraction is reached;
fat lobules; comedo necrosis in large nests) and cells placed by point processes per type:
tumour cells (large, pleomorphic) on a jittered lattice in the nests, lymphocytes (small, round,
dark) on a hard-core lattice whose occupancy follows a smooth intensity with hot spots and a rise
toward the tumour border, fibroblasts (spindles) aligned with the collagen, debris in necrosis and,
in the hard setting, intratumoral lymphocytes that do not count toward sTIL%. Artefacts: tissue
folds and pen marks. :mod:`weakstil.synth.optics` turns it into a picture with the slide's stain and
scanner. Truth is measured from the placed cells (footprint discs of 7.5 µm, the cell with its rim)
and saved in the common format of :mod:`weakstil.synth.truth`; the label a "pathologist" gives is
that truth with noise that grows with the value, rounded to 5 or 10 (to 1 below 10).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from weakstil.synth import optics
from weakstil.synth.truth import TRUTH_UM, stil_from_truth

GRID_UM = 2.0  # µm per cell of the compartment map
LYMPH_SPACING_UM = 7.6  # hard-core lattice of lymphocyte sites (hexagonal)
LYMPH_FOOTPRINT_UM = 7.5  # diameter of a lymphocyte as a pathologist counts its area
BG, STROMA, TUMOUR, LUMEN, FAT, NECROSIS = range(6)
SETTINGS = {  # what differs between the standard and hard settings
    "standard": dict(tumour=(0.2, 0.5), intratumoral=(0.0, 0.03), stain_spread=1.0, artefacts=0.2,
                     necrosis=0.2),
    "hard": dict(tumour=(0.10, 0.85), intratumoral=(0.05, 0.35), stain_spread=2.0, artefacts=0.45,
                 necrosis=0.5),
    # the standard slide with hyperchromatic tumour nuclei, as dark as lymphocytes: a stain-only
    # lymphocyte measure must not count them (docs/synthetic.md)
    "dark-nuclei": dict(tumour=(0.2, 0.5), intratumoral=(0.0, 0.03), stain_spread=1.0, artefacts=0.2,
                        necrosis=0.2, hyperchromatic=(0.5, 1.0)),
}


@dataclass(frozen=True, repr=False)
class CellSlide:
    """What a ``cells`` slide is made from; everything else follows from ``seed``."""

    seed: int
    stil_target: float = 20.0
    tumour_fraction: float = 0.35  # of the tissue area (nests, glands, their lumina)
    intratumoral: float = 0.0  # lymphocyte site occupancy inside tumour, independent of sTIL%
    stain_spread: float = 1.0
    artefacts: float = 0.2  # chance of a fold, of a pen mark
    necrosis: float = 0.2  # chance of comedo necrosis in large nests
    size_um: tuple[float, float] = (2000.0, 1600.0)
    hyperchromatic: float = 0.0  # share of tumour nuclei drawn dark and solid instead of vesicular

    def __repr__(self) -> str:  # without a zero ``hyperchromatic``: cohorts written before it resume
        items = [(f.name, getattr(self, f.name)) for f in fields(self)]
        return f"CellSlide({', '.join(f'{k}={v!r}' for k, v in items if k != 'hyperchromatic' or v)})"


@dataclass
class CellScene:
    params: CellSlide
    labels: np.ndarray  # (H, W) uint8 on the GRID_UM grid
    cells: dict  # kind -> (xy_um, variant, strength)
    stromal_lymph: np.ndarray  # (N, 2) µm: the lymphocytes that count toward sTIL%
    amounts: dict = field(default_factory=dict)  # 1-µm stain amounts for optics.render


def _smooth_noise(rng, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Gaussian-filtered white noise with unit SD, correlation length ~``scale_px``."""
    out = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), scale_px, mode="wrap")
    return out / (out.std() + 1e-9)


def _ellipse_d(shape, cx, cy, a, b, angle):
    """Normalised elliptic distance (1 on the boundary) over a grid of ``shape`` (grid px)."""
    y, x = np.ogrid[0 : shape[0], 0 : shape[1]]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return np.hypot(u / a, v / b)


def _outline(rng, shape) -> np.ndarray:
    """Tissue: a union of 2-4 overlapping ellipses with a ragged edge, inside a margin."""
    h, w = shape
    d = np.full(shape, np.inf, np.float32)
    for _ in range(rng.integers(2, 5)):
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        d = np.minimum(d, _ellipse_d(shape, cx, cy, rng.uniform(0.25, 0.45) * w,
                                     rng.uniform(0.25, 0.45) * h, rng.uniform(0, np.pi)))
    d = d + 0.12 * _smooth_noise(rng, shape, 12)
    yy, xx = np.ogrid[0:h, 0:w]
    margin = np.minimum(np.minimum(yy, h - 1 - yy) / h, np.minimum(xx, w - 1 - xx) / w)
    return (d < 1) & (margin > 0.03)


def _place_nests(rng, labels, tissue, p: CellSlide) -> None:
    """Tumour nests (solid or glandular) around cluster parents until the tumour fraction is met."""
    shape, grid = labels.shape, GRID_UM
    ty, tx = np.nonzero(tissue)
    goal = p.tumour_fraction * ty.size
    wobble = _smooth_noise(rng, shape, 6)
    p_gland = rng.uniform(0.0, 0.7)
    tumour = np.zeros(shape, bool)
    necrotic = []
    for _ in range(3000):
        if tumour.sum() >= goal:
            break
        i = rng.integers(ty.size)
        for _ in range(rng.integers(1, 6)):
            cx, cy = tx[i] + rng.normal(0, 40 / grid), ty[i] + rng.normal(0, 40 / grid)
            a = rng.uniform(25, 110 if p.tumour_fraction < 0.5 else 160) / grid
            b, ang = a * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
            r = int(a * 1.3) + 2
            sl = (slice(max(int(cy) - r, 0), int(cy) + r), slice(max(int(cx) - r, 0), int(cx) + r))
            sub = _ellipse_d(tumour[sl].shape, cx - sl[1].start, cy - sl[0].start, a, b, ang)
            sub = sub + 0.15 * wobble[sl]
            nest = (sub < 1) & tissue[sl]
            tumour[sl] |= nest
            if a * grid > 40 and rng.random() < p_gland:
                labels[sl][nest & (sub < rng.uniform(0.3, 0.55))] = LUMEN
            elif a * grid > 70 and rng.random() < p.necrosis:
                necrotic.append((sl, nest & (sub < 0.5)))
    labels[tumour & (labels != LUMEN)] = TUMOUR
    for sl, core in necrotic:
        labels[sl][core & (labels[sl] == TUMOUR)] = NECROSIS


def _place_fat(rng, labels, tissue) -> None:
    for _ in range(rng.integers(0, 4)):
        ty, tx = np.nonzero(labels == STROMA)
        if ty.size == 0:
            return
        i = rng.integers(ty.size)
        a = rng.uniform(100, 320) / GRID_UM
        d = _ellipse_d(labels.shape, tx[i], ty[i], a, a * rng.uniform(0.5, 1), rng.uniform(0, np.pi))
        labels[(d < 1) & (labels == STROMA)] = FAT


def layout(rng, p: CellSlide) -> np.ndarray:
    """The compartment map (GRID_UM grid, uint8 labels)."""
    shape = (round(p.size_um[1] / GRID_UM), round(p.size_um[0] / GRID_UM))
    tissue = _outline(rng, shape)
    labels = np.where(tissue, STROMA, BG).astype(np.uint8)
    _place_nests(rng, labels, tissue, p)
    _place_fat(rng, labels, tissue)
    return labels


def _at(labels: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
    iy = np.clip((xy_um[:, 1] / GRID_UM).astype(int), 0, labels.shape[0] - 1)
    ix = np.clip((xy_um[:, 0] / GRID_UM).astype(int), 0, labels.shape[1] - 1)
    return labels[iy, ix]


def _lattice_sites(rng, size_um, spacing: float, jitter: float, hexagonal: bool) -> np.ndarray:
    dy = spacing * (0.866 if hexagonal else 1.0)
    ys = np.arange(spacing / 2, size_um[1], dy)
    xs = np.arange(spacing / 2, size_um[0], spacing)
    gx, gy = np.meshgrid(xs, ys)
    if hexagonal:
        gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    xy = np.stack([gx.ravel(), gy.ravel()], 1)
    xy = xy + rng.uniform(-jitter, jitter, xy.shape)
    return np.clip(xy, 0, np.array(size_um) - 1e-3)


def _til_intensity(rng, labels) -> np.ndarray:
    """Relative lymphocyte intensity on the grid: smooth field, follicle-like hot spots, and a rise
    within ~60 µm of the tumour."""
    shape = labels.shape
    field_ = rng.uniform(0.4, 1.0) * _smooth_noise(rng, shape, rng.uniform(60, 150) / GRID_UM)
    spots = np.zeros(shape, np.float32)
    for _ in range(rng.integers(0, 6)):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        spots += np.exp(-_ellipse_d(shape, cx, cy, *(rng.uniform(40, 120, 2) / GRID_UM), 0) ** 2)
    near = np.exp(-ndimage.distance_transform_edt(labels != TUMOUR) * GRID_UM / 60)
    return np.exp(field_ + rng.uniform(0.5, 2.0) * spots + rng.uniform(0, 1.5) * near)


def _occupy(rng, sites, intensity, region, target: float) -> np.ndarray:
    """Occupied sites: P(occupied) = 1 - exp(-λ m), λ chosen so that the expected footprint cover of
    ``region`` is ``target`` (0-1, capped at what the lattice holds)."""
    if target <= 0 or sites.size == 0:
        return np.zeros(len(sites), bool)
    per_site = np.pi * (LYMPH_FOOTPRINT_UM / 2) ** 2 / (LYMPH_SPACING_UM**2 * 0.866)
    m = intensity[(sites[:, 1] / GRID_UM).astype(int), (sites[:, 0] / GRID_UM).astype(int)]
    goal = min(target / per_site, 0.995) * len(sites)
    lo, hi = 0.0, 1e4
    for _ in range(60):
        mid = np.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1 else (lo + hi) / 2
        lo, hi = (mid, hi) if (-np.expm1(-mid * m)).sum() < goal else (lo, mid)
    return rng.random(len(sites)) < -np.expm1(-hi * m)


def place_cells(rng, labels, p: CellSlide, size_um) -> tuple[dict, np.ndarray, np.ndarray]:
    """All cells by type, the stromal lymphocytes (µm) and the collagen direction field (grid)."""
    spacing = rng.uniform(10.5, 13.5)
    tum = _lattice_sites(rng, size_um, spacing, 0.38 * spacing, hexagonal=False)
    tum = tum[_at(labels, tum) == TUMOUR]
    tum = tum[rng.random(len(tum)) < 0.93]
    sites = _lattice_sites(rng, size_um, LYMPH_SPACING_UM, 0.05, hexagonal=True)
    where = _at(labels, sites)
    intensity = _til_intensity(rng, labels)
    stromal = sites[where == STROMA]
    stromal = stromal[_occupy(rng, stromal, intensity, STROMA, p.stil_target / 100)]
    inside = sites[where == TUMOUR]
    inside = inside[_occupy(rng, inside, intensity, TUMOUR, p.intratumoral)]
    angle = np.pi * _smooth_noise(rng, labels.shape, 40 / GRID_UM)
    fib = rng.uniform(0, 1, (int(size_um[0] * size_um[1] / rng.uniform(500, 1100)), 2)) * size_um
    fib = fib[_at(labels, fib) == STROMA]
    fib_angle = _at(angle, fib) % np.pi
    fib_var = (np.rint(fib_angle / (np.pi / optics.FIBRO_ANGLES)).astype(int) % optics.FIBRO_ANGLES) * 2
    fib_var += rng.integers(0, 2, len(fib))
    deb = rng.uniform(0, 1, (int(size_um[0] * size_um[1] / 40), 2)) * size_um
    deb = deb[_at(labels, deb) == NECROSIS]
    lymph = np.concatenate([stromal, inside])

    def kind(name, xy, lo, hi, variant=None):
        var = rng.integers(0, optics.BANK_SIZE[name], len(xy)) if variant is None else variant
        return xy, var, rng.uniform(lo, hi, len(xy))

    cells = {"fibro": kind("fibro", fib, 0.8, 1.2, fib_var), "tumour": kind("tumour", tum, 0.55, 0.95),
             "debris": kind("debris", deb, 0.8, 1.3), "lymph": kind("lymph", lymph, 1.3, 1.8)}
    return _hyperchromatic(cells, p), stromal, angle


def _hyperchromatic(cells: dict, p: CellSlide) -> dict:
    """A share of the tumour nuclei redrawn dark and solid (own random stream: slides without them
    stay exactly as before)."""
    if p.hyperchromatic <= 0:
        return cells
    rng = np.random.default_rng([p.seed, 7])
    xy, var, _ = cells["tumour"]
    dark = rng.random(len(xy)) < p.hyperchromatic
    out = {}
    for name, value in cells.items():
        out[name] = tuple(a[~dark] for a in value) if name == "tumour" else value
        if name == "tumour":  # drawn right after the pale ones, under debris and lymphocytes
            out["tumour_dark"] = (xy[dark], var[dark], rng.uniform(1.2, 1.7, int(dark.sum())))
    return out


def _collagen(rng, labels, angle, size_um) -> np.ndarray:
    """Collagen fibres drawn as short strokes along the direction field (1-µm grid, 0-1)."""
    w, h = round(size_um[0]), round(size_um[1])
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    n = int((labels == STROMA).sum() * GRID_UM**2 / rng.uniform(60, 140))
    xy = rng.uniform(0, 1, (n, 2)) * (w, h)
    xy = xy[_at(labels, xy) == STROMA]
    theta = _at(angle, xy) + rng.normal(0, 0.25, len(xy))
    length = rng.uniform(15, 60, len(xy))
    dx, dy = np.cos(theta) * length / 2, np.sin(theta) * length / 2
    for (x, y), ddx, ddy, width, value in zip(xy.tolist(), dx.tolist(), dy.tolist(),
                                             rng.integers(1, 4, len(xy)).tolist(),
                                             rng.integers(70, 200, len(xy)).tolist()):
        draw.line((x - ddx, y - ddy, x + ddx, y + ddy), fill=value, width=width)
    img = img.filter(ImageFilter.GaussianBlur(0.7))
    return np.asarray(img, np.float32) / 255


def stain_amounts(rng, labels, angle, p: CellSlide) -> dict:
    """Hematoxylin/eosin amounts per compartment on a 1-µm grid, with folds and a pen mark."""
    size_um = p.size_um
    up = np.repeat(np.repeat(labels, 2, 0), 2, 1)  # GRID_UM = 2 -> 1 µm
    tex = _smooth_noise(rng, up.shape, 3)
    e = np.choose(up, [0.0, 0.28, 0.42, 0.06, 0.02, 0.75]).astype(np.float32)
    h = np.choose(up, [0.0, 0.04, 0.13, 0.02, 0.0, 0.16]).astype(np.float32)
    e += np.float32(0.9) * _collagen(rng, labels, angle, size_um) * (up == STROMA)
    e += np.float32(0.06) * tex * (up != BG)
    h += np.float32(0.05) * np.clip(tex, 0, None) * ((up == NECROSIS) | (up == TUMOUR))
    fat = up == FAT
    if fat.any():
        e[fat] += 0.7 * _membranes(rng, up.shape)[fat]
    pen = np.zeros(up.shape, np.float32)
    ink = optics.PEN_INKS["green"]
    if rng.random() < p.artefacts:  # a fold: tissue lying double along a band
        band = _stroke(rng, up.shape, rng.uniform(25, 80), rng.uniform(0.6, 1.0)) * (up != BG)
        h *= 1 + 0.9 * band
        e *= 1 + 0.9 * band
    if rng.random() < p.artefacts:  # a pen mark, often across the edge of the tissue
        pen = _stroke(rng, up.shape, rng.uniform(40, 110), rng.uniform(1.0, 2.0))
        ink = list(optics.PEN_INKS.values())[rng.integers(len(optics.PEN_INKS))]
    return {"h": np.clip(h, 0, None), "e": np.clip(e, 0, None), "pen": pen, "pen_ink": ink}


def _membranes(rng, shape) -> np.ndarray:
    """Adipocyte membranes: the ridges of a Worley (F2 - F1) field over cells of ~60-90 µm."""
    from scipy.spatial import cKDTree

    step = rng.uniform(60, 90)
    seeds = _lattice_sites(rng, (shape[1], shape[0]), step, 0.35 * step, hexagonal=True)
    small = (shape[0] // 2, shape[1] // 2)
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]]
    d, _ = cKDTree(seeds).query(np.stack([xx.ravel() * 2.0, yy.ravel() * 2.0], 1), k=2)
    ridge = np.clip(1 - (d[:, 1] - d[:, 0]) / 2.5, 0, 1).reshape(small)
    return np.repeat(np.repeat(ridge, 2, 0), 2, 1)[: shape[0], : shape[1]].astype(np.float32)


def _stroke(rng, shape, width_um: float, amount: float) -> np.ndarray:
    """A smooth random curve of ``width_um`` across the canvas (1-µm grid, 0-``amount``)."""
    h, w = shape
    start = rng.uniform(0, 1, 2) * (w, h)
    heading = rng.uniform(0, 2 * np.pi)
    pts = [tuple(start)]
    for _ in range(40):
        heading += rng.normal(0, 0.15)
        pts.append((pts[-1][0] + 40 * np.cos(heading), pts[-1][1] + 40 * np.sin(heading)))
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).line(pts, fill=255, width=int(width_um), joint="curve")
    return np.asarray(img.filter(ImageFilter.GaussianBlur(3)), np.float32) / 255 * np.float32(amount)


def make_scene(p: CellSlide) -> CellScene:
    rng = np.random.default_rng([p.seed, 2027])
    size_um = tuple(max(1, round(s / TRUTH_UM)) * TRUTH_UM for s in p.size_um)
    p = CellSlide(**{**p.__dict__, "size_um": size_um})
    labels = layout(rng, p)
    cells, stromal, angle = place_cells(rng, labels, p, size_um)
    scene = CellScene(p, labels, cells, stromal)
    scene.amounts = stain_amounts(rng, labels, angle, p)
    return scene


def scene_truth(scene: CellScene) -> dict:
    """Truth maps at TRUTH_UM: compartment fractions and the stromal lymphocytes' footprint area."""
    k = round(TRUTH_UM / GRID_UM)
    labels = scene.labels
    h, w = labels.shape

    def block(a):
        return a.reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)

    stroma = labels == STROMA
    cover = np.zeros(labels.shape, np.float32)
    r = LYMPH_FOOTPRINT_UM / 2 / GRID_UM
    iy = (scene.stromal_lymph[:, 1] / GRID_UM).astype(int)
    ix = (scene.stromal_lymph[:, 0] / GRID_UM).astype(int)
    fy = scene.stromal_lymph[:, 1] / GRID_UM - iy - 0.5
    fx = scene.stromal_lymph[:, 0] / GRID_UM - ix - 0.5
    for oy in range(-3, 4):  # area of each footprint disc in its neighbouring grid cells
        for ox in range(-3, 4):
            # fraction of grid cell (iy+oy, ix+ox) inside the disc, 4x4 supersampled
            sy = oy + (np.arange(4) + 0.5) / 4 - 0.5
            sx = ox + (np.arange(4) + 0.5) / 4 - 0.5
            inside = ((sy[None, :, None] - fy[:, None, None]) ** 2
                      + (sx[None, None, :] - fx[:, None, None]) ** 2) <= r * r
            frac = inside.mean(axis=(1, 2)).astype(np.float32)
            ty, tx = iy + oy, ix + ox
            ok = (frac > 0) & (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
            np.add.at(cover, (ty[ok], tx[ok]), frac[ok])
    truth = {
        "stroma": block(stroma),
        "lymph_in_stroma": block(np.minimum(cover, 1) * stroma),
        "tumour": block((labels == TUMOUR) | (labels == LUMEN)),
        "fat": block(labels == FAT),
        "necrosis": block(labels == NECROSIS),
        "tissue": block(labels != BG),
        "um_per_px": np.float64(TRUTH_UM),
    }
    truth["stil"] = np.float64(stil_from_truth(truth))
    return truth


def pathologist_label(rng, stil: float) -> float:
    """A visual estimate: error SD 1 + 0.12·sTIL%, rounded to 1 below 10, else to 5 or 10."""
    value = stil + rng.normal(0, 1.0 + 0.12 * stil)
    step = 1 if value < 10 else (5 if rng.random() < 0.6 else 10)
    return float(np.clip(step * np.round(value / step), 0, 100)) + 0.0  # no "-0"


# --- slides and cohorts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CellSpec:
    slide_id: str
    patient_id: str
    mpp: float
    params: CellSlide
    label_seed: int


def plan(n: int, seed: int = 0, *, setting: str = "standard", mpps=(0.25, 0.5),
         size_um: tuple[float, float] = (2000.0, 1600.0), prefix: str = "CEL") -> list[CellSpec]:
    """Slides of a cohort: ~25 % of patients with two blocks (targets within ±15 %), targets
    1 + 84·u² over stratified u (many low, a long high tail), a tumour fraction and artefact odds
    per the setting, scans at alternating resolutions in random order."""
    from weakstil.synth import check_setting

    check_setting(setting, "cells")
    cfg = SETTINGS[setting]
    rng = np.random.default_rng([seed, 31])
    dark_rng = np.random.default_rng([seed, 37])  # its own stream: the other settings' plans stay as they were
    blocks = []
    while sum(blocks) < n:
        blocks.append(2 if rng.random() < 0.25 and n - sum(blocks) >= 2 else 1)
    u = (rng.permutation(len(blocks)) + rng.random(len(blocks))) / len(blocks)
    targets = 1 + 84 * u**2
    mpp_order = rng.permutation([float(mpps[i % len(mpps)]) for i in range(n)])
    specs: list[CellSpec] = []
    for pat, count in enumerate(blocks):
        for _ in range(count):
            target = targets[pat] * (rng.uniform(0.85, 1.15) if count > 1 else 1.0)
            params = CellSlide(
                seed=int(rng.integers(2**31)), stil_target=round(float(min(target, 86)), 3),
                tumour_fraction=round(float(rng.uniform(*cfg["tumour"])), 3),
                intratumoral=round(float(rng.uniform(*cfg["intratumoral"])), 3),
                stain_spread=cfg["stain_spread"], artefacts=cfg["artefacts"], necrosis=cfg["necrosis"],
                size_um=tuple(float(s) for s in size_um),
                hyperchromatic=round(float(dark_rng.uniform(*cfg["hyperchromatic"])), 3)
                if "hyperchromatic" in cfg else 0.0)
            specs.append(CellSpec(f"{prefix}-{len(specs):03d}", f"{prefix}-PAT-{pat:03d}",
                                  float(mpp_order[len(specs)]), params, int(rng.integers(2**31))))
    return specs


def write_slide(spec: CellSpec, slide_path, truth_path) -> tuple[float, float]:
    """Render and write one slide and its truth; returns (true sTIL%, the pathologist's label)."""
    from weakstil.synth.truth import write_truth
    from weakstil.wsi.writer import write_aperio_tiff

    scene = make_scene(spec.params)
    p = scene.params
    rng = np.random.default_rng([p.seed, 3])
    stain = optics.draw_stain(rng, p.stain_spread)
    scanner = optics.draw_scanner(rng, spec.mpp, hard=p.stain_spread > 1)
    rgb = optics.render(scene.amounts, scene.cells, stain, scanner, p.size_um, spec.mpp)
    write_aperio_tiff(slide_path, rgb, spec.mpp, quality=scanner.jpeg_quality, maxworkers=1)
    truth = scene_truth(scene)
    label = pathologist_label(np.random.default_rng(spec.label_seed), float(truth["stil"]))
    truth["label"] = np.float64(label)
    write_truth(truth_path, truth, slide_mpp=spec.mpp, plan=repr(spec))
    return float(truth["stil"]), label
