"""Synthetic H&E cohorts with known stromal TIL% (demo, tests, trying the tool).

A slide is a *scene in micrometres*: class maps (tissue, tumour, stroma, fat) and hematoxylin/eosin
density fields on a 1-µm grid, plus nuclei as centres in µm. :func:`render_scene` rasterises it at
any µm/px (stain densities → RGB by Beer–Lambert), so one scene written at 0.25 and at 0.5 µm/px is
the same picture. Ground truth comes from the scene's rendered cells, never from the target sTIL%.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from weakstil.errors import ConfigError
from weakstil.progress import progress as progress_display
from weakstil.synth.truth import TRUTH_UM, load_truth, stil_from_truth, tile_truth  # noqa: F401 (re-exported)
from weakstil.synth.truth import atomic_open as _atomic
from weakstil.wsi.writer import write_aperio_tiff

FINE_UM = 1.0  # µm per cell of the scene grid
DEFAULT_SIZE_UM = (2000.0, 1600.0)  # canvas (width, height): ~4000 x 3200 px at 0.5 µm/px
_H_OD = np.array([0.65, 0.70, 0.29])  # hematoxylin optical density per RGB channel (Ruifrok)
_E_OD = np.array([0.10, 0.95, 0.30])  # eosin
_KINDS = ("tumour", "fibro", "lymph")  # stamping order; lymphocytes drawn last (on top)


@dataclass(frozen=True)
class SlideParams:
    """What a synthetic slide is made from; all the rest follows from ``seed``."""

    seed: int
    stil_target: float = 20.0  # slide sTIL% aimed at (0-100); the label is measured from the scene
    size_um: tuple[float, float] = DEFAULT_SIZE_UM  # canvas (width, height), rounded to 16 µm
    # The "hard" setting (None / 1.0: the standard slide, drawn exactly as before these existed):
    tumour_share: float | None = None  # share of the tissue that is tumour (standard: 0.2-0.45)
    intratumoral: float | None = None  # lymphocyte cover inside tumour, independent of sTIL
    stain_scale: float = 1.0  # multiplies the per-slide deviation of the stain colours


@dataclass(frozen=True)
class SlideSpec:
    """One slide of a planned cohort."""

    slide_id: str
    patient_id: str
    mpp: float
    params: SlideParams


@dataclass
class Nuclei:
    """Cell nuclei of one kind: centres in µm, kernel-bank variant, hematoxylin strength."""

    xy_um: np.ndarray  # (N, 2) float (x, y)
    variant: np.ndarray  # (N,) int
    strength: np.ndarray  # (N,) float32


@dataclass
class Scene:
    """A slide in µm: masks and densities on the FINE_UM grid (rows = y), nuclei, stain."""

    params: SlideParams
    tissue: np.ndarray
    tumour: np.ndarray
    fat: np.ndarray
    stroma: np.ndarray
    h_base: np.ndarray  # hematoxylin density without nuclei
    e_base: np.ndarray  # eosin density
    nuclei: dict[str, Nuclei]
    stain: np.ndarray  # (3, 3): rows light (0-255), hematoxylin OD, eosin OD per RGB channel

    @property
    def size_um(self) -> tuple[float, float]:
        return self.tissue.shape[1] * FINE_UM, self.tissue.shape[0] * FINE_UM


# --- small geometry helpers ---------------------------------------------------------------------
def canvas_um(size_um: tuple[float, float]) -> tuple[float, float]:
    """Canvas (width, height) in µm, rounded to whole truth-map cells."""
    w, h = (max(1, round(s / TRUTH_UM)) * TRUTH_UM for s in size_um)
    return w, h


def _resize(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resample of a float field covering the same physical box to ``shape`` (h, w)."""
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_um: float) -> np.ndarray:
    """Smooth Gaussian noise on the fine grid with features of about ``scale_um``; mean 0, sd ~1."""
    step = max(1, round(scale_um / 4 / FINE_UM))
    coarse = rng.standard_normal((shape[0] // step + 2, shape[1] // step + 2))
    coarse = ndimage.gaussian_filter(coarse, 1.5)
    coarse /= coarse.std() + 1e-9
    up = _resize(coarse, (coarse.shape[0] * step, coarse.shape[1] * step))
    return up[: shape[0], : shape[1]]


def _jittered_grid(rng, size_um, spacing_um: float, jitter: float) -> np.ndarray:
    """Hexagonal grid of points over the canvas, each moved by up to ``jitter`` x spacing."""
    ys = np.arange(spacing_um / 2, size_um[1], spacing_um * 0.866)
    xs = np.arange(0, size_um[0] + spacing_um, spacing_um)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing_um / 2
    xy = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-1, 1, (gx.size, 2)) * jitter * spacing_um
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < size_um[0]) & (xy[:, 1] >= 0) & (xy[:, 1] < size_um[1])
    return xy[inside]


def _at(mask: np.ndarray, xy_um: np.ndarray) -> np.ndarray:
    """Values of a fine-grid map at points in µm."""
    ix = np.clip((xy_um[:, 0] / FINE_UM).astype(int), 0, mask.shape[1] - 1)
    iy = np.clip((xy_um[:, 1] / FINE_UM).astype(int), 0, mask.shape[0] - 1)
    return mask[iy, ix]


def _block_mean(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape
    return a.reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


# --- nucleus kernels ------------------------------------------------------------------------------
def _variants(kind: str) -> list[tuple[float, float, float, str, tuple[float, float] | None]]:
    """Fixed nucleus shapes per kind: (major µm, minor µm, angle rad, profile, nucleolus offset)."""
    rng = np.random.default_rng({"lymph": 1, "tumour": 2, "fibro": 3}[kind])
    if kind == "lymph":  # small round dense nuclei, ~7 µm
        return [(d * a, d, rng.uniform(0, np.pi), "flat", None)
                for d, a in zip(np.linspace(6.4, 7.4, 6), rng.uniform(1.0, 1.12, 6))]
    if kind == "tumour":  # large, oval, pale vesicular with a nucleolus
        return [(rng.uniform(11, 14.5), rng.uniform(8.5, 10.5), rng.uniform(0, np.pi), "vesicular",
                 tuple(rng.uniform(-1.5, 1.5, 2))) for _ in range(16)]
    return [(13.0, 2.6, k * np.pi / 12, "flat", None) for k in range(12)]  # fibroblasts


@lru_cache(maxsize=32)
def _kernel_bank(kind: str, px_um: float) -> tuple[np.ndarray, ...]:
    """Anti-aliased nucleus kernels (odd squares, values ~0-1.4) at ``px_um`` µm per pixel."""
    kernels = []
    for major, minor, angle, profile, nucleolus in _variants(kind):
        r = int(np.ceil(major / 2 / px_um)) + 1
        sub = (np.arange(4) + 0.5) / 4 - 0.5
        grid = (np.arange(-r, r + 1)[:, None] + sub[None, :]).ravel() * px_um
        y, x = np.meshgrid(grid, grid, indexing="ij")
        u = x * np.cos(angle) + y * np.sin(angle)
        v = -x * np.sin(angle) + y * np.cos(angle)
        rho2 = (2 * u / major) ** 2 + (2 * v / minor) ** 2
        value = np.ones_like(rho2) if profile == "flat" else 0.5 + 0.5 * rho2**2
        if nucleolus is not None:
            value = np.where(np.hypot(x - nucleolus[0], y - nucleolus[1]) < 0.9, 1.5, value)
        value = np.where(rho2 <= 1, value, 0.0)
        n = 2 * r + 1
        kernels.append(value.reshape(n, 4, n, 4).mean(axis=(1, 3)).astype(np.float32))
    return tuple(kernels)


def _stamp(canvas: np.ndarray, nuclei: Nuclei, kind: str, px_um: float, pad: int,
           scale: float = 1.0) -> None:
    """Draw nuclei (strength x ``scale``) into ``canvas``, padded by ``pad`` px, by taking the maximum."""
    flat = canvas.reshape(-1)
    width = canvas.shape[1]
    col = (nuclei.xy_um[:, 0] / px_um).astype(np.int64) + pad
    row = (nuclei.xy_um[:, 1] / px_um).astype(np.int64) + pad
    for k, kernel in enumerate(_kernel_bank(kind, px_um)):
        sel = np.flatnonzero(nuclei.variant == k)
        r = kernel.shape[0] // 2
        dy, dx = np.nonzero(kernel > 0.02)
        offsets = (dy - r) * width + (dx - r)
        values = kernel[dy, dx] * np.float32(scale)
        for start in range(0, sel.size, 2048):
            part = sel[start : start + 2048]
            idx = (row[part] * width + col[part])[:, None] + offsets[None, :]
            val = nuclei.strength[part, None] * values
            if canvas.dtype == np.uint8:
                val = np.minimum(val + 0.5, 255).astype(np.uint8)
            np.maximum.at(flat, idx.ravel(), val.ravel())


def _pad_px(px_um: float) -> int:
    return max(k.shape[0] // 2 for kind in _KINDS for k in _kernel_bank(kind, px_um))


# --- the scene ------------------------------------------------------------------------------------
def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """An irregular blob covering ~60-70% of the canvas, with a few holes (tears)."""
    step = 4  # fine cells per cell of the coarse blob grid
    h, w = -(-shape[0] // step), -(-shape[1] // step)
    v, u = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (u + 0.5) / w * 2 - 1, (v + 0.5) / h * 2 - 1
    theta = np.arctan2(v, u)
    radius = 0.9 + sum(rng.uniform(-0.06, 0.06) * np.cos(k * theta + rng.uniform(0, 6.3))
                        for k in (2, 3, 5))
    blob = radius - np.hypot(u, v) - 0.07 * _noise(rng, (h, w), min(h, w) / 5)
    blob = np.minimum(blob, 0.93 - np.maximum(abs(u), abs(v)))  # keep a background margin
    n_holes = rng.integers(0, 2 + round(shape[0] * shape[1] * FINE_UM**2 / 1.5e6))
    for _ in range(n_holes):
        cx, cy = rng.uniform(-0.5, 0.5, 2)
        r = rng.uniform(15, 60) / FINE_UM / step * 2 / w
        hole = np.hypot(u - cx, (v - cy) * h / w) / r + 0.25 * _noise(rng, (h, w), 3)
        blob = np.minimum(blob, hole - 1)
    fine = _resize(blob, (h * step, w * step))[: shape[0], : shape[1]]
    return fine > 0


def _compartments(rng, tissue: np.ndarray, tumour_share: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tumour nests, fat lobules and stroma (the rest of the tissue)."""
    nests = _noise(rng, tissue.shape, rng.uniform(90, 160))
    fat_field = _noise(rng, tissue.shape, rng.uniform(250, 400))
    sample = (slice(None, None, 4), slice(None, None, 4))
    in_tissue = tissue[sample]
    if not in_tissue.any():
        empty = np.zeros_like(tissue)
        return empty, empty, empty
    share = rng.uniform(0.2, 0.45)
    share = share if tumour_share is None else tumour_share
    tumour = tissue & (nests > np.quantile(nests[sample][in_tissue], 1 - share))
    fat_share = rng.uniform(0.0, 0.2)
    fat = tissue & ~tumour & (fat_field > np.quantile(fat_field[sample][in_tissue], 1 - fat_share))
    return tumour, fat, tissue & ~tumour & ~fat


def _stroma_eosin(rng, shape: tuple[int, int]):
    """Fibrous eosin texture (wavy collagen bundles) and a function giving the fibre angle at points."""
    y, x = np.ogrid[0 : shape[0], 0 : shape[1]]
    x, y = x.astype(np.float32) * FINE_UM, y.astype(np.float32) * FINE_UM
    warp = 2.5 * _noise(rng, shape, 30)
    angles = rng.uniform(0, np.pi) + np.array([0, np.pi / 3])
    mix = np.clip(0.5 + 0.6 * _noise(rng, shape, 250), 0, 1)
    k = np.float32(2 * np.pi / 7.0)  # one bundle every 7 µm
    fibres = [0.5 + 0.5 * np.sin(x * np.float32(k * np.cos(a)) + y * np.float32(k * np.sin(a)) + warp)
              for a in angles]
    fibres = (mix * fibres[0] + (1 - mix) * fibres[1]) ** 2
    breaks = np.clip(0.7 + 0.5 * _noise(rng, shape, 10), 0, 1)

    def fibre_angle(xy_um: np.ndarray) -> np.ndarray:
        return np.where(_at(mix, xy_um) > 0.5, angles[0], angles[1]) + np.pi / 2

    return 0.45 + 0.75 * fibres * breaks, fibre_angle


def _fat_borders(rng, fat: np.ndarray) -> np.ndarray:
    """Thin borders of adipocytes (Voronoi cells of ~70 µm) inside the fat lobules."""
    out = np.zeros_like(fat)
    ys, xs = np.nonzero(fat)
    if ys.size == 0:
        return out
    box = slice(max(ys.min() - 2, 0), ys.max() + 3), slice(max(xs.min() - 2, 0), xs.max() + 3)
    sub = fat[box]
    seeds = _jittered_grid(rng, (sub.shape[1] * FINE_UM, sub.shape[0] * FINE_UM), rng.uniform(55, 85), 0.3)
    free = np.ones(sub.shape, bool)
    free[(seeds[:, 1] / FINE_UM).astype(int), (seeds[:, 0] / FINE_UM).astype(int)] = False
    iy, ix = ndimage.distance_transform_edt(free, return_distances=False, return_indices=True)
    label = iy.astype(np.int64) * sub.shape[1] + ix
    edge = np.zeros_like(sub)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    out[box] = (ndimage.binary_dilation(edge) | (sub ^ ndimage.binary_erosion(sub, iterations=2))) & sub
    return out


def _lymph_centres(rng, scene_maps: dict, stil_target: float) -> np.ndarray:
    """Lymphocyte centres (µm): a Poisson process whose stromal coverage averages the target.

    The intensity varies over the slide (hot spots times a gradient) so tile-level sTIL% varies.
    """
    stroma, tumour, fat = scene_maps["stroma"], scene_maps["tumour"], scene_maps["fat"]
    cell = 8  # fine cells per density cell
    h, w = stroma.shape[0] // cell, stroma.shape[1] // cell
    hot = _noise(rng, (h, w), rng.uniform(200, 400) / cell)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, w)[None, :] * np.cos(angle) + np.linspace(-1, 1, h)[:, None] * np.sin(angle)
    mod = np.exp(rng.uniform(0.5, 1.1) * hot + rng.uniform(0, 0.8) * ramp)
    weight = _block_mean(stroma[: h * cell, : w * cell], cell)
    target = min(max(stil_target, 0.0), 92.0) / 100
    if weight.sum() == 0 or target == 0:
        return np.zeros((0, 2))
    lo, hi = 0.0, 50.0
    for _ in range(40):  # bisection: mean stromal coverage 1 - exp(-L m) = target
        mid = (lo + hi) / 2
        cover = (weight * -np.expm1(-mid * mod)).sum() / weight.sum()
        lo, hi = (mid, hi) if cover < target else (lo, mid)
    disc_um2 = np.pi * 3.5**2
    counts = rng.poisson(lo * mod * (cell * FINE_UM) ** 2 / disc_um2)
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    corner = np.stack([ix, iy], 1).repeat(reps, axis=0) * cell * FINE_UM
    xy = corner + rng.uniform(0, cell * FINE_UM, (reps.sum(), 2))
    keep_p = np.where(_at(stroma, xy), 1.0, np.where(_at(tumour, xy), 0.06, np.where(_at(fat, xy), 0.02, 0)))
    return xy[rng.random(len(xy)) < keep_p]


def _nuclei(rng, kind: str, xy_um: np.ndarray, strength: tuple[float, float],
            variant: np.ndarray | None = None) -> Nuclei:
    n = len(xy_um)
    if variant is None:
        variant = rng.integers(0, len(_variants(kind)), n)
    return Nuclei(xy_um, variant, rng.uniform(*strength, n).astype(np.float32))


def make_scene(params: SlideParams) -> Scene:
    """Build the µm scene of a slide: compartments, stain densities, nuclei and stain colours."""
    rng = np.random.default_rng(params.seed)
    w_um, h_um = canvas_um(params.size_um)
    shape = (round(h_um / FINE_UM), round(w_um / FINE_UM))
    tissue = _tissue(rng, shape)
    tumour, fat, stroma = _compartments(rng, tissue, params.tumour_share)
    fibres, fibre_angle = _stroma_eosin(rng, shape)
    borders = _fat_borders(rng, fat)
    e_base = np.where(stroma, fibres, np.float32(0.32) * tumour + np.float32(0.02) * fat)
    e_base[borders] = 0.75
    h_base = np.float32(0.18) * tumour + np.float32(0.04) * stroma + np.float32(0.05) * borders
    maps = {"stroma": stroma, "tumour": tumour, "fat": fat}
    tum_xy = _jittered_grid(rng, (w_um, h_um), rng.uniform(13.5, 16), 0.22)
    fib_xy = rng.uniform(0, 1, (int(w_um * h_um / 900), 2)) * (w_um, h_um)
    fib_xy = fib_xy[_at(stroma, fib_xy)]
    fib_variant = np.round(fibre_angle(fib_xy) / (np.pi / 12)).astype(int) % 12
    nuclei = {
        "tumour": _nuclei(rng, "tumour", tum_xy[_at(tumour, tum_xy)], (0.55, 0.85)),
        "fibro": _nuclei(rng, "fibro", fib_xy, (0.9, 1.3), fib_variant),
        "lymph": _nuclei(rng, "lymph", _lymph_centres(rng, maps, params.stil_target), (1.5, 1.9)),
    }
    stain = _stain(rng, params.stain_scale)
    if params.intratumoral:
        extra = _intratumoral_centres(np.random.default_rng([params.seed, 1]), tumour, params.intratumoral)
        lymph = nuclei["lymph"]
        more = _nuclei(np.random.default_rng([params.seed, 2]), "lymph", extra, (1.5, 1.9))
        nuclei["lymph"] = Nuclei(np.concatenate([lymph.xy_um, more.xy_um]),
                                 np.concatenate([lymph.variant, more.variant]),
                                 np.concatenate([lymph.strength, more.strength]))
    return Scene(params, tissue, tumour, fat, stroma, h_base, e_base.astype(np.float32), nuclei, stain)


def _stain(rng, scale: float = 1.0) -> np.ndarray:
    """Light and hematoxylin/eosin OD of a slide; ``scale`` multiplies every deviation from the mean
    (1.0 draws the same colours as before the hard setting existed)."""
    light = 246 + scale * (rng.uniform(-4, 4) + rng.uniform(-2, 2, 3))
    h_dev, h_gain = rng.normal(0, 0.05, 3), rng.uniform(0.8, 1.2)
    e_dev, e_gain = rng.normal(0, 0.05, 3), rng.uniform(0.7, 1.25)
    return np.stack([
        np.clip(light, 0, 255),
        np.clip(_H_OD + scale * h_dev, 0.05, None) * max(1 + scale * (h_gain - 1), 0.3),
        np.clip(_E_OD + scale * e_dev, 0.03, None) * max(1 + scale * (e_gain - 1), 0.3),
    ])


def _intratumoral_centres(rng, tumour: np.ndarray, cover: float) -> np.ndarray:
    """Lymphocytes inside tumour nests (the hard setting's confounder): a clustered Poisson process
    with mean area cover ``cover`` over the tumour, independent of the slide's sTIL%."""
    cell = 8
    h, w = tumour.shape[0] // cell, tumour.shape[1] // cell
    weight = _block_mean(tumour[: h * cell, : w * cell], cell)
    mod = np.exp(0.8 * _noise(rng, (h, w), 300 / cell))
    rate = -np.log1p(-min(cover, 0.9)) / (np.pi * 3.5**2) * mod / mod.mean()
    counts = rng.poisson(rate * weight * (cell * FINE_UM) ** 2)
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    xy = np.stack([ix, iy], 1).repeat(reps, axis=0) * cell * FINE_UM
    xy = xy + rng.uniform(0, cell * FINE_UM, (reps.sum(), 2))
    return xy[_at(tumour, xy)]


# --- rendering and truth --------------------------------------------------------------------------
def _base_rgb(scene: Scene) -> np.ndarray:
    """Colour of the scene without nuclei on the fine grid (Beer–Lambert), (h, w, 3) uint8."""
    light, od_h, od_e = scene.stain.astype(np.float32)
    od = scene.h_base[..., None] * od_h + scene.e_base[..., None] * od_e
    return (np.exp(-od) * light + 0.5).astype(np.uint8)


def render_scene(scene: Scene, mpp: float) -> np.ndarray:
    """Rasterise a scene at ``mpp`` µm/px → (H, W, 3) uint8 RGB.

    The nucleus-free colour is resampled from the fine grid; nuclei are drawn at ``mpp`` as
    hematoxylin densities (x100, uint8) whose transmission multiplies it (Beer–Lambert).
    """
    w_um, h_um = scene.size_um
    shape = (round(h_um / mpp), round(w_um / mpp))
    pad = _pad_px(mpp)
    dens = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad), np.uint8)
    for kind in _KINDS:
        _stamp(dens, scene.nuclei[kind], kind, mpp, pad, scale=100)
    base = Image.fromarray(_base_rgb(scene))
    lut = np.rint(256 * np.exp(-np.arange(256)[:, None] / 100 * scene.stain[1])).astype(np.uint16)
    fine_per_px = (base.height / shape[0], base.width / shape[1])
    rgb = np.empty(shape + (3,), np.uint8)
    for y0 in range(0, shape[0], 256):  # bands keep the temporaries small and cached
        y1 = min(y0 + 256, shape[0])
        box = (0.0, y0 * fine_per_px[0], shape[1] * fine_per_px[1], y1 * fine_per_px[0])
        band = np.asarray(base.resize((shape[1], y1 - y0), Image.BILINEAR, box=box))
        out = lut.take(dens[pad + y0 : pad + y1, pad:-pad], axis=0)
        out *= band
        out += 128
        out >>= 8
        rgb[y0:y1] = out
    return rgb


def lymph_cover(scene: Scene) -> np.ndarray:
    """Fraction of each fine-grid cell covered by lymphocytes (the drawn discs, overlaps once)."""
    pad = _pad_px(FINE_UM)
    cover = np.zeros((scene.tissue.shape[0] + 2 * pad, scene.tissue.shape[1] + 2 * pad), np.float32)
    cells = scene.nuclei["lymph"]
    _stamp(cover, Nuclei(cells.xy_um, cells.variant, np.ones(len(cells.variant), np.float32)),
           "lymph", FINE_UM, pad)
    return np.minimum(cover[pad:-pad, pad:-pad], 1.0)


def scene_truth(scene: Scene) -> dict:
    """Ground-truth maps at TRUTH_UM (area fractions per cell) and the slide's measured sTIL%."""
    lymph = lymph_cover(scene)
    k = round(TRUTH_UM / FINE_UM)
    truth = {
        "stroma": _block_mean(scene.stroma, k),
        "lymph_in_stroma": _block_mean(lymph * scene.stroma, k),
        "tumour": _block_mean(scene.tumour, k),
        "fat": _block_mean(scene.fat, k),
        "tissue": _block_mean(scene.tissue, k),
        "um_per_px": np.float64(TRUTH_UM),
    }
    truth["stil"] = np.float64(stil_from_truth(truth))
    return truth


# --- slides and cohorts ---------------------------------------------------------------------------
def _as_params(params_or_seed: SlideParams | int) -> SlideParams:
    return params_or_seed if isinstance(params_or_seed, SlideParams) else SlideParams(int(params_or_seed))


def render_slide(params_or_seed: SlideParams | int, mpp: float) -> np.ndarray:
    """The RGB level 0 (H, W, 3) uint8 of a synthetic slide at ``mpp`` µm/px."""
    return render_scene(make_scene(_as_params(params_or_seed)), mpp)


def write_slide(path: str | Path, params_or_seed: SlideParams | int, mpp: float, *,
                truth_path: str | Path | None = None, maxworkers: int | None = 1) -> float:
    """Write an Aperio-like ``.svs`` at ``mpp`` (and its truth ``.npz``); returns the slide's sTIL%."""
    params = _as_params(params_or_seed)
    scene = make_scene(params)
    write_aperio_tiff(path, render_scene(scene, mpp), mpp, maxworkers=maxworkers)
    truth = scene_truth(scene)
    if truth_path is not None:  # ``plan`` lets a rerun recognise a finished slide
        with _atomic(Path(truth_path), "wb") as fh:
            np.savez_compressed(fh, **truth, slide_mpp=mpp, plan=np.str_(repr((params, mpp))))
    return float(truth["stil"])


def plan_cohort(n: int, seed: int = 0, *, mpps=(0.25, 0.5),
                size_um: float | tuple[float, float] = DEFAULT_SIZE_UM, prefix: str = "SYN",
                setting: str = "standard") -> list[SlideSpec]:
    """Slides, patients (~30% with two slides), scan resolutions and target sTIL% of a cohort.

    Targets are 1 + 89·u^2.2 over stratified u per patient (many low, ~40% at 30 or more); a
    patient's two slides share a target up to a little jitter. ``size_um`` is (width, height) or
    one number, the width (the height is then 4/5 of it, as in the default). Slide ids are
    ``<prefix>-000``…; patients ``PAT-000``… (``<prefix>-PAT-000``… for another prefix).
    ``setting="hard"``: tumour 10-85 % of the tissue, intratumoral lymphocytes (5-35 % cover of the
    tumour, independent of sTIL%) and twice the stain variation; the standard plan is unchanged.
    """
    from weakstil.synth import check_setting

    check_setting(setting, "lattice")
    try:
        width, height = (size_um, 0.8 * size_um) if np.ndim(size_um) == 0 else size_um
        size_um = (float(width), float(height))
        ok = n >= 1 and len(mpps) > 0 and min(mpps) > 0 and min(size_um) >= 64
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"cannot plan a cohort of n={n}, mpps={mpps}, size_um={size_um}",
                          fix="use n >= 1, positive mpps (e.g. 0.25 0.5) and sizes of at least 64 µm")
    rng = np.random.default_rng(seed)
    per_patient = []
    while sum(per_patient) < n:
        per_patient.append(2 if rng.random() < 0.3 and n - sum(per_patient) >= 2 else 1)
    u = (rng.permutation(len(per_patient)) + rng.random(len(per_patient))) / len(per_patient)
    patient_target = 1 + 89 * u**2.2
    mpp_list = rng.permutation([float(mpps[i % len(mpps)]) for i in range(n)])
    specs = []
    for p, count in enumerate(per_patient):
        for _ in range(count):
            target = patient_target[p] * np.exp(rng.normal(0, 0.12)) if count > 1 else patient_target[p]
            params = SlideParams(int(rng.integers(2**31)), round(float(min(target, 92)), 3), size_um)
            patient = f"PAT-{p:03d}" if prefix == "SYN" else f"{prefix}-PAT-{p:03d}"
            specs.append(SlideSpec(f"{prefix}-{len(specs):03d}", patient, float(mpp_list[len(specs)]),
                                   params))
    return _harden(specs, seed) if setting == "hard" else specs


def _harden(specs: list[SlideSpec], seed: int) -> list[SlideSpec]:
    """The hard setting's slide parameters, drawn from their own stream (targets stay as planned)."""
    from dataclasses import replace

    rng = np.random.default_rng([seed, 7])
    return [replace(s, params=replace(s.params, tumour_share=round(float(rng.uniform(0.10, 0.85)), 3),
                                      intratumoral=round(float(rng.uniform(0.05, 0.35)), 3),
                                      stain_scale=2.0)) for s in specs]


def _write_spec(spec: SlideSpec, root: Path) -> tuple[str, float]:
    """Write one planned slide unless the same one is already there; returns (slide_id, sTIL%)."""
    svs = root / "slides" / f"{spec.slide_id}.svs"
    truth_path = root / "truth" / f"{spec.slide_id}.npz"
    if svs.exists() and truth_path.exists():
        try:
            old = load_truth(truth_path)
        except (OSError, ValueError):
            old = {}
        if str(old.get("plan")) == repr((spec.params, spec.mpp)):
            return spec.slide_id, float(old["stil"])
    return spec.slide_id, write_slide(svs, spec.params, spec.mpp, truth_path=truth_path)


def synth_cohort(out_dir: str | Path, *, n: int = 40, seed: int = 0, mpps=(0.25, 0.5),
                 size_um: float | tuple[float, float] = DEFAULT_SIZE_UM, workers: int | None = None,
                 progress: bool = True, prefix: str = "SYN", setting: str = "standard") -> Path:
    """Write a synthetic cohort: ``slides/*.svs``, ``truth/*.npz``, ``labels.csv``; returns ``out_dir``.

    Deterministic for a seed; resumes (slides already written from the same plan are kept).
    ``workers`` processes (default: up to 2) write slides in parallel.
    """
    root = Path(out_dir)
    specs = plan_cohort(n, seed, mpps=mpps, size_um=size_um, prefix=prefix, setting=setting)
    for sub in ("slides", "truth"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    stil: dict[str, float] = {}
    with ExitStack() as stack:
        if workers > 1:  # start the workers before the progress bar starts its thread
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            futures = [pool.submit(_write_spec, spec, root) for spec in specs]
            stack.callback(lambda: [future.cancel() for future in futures])
            results = (future.result() for future in as_completed(futures))
        else:
            results = (_write_spec(spec, root) for spec in specs)
        bar = stack.enter_context(progress_display(progress))
        task = bar.add_task("synthetic slides", total=len(specs), unit="slides")
        for slide_id, value in results:
            stil[slide_id] = value
            bar.update(task, advance=1)
    _write_labels(root / "labels.csv", specs, stil)
    return root


def _write_labels(path: Path, specs: list[SlideSpec], stil: dict[str, float]) -> None:
    with _atomic(path, "w") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "patient_id", "stil"])
        writer.writerows([s.slide_id, s.patient_id, f"{stil[s.slide_id]:.3f}"] for s in specs)
