"""Stain and scanner: Beer-Lambert colour with per-slide stain vectors and uneven staining, folds,
pen marks; then defocus, field vignetting with seams, illumination, resampling to the scan mpp,
sensor noise and the JPEG quality."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from .geometry import cov, poly_mask, random_walk, smooth_noise, stamp_disks, star_polygon
from .params import GLASS, RU


def _stain_vectors(rng, sv):
    """H, E and red-cell OD vectors: Macenko-like defaults + N(0, 0.045·sv) (red 0.03), unit length."""
    hv = np.array([0.5626, 0.7201, 0.4062]) + rng.normal(0, 0.045 * sv, 3)
    ev = np.array([0.2159, 0.8012, 0.5581]) + rng.normal(0, 0.045 * sv, 3)
    rv = np.array([0.16, 0.78, 0.60]) + rng.normal(0, 0.03, 3)
    return [np.abs(v) / np.linalg.norm(v) for v in (hv, ev, rv)]


def _fold(rng, cv, sc, tis_f, OD, plan):
    """Fold (7 %, hard 20 %): a star-polygon band in tissue whose OD is up to doubled."""
    if rng.random() < (0.2 if cv.hard else 0.07):
        ys_t, xs_t = np.nonzero(sc.tissue[::16, ::16])
        k = rng.integers(0, len(ys_t))
        xs_, ys_ = star_polygon(rng, xs_t[k] * 16 * RU, ys_t[k] * 16 * RU, rng.uniform(120, 300),
                                rng.uniform(12, 35), rough=0.1)
        band = poly_mask(xs_, ys_, cv.shape).astype(np.float32) * tis_f
        band = ndi.gaussian_filter(band, 2.0)
        OD *= (1 + 0.8 * band)[..., None]
        plan["fold"] = True


def _pen(rng, cv, OD, plan):
    """Pen mark (8 %, hard 25 %): a broad random-walk stroke, green, blue or black."""
    if rng.random() < (0.25 if cv.hard else 0.08):
        pen = np.array([[0.9, 0.25, 0.75], [1.0, 0.55, 0.1], [0.9, 0.9, 0.9]])[rng.integers(0, 3)]
        ps = np.full(cv.shape, 1e3, np.float32)
        xs, ys, rs = random_walk(rng, rng.uniform(0, cv.Wu), rng.uniform(0, cv.Hu), rng.uniform(0, 6.3),
                                 int(rng.integers(20, 80)), 8.0, 0.1, rng.uniform(15, 40), 10, 45, 1.0)
        stamp_disks(ps, xs, ys, rs, margin=10)
        pm = cov(ps, 8.0) * rng.uniform(0.5, 1.3)
        OD += pm[..., None] * pen.astype(np.float32)
        plan["pen"] = True


def stain(rng, cv, sc, ly, plan):
    """Transmitted fraction (H, W, 3): OD = H·h + E·e + R·r + background + tissue tint, with lognormal
    H / E intensities (10 % faded, 10 % over-stained), smooth multiplicative H and E fields, fold, pen."""
    sv = 2.0 if cv.hard else 1.0
    hv, ev, rv = _stain_vectors(rng, sv)
    hs = float(np.exp(rng.normal(0, 0.15 * sv)))
    es = float(np.exp(rng.normal(0, 0.18 * sv)))
    style = rng.random()
    if style < 0.1:
        hs *= 0.6
        es *= 0.75  # faded
        plan["stain_style"] = "faded"
    elif style < 0.2:
        hs *= 1.45
        es *= 1.2  # over-stained
        plan["stain_style"] = "overstained"
    hfield = np.exp(0.12 * sv * smooth_noise(rng, cv.shape, (4, 5)))
    efield = np.exp(0.12 * sv * smooth_noise(rng, cv.shape, (4, 5)))
    Hs = ly.Hd * hs * hfield
    Es = ly.Ed * es * efield
    Rs = ly.Rd * rng.uniform(0.9, 1.6)
    bg = np.array([0.04, 0.05, 0.07]) * rng.uniform(0.5, 1.5) + rng.normal(0, 0.01, 3)
    tint = np.array([0.02, 0.04, 0.08]) * rng.uniform(0, 1)  # yellowish mounting medium on tissue
    tis_f = (sc.lab != GLASS).astype(np.float32)
    OD = (Hs[..., None] * hv + Es[..., None] * ev + Rs[..., None] * rv
          + bg.astype(np.float32) + tis_f[..., None] * tint.astype(np.float32)).astype(np.float32)
    _fold(rng, cv, sc, tis_f, OD, plan)
    _pen(rng, cv, OD, plan)
    return np.exp(-OD)  # transmitted fraction


def scan(rng, cv, img, mpp):
    """Scanner: variable defocus (mild blur blended with a 0.4-1.0 µm σ blur, hard ×1.6, by a smooth
    weight map), field vignetting with per-field gain (fields 220-380 µm: seams), illumination 238-252,
    resampling to ``mpp`` (bicubic up, Lanczos down), Gaussian sensor noise (σ 1-2.5, hard ×1.6).
    Returns the uint8 RGB image and the JPEG quality (80-92, hard 65-85)."""
    hard = cv.hard
    sv = 2.0 if hard else 1.0
    H, W = cv.shape
    blur_max = (1.6 if hard else 1.0) * rng.uniform(0.4, 1.0)
    bw = np.clip(0.5 + 0.6 * smooth_noise(rng, cv.shape, (3, 3)), 0, 1)
    blurred = ndi.gaussian_filter(img, (blur_max / RU, blur_max / RU, 0))
    mild = ndi.gaussian_filter(img, (0.3 / RU, 0.3 / RU, 0))
    img = mild * (1 - bw[..., None]) + blurred * bw[..., None]
    del blurred, mild
    field = rng.uniform(220, 380)
    vig = rng.uniform(0.015, 0.04) * (1.6 if hard else 1)
    fx = ((np.arange(W) + 0.5) * RU % field) / field - 0.5
    fy = ((np.arange(H) + 0.5) * RU % field) / field - 0.5
    ix = ((np.arange(W) + 0.5) * RU // field).astype(int)
    iy = ((np.arange(H) + 0.5) * RU // field).astype(int)
    ngx, ngy = ix.max() + 1, iy.max() + 1
    fgain = 1 + rng.normal(0, 0.007 * sv, (ngy, ngx, 3))
    gain = (1 - vig * (fx[None, :] ** 2 + fy[:, None] ** 2) * 2)[..., None] * fgain[iy][:, ix]
    I0 = rng.uniform(238, 252)
    img = np.clip(img * gain * I0, 0, 255).astype(np.uint8)
    Wo, Ho = round(cv.Wu / mpp), round(cv.Hu / mpp)
    out = np.asarray(Image.fromarray(img).resize((Wo, Ho), Image.BICUBIC if mpp < RU else Image.LANCZOS))
    noise_sd = rng.uniform(1.0, 2.5) * (1.6 if hard else 1)
    out = np.clip(out.astype(np.float32) + rng.standard_normal(out.shape, dtype=np.float32) * noise_sd, 0, 255)
    out = out.astype(np.uint8)
    q = int(rng.integers(65, 86)) if hard else int(rng.integers(80, 93))
    return out, q
