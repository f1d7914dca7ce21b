"""Optics of the ``cells`` family: nuclear shapes, the stain in optical-density space, the scanner.

A scene hands over hematoxylin and eosin *amounts* (dimensionless densities) on a 1-µm grid, an
artefact OD layer (pen ink) and its cells as centres in µm. :func:`render` draws each nucleus at the
scan's µm/px from a bank of shapes per cell type, mixes the amounts with the slide's own stain
vectors and intensities (Beer–Lambert: ``I = I0 · exp(-Σ c_k · v_k)``), then applies what a scanner
adds: optical blur, sensor noise and a per-field gain (the seams between camera fields).
JPEG compression happens in the TIFF writer at the slide's quality.

Written independently of :mod:`weakstil.synth.lattice`; nothing here is shared with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

# Reference stain vectors in OD space (Macenko et al. 2009), unit length.
REF_H = np.array([0.5626, 0.7201, 0.4062])
REF_E = np.array([0.2159, 0.8012, 0.5581])
PEN_INKS = {"green": (0.85, 0.25, 0.65), "blue": (0.95, 0.55, 0.15), "black": (1.0, 1.0, 0.95)}
BANK_SIZE = {"tumour": 64, "tumour_dark": 64, "lymph": 24, "fibro": 32, "debris": 16}
FIBRO_ANGLES = 16  # fibroblast bank: variant k points at k·π/16 (two lengths per angle)


@dataclass(frozen=True)
class Stain:
    """A slide's stain: unit OD vectors and amounts per stain, and the light behind the glass (RGB)."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    h_gain: float
    e_gain: float
    light: np.ndarray  # (3,) 0-255


@dataclass(frozen=True)
class Scanner:
    """What the scanner does to a slide: blur (µm), noise (grey levels), camera fields and their gains,
    JPEG quality."""

    blur_um: float
    noise: float
    field_um: tuple[float, float]
    field_gain_sd: float
    jpeg_quality: int
    seed: int


def draw_stain(rng: np.random.Generator, spread: float = 1.0) -> Stain:
    """Per-slide stain vectors (rotated away from the reference) and intensities; ``spread`` = 2
    doubles every deviation (the hard setting)."""

    def tilt(ref: np.ndarray) -> np.ndarray:
        v = np.clip(ref + rng.normal(0, 0.06 * spread, 3), 0.02, None)
        return v / np.linalg.norm(v)

    gains = np.exp(rng.normal(0, 0.16 * spread, 2))
    light = 242 + rng.uniform(-5, 5) * spread + rng.normal(0, 2.0 * spread, 3)
    return Stain(tilt(REF_H), tilt(REF_E), float(gains[0]), float(gains[1]), np.clip(light, 180, 255))


def draw_scanner(rng: np.random.Generator, mpp: float, *, hard: bool) -> Scanner:
    """Scanner settings of one slide (blur grows a little in the hard setting)."""
    return Scanner(
        blur_um=float(rng.uniform(0.15, 0.9 if hard else 0.55)),
        noise=float(rng.uniform(0.5, 3.0)),
        field_um=(float(rng.uniform(350, 800)), float(rng.uniform(300, 700))),
        field_gain_sd=float(rng.uniform(0.004, 0.03 if hard else 0.015)),
        jpeg_quality=int(rng.integers(65 if hard else 75, 96)),
        seed=int(rng.integers(2**31)),
    )


# --- nuclear shapes -------------------------------------------------------------------------------
def _shape_params(kind: str) -> list[dict]:
    """Fixed random shapes per cell type (a bank, the same for every slide and resolution)."""
    rng = np.random.default_rng({"tumour": 11, "lymph": 12, "fibro": 13, "debris": 14, "tumour_dark": 15}[kind])
    out = []
    for k in range(BANK_SIZE[kind]):
        if kind == "tumour":  # large, pleomorphic, vesicular chromatin, nucleolus
            major = rng.uniform(9.0, 17.5)
            out.append(dict(major=major, minor=major * rng.uniform(0.6, 0.95), angle=rng.uniform(0, np.pi),
                            wobble=rng.uniform(0.0, 0.14, 3), rim=True,
                            nucleoli=rng.integers(0, 3), speckle=0.25))
        elif kind == "tumour_dark":  # large, pleomorphic, hyperchromatic: solid coarse chromatin
            major = rng.uniform(9.0, 17.5)
            out.append(dict(major=major, minor=major * rng.uniform(0.6, 0.95), angle=rng.uniform(0, np.pi),
                            wobble=rng.uniform(0.0, 0.14, 3), rim=False, nucleoli=0, speckle=0.3))
        elif kind == "lymph":  # small, round, dense
            d = rng.uniform(5.6, 7.0)
            out.append(dict(major=d, minor=d * rng.uniform(0.9, 1.0), angle=rng.uniform(0, np.pi),
                            wobble=rng.uniform(0, 0.04, 3), rim=False, nucleoli=0, speckle=0.08))
        elif kind == "fibro":  # spindles along the stroma's fibre direction
            out.append(dict(major=(15.0, 21.0)[k % 2], minor=rng.uniform(2.2, 3.2),
                            angle=(k // 2) * np.pi / FIBRO_ANGLES, wobble=np.zeros(3), rim=False,
                            nucleoli=0, speckle=0.1, spindle=True))
        else:  # karyorrhectic debris in necrosis
            d = rng.uniform(1.5, 3.8)
            out.append(dict(major=d, minor=d * rng.uniform(0.5, 1.0), angle=rng.uniform(0, np.pi),
                            wobble=rng.uniform(0, 0.25, 3), rim=False, nucleoli=0, speckle=0.2))
    return out


def _shape_kernel(p: dict, px_um: float, rng: np.random.Generator) -> np.ndarray:
    """One nucleus as a hematoxylin amount per pixel (3×3 supersampled)."""
    half = p["major"] / 2 * (1 + float(np.sum(p["wobble"]))) + px_um
    r = int(np.ceil(half / px_um))
    sub = (np.arange(3) + 0.5) / 3 - 0.5
    axis = (np.arange(-r, r + 1)[:, None] + sub[None, :]).ravel() * px_um
    y, x = np.meshgrid(axis, axis, indexing="ij")
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    u, v = x * c + y * s, -x * s + y * c
    phi = np.arctan2(v, u)
    edge = 1 + sum(w * np.cos((k + 2) * phi + k) for k, w in enumerate(p["wobble"]))
    minor = p["minor"] / 2
    if p.get("spindle"):  # tapering toward both ends
        minor = minor * np.sqrt(np.clip(1 - (2 * u / p["major"]) ** 2, 0, 1)) + 1e-3
        rho = np.maximum(np.abs(2 * u / p["major"]), np.abs(v) / minor)
    else:
        rho = np.hypot(2 * u / p["major"], v / minor) / edge
    amount = np.where(rho <= 1, 1.0, 0.0)
    if p["rim"]:  # vesicular: chromatin along the membrane, pale centre
        amount = amount * (0.45 + 0.55 * np.clip(rho, 0, 1) ** 4)
    amount = amount * (1 + p["speckle"] * rng.standard_normal(amount.shape))
    for _ in range(int(p["nucleoli"])):
        cx, cy = rng.uniform(-0.25, 0.25, 2) * p["minor"]
        amount = np.where((np.hypot(u - cx, v - cy) < 1.0) & (rho < 1), 1.5, amount)
    n = 2 * r + 1
    return np.clip(amount, 0, 2).reshape(n, 3, n, 3).mean(axis=(1, 3)).astype(np.float32)


@lru_cache(maxsize=16)
def kernel_bank(kind: str, px_um: float) -> tuple[np.ndarray, ...]:
    """The bank of nuclei of ``kind`` drawn at ``px_um`` µm per pixel."""
    rng = np.random.default_rng(99)
    return tuple(_shape_kernel(p, px_um, rng) for p in _shape_params(kind))


def stamp_nuclei(canvas: np.ndarray, xy_um: np.ndarray, variant: np.ndarray, strength: np.ndarray,
                 kind: str, px_um: float) -> None:
    """Draw nuclei into ``canvas`` (hematoxylin amount x 100, uint8) by taking the maximum."""
    bank = kernel_bank(kind, px_um)
    h, w = canvas.shape
    cols = np.rint(xy_um[:, 0] / px_um).astype(np.int64)
    rows = np.rint(xy_um[:, 1] / px_um).astype(np.int64)
    scaled = [np.minimum(k * 100, 255) for k in bank]
    for row, col, var, amt in zip(rows.tolist(), cols.tolist(), variant.tolist(), strength.tolist()):
        kern = scaled[var]
        r = kern.shape[0] // 2
        y0, x0 = row - r, col - r
        ky0, kx0 = max(0, -y0), max(0, -x0)
        y1, x1 = min(h, y0 + kern.shape[0]), min(w, x0 + kern.shape[1])
        if y1 <= max(y0, 0) or x1 <= max(x0, 0):
            continue
        patch = kern[ky0 : ky0 + y1 - max(y0, 0), kx0 : kx0 + x1 - max(x0, 0)] * amt
        view = canvas[max(y0, 0) : y1, max(x0, 0) : x1]
        np.maximum(view, np.minimum(patch, 255).astype(np.uint8), out=view)


# --- the picture ----------------------------------------------------------------------------------
def _resample_band(field: np.ndarray, width_px: int, y0: int, y1: int, px_um: float) -> np.ndarray:
    """Rows ``y0:y1`` (at ``px_um``) of a 1-µm field, bilinear."""
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    box = (0.0, y0 * px_um, width_px * px_um, y1 * px_um)
    return np.asarray(img.resize((width_px, y1 - y0), Image.BILINEAR, box=box), dtype=np.float32)


def _field_gains(scanner: Scanner, shape_px: tuple[int, int], px_um: float) -> tuple[np.ndarray, ...]:
    """Per-camera-field RGB gains and each pixel column's / row's field index."""
    rng = np.random.default_rng(scanner.seed)
    fw, fh = (max(1, round(f / px_um)) for f in scanner.field_um)
    nx, ny = shape_px[1] // fw + 1, shape_px[0] // fh + 1
    gains = (1 + rng.normal(0, scanner.field_gain_sd, (ny, nx, 3))).astype(np.float32)
    return gains, np.arange(shape_px[1]) // fw, np.arange(shape_px[0]) // fh


def render(amounts: dict, cells: dict, stain: Stain, scanner: Scanner, size_um: tuple[float, float],
           mpp: float) -> np.ndarray:
    """The slide at ``mpp`` µm/px as (H, W, 3) uint8 RGB.

    ``amounts``: 1-µm fields ``h``, ``e`` (stain amounts), ``pen`` (ink amount) and ``pen_ink`` (3,);
    ``cells``: kind → (xy_um, variant, strength), drawn in dict order (later kinds on top).
    """
    shape = (round(size_um[1] / mpp), round(size_um[0] / mpp))
    nuclei = np.zeros(shape, np.uint8)
    for kind, (xy, variant, strength) in cells.items():
        stamp_nuclei(nuclei, xy, variant, strength, kind, mpp)
    gains, fx, fy = _field_gains(scanner, shape, mpp)
    noise_rng = np.random.default_rng(scanner.seed + 1)
    h_vec = (stain.h_vec * stain.h_gain).astype(np.float32)
    e_vec = (stain.e_vec * stain.e_gain).astype(np.float32)
    ink = np.asarray(amounts["pen_ink"], np.float32)
    rgb = np.empty(shape + (3,), np.uint8)
    for y0 in range(0, shape[0], 512):
        y1 = min(y0 + 512, shape[0])
        nuc = nuclei[y0:y1].astype(np.float32) / 100
        h = _resample_band(amounts["h"], shape[1], y0, y1, mpp) + nuc
        e = _resample_band(amounts["e"], shape[1], y0, y1, mpp) * (1 - 0.6 * np.minimum(nuc, 1))
        od = h[..., None] * h_vec + e[..., None] * e_vec
        if amounts["pen"].any():
            od += _resample_band(amounts["pen"], shape[1], y0, y1, mpp)[..., None] * ink
        band = np.exp(-od) * stain.light.astype(np.float32)
        band *= gains[fy[y0:y1][:, None], fx[None, :]]
        band += noise_rng.standard_normal(band.shape, dtype=np.float32) * np.float32(scanner.noise)
        rgb[y0:y1] = np.clip(band + 0.5, 0, 255).astype(np.uint8)
    sigma_px = scanner.blur_um / mpp
    if sigma_px > 0.3:
        rgb = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(sigma_px)))
    return rgb
