"""Stromal texture stages: TILs, granulocytes, the collagen orientation field, myxoid patches,
fibroblasts and collagen fibres. They paint optical-density layers (:class:`Layers`) and use coarse
fields on a ``CG`` µm grid (:class:`Fields`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .geometry import hardcore, poly_mask, sample_weighted, star_polygon
from .params import CG, RU, STROMA, TUMOUR
from .sprites import DIHEDRAL, make_granulocyte, make_lymph, make_spindle, paste, paste_many

NANG = 12  # orientation bins of the oriented spindle banks


@dataclass
class Layers:
    """Optical density (H, E, red-cell absorber) and cell-body coverage on the render grid."""

    Hd: np.ndarray  # haematoxylin OD
    Ed: np.ndarray  # eosin OD
    Rd: np.ndarray  # red-cell absorber OD
    Mtil: np.ndarray  # TIL body coverage (stromal placement)
    Mcell: np.ndarray  # other cell bodies (to displace collagen)
    dummy: np.ndarray  # scratch for pastes whose coverage / channel is not kept

    @classmethod
    def zeros(cls, shape):
        return cls(*(np.zeros(shape, np.float32) for _ in range(6)))


@dataclass
class Fields:
    """Masks on the render grid and coarse fields on the ``CG`` µm grid."""

    stroma: np.ndarray  # render-grid stroma mask
    stroma_area_px: float
    cshape: tuple
    f: int  # render px per coarse px
    st_c: np.ndarray  # stroma fraction per coarse px
    tum_c: np.ndarray
    d_tum: np.ndarray  # distance to tumour (µm)
    d_ves: np.ndarray  # distance to vessel lumen (µm)
    Xc: np.ndarray
    Yc: np.ndarray
    theta: np.ndarray | None = None  # collagen orientation
    myx: np.ndarray | None = None  # myxoid weight, render grid
    myx_c: np.ndarray | None = None


def coarse_fields(cv, sc):
    """Stroma fraction and distances to tumour / vessel lumen on the coarse grid (no random draws)."""
    H, W = cv.shape
    stroma = sc.lab == STROMA
    cshape = (H * RU / CG, W * RU / CG)
    cshape = (round(cshape[0]), round(cshape[1]))
    f = round(CG / RU)
    st_c = stroma.reshape(cshape[0], f, cshape[1], f).mean((1, 3))
    tum_c = (sc.lab == TUMOUR).reshape(cshape[0], f, cshape[1], f).mean((1, 3)) > 0.5
    d_tum = ndi.distance_transform_edt(~tum_c) * CG if tum_c.any() else np.full(cshape, 1e4)
    ves_c = sc.lumen.reshape(cshape[0], f, cshape[1], f).mean((1, 3)) > 0.2
    d_ves = ndi.distance_transform_edt(~ves_c) * CG if ves_c.any() else np.full(cshape, 1e4)
    Yc, Xc = np.mgrid[0:cshape[0], 0:cshape[1]] * CG + CG / 2
    return Fields(stroma, float(stroma.sum()), cshape, f, st_c, tum_c, d_tum, d_ves, Xc, Yc)


def stroma_sampler(rng, cv, fl, weight):
    """Sampler of points with density ∝ ``weight`` (coarse grid), kept where the render grid is stroma."""
    H, W = cv.shape

    def s(n):
        p = sample_weighted(rng, weight, n, CG)
        if len(p) == 0:
            return p
        iy = np.clip((p[:, 1] / RU).astype(int), 0, H - 1)
        ix = np.clip((p[:, 0] / RU).astype(int), 0, W - 1)
        return p[fl.stroma[iy, ix]]
    return s


def til_intensity(rng, fl, target):
    """TIL intensity: diffuse + tumour-stroma interface (exp decay 15-45 µm) + perivascular cuff +
    0-2 (target < 10) or 0-6 Gaussian aggregates / TLS, times the stroma fraction."""
    w_diff = rng.uniform(0.3, 1.0)
    w_int = rng.uniform(0.5, 3.0)
    w_pv = rng.uniform(0.3, 2.5)
    lam = np.full(fl.cshape, w_diff, np.float32)
    lam += w_int * np.exp(-fl.d_tum / rng.uniform(15, 45))
    lam += w_pv * np.exp(-fl.d_ves / 12.0) * (fl.d_ves > 0)
    n_agg = int(rng.integers(0, 3 if target < 10 else 7))
    for _ in range(n_agg):
        yy, xx = np.nonzero(fl.st_c > 0.8)
        if len(yy) == 0:
            break
        k = rng.integers(0, len(yy))
        r = rng.uniform(30, 110)
        lam += rng.uniform(4, 12) * np.exp(-((fl.Xc - xx[k] * CG) ** 2 + (fl.Yc - yy[k] * CG) ** 2) / (2 * r * r))
    lam *= fl.st_c
    return lam


def draw_tils(rng, cv, fl, ly, target):
    """Stromal TILs: hard-core samples from the intensity (spacing 6-7.2 µm by target), pasted in
    order (5-30 % plasma cells) until the TIL area in stroma reaches target % of the stroma area.
    Returns the pasted centres and the lymphocyte bank (reused for intratumoral lymphocytes)."""
    lam = til_intensity(rng, fl, target)
    plasma_p = rng.uniform(0.05, 0.3)
    lymph_bank = [make_lymph(rng) for _ in range(40)]
    plasma_bank = [make_lymph(rng, plasma=True) for _ in range(20)]
    mean_area_px = np.mean([s[2].sum() for s in lymph_bank]) * (1 - plasma_p) + \
        np.mean([s[2].sum() for s in plasma_bank]) * plasma_p
    need_px = target / 100 * fl.stroma_area_px
    n_est = int(need_px / mean_area_px * 1.35) + 20
    dmin_l = 7.2 if target < 35 else (6.5 if target < 60 else 6.0)
    lpts = hardcore(rng, stroma_sampler(rng, cv, fl, lam), dmin_l, n_est, batch=max(2000, n_est // 3), rounds=25)
    is_pl = rng.random(len(lpts)) < plasma_p
    done = 0
    got_px = 0.0
    while done < len(lpts) and got_px < need_px:
        remaining = (need_px - got_px) / mean_area_px
        chunk = int(max(10, remaining * 0.8))
        for j in range(done, min(len(lpts), done + chunk)):
            bank = plasma_bank if is_pl[j] else lymph_bank
            s = DIHEDRAL[rng.integers(0, 8)](bank[rng.integers(0, len(bank))])
            paste(ly.Hd, ly.Ed, ly.Mtil, s, lpts[j, 0], lpts[j, 1])
        done = min(len(lpts), done + chunk)
        got_px = float((ly.Mtil * fl.stroma).sum())
    return lpts[:done], lymph_bank


def draw_granulocytes(rng, cv, fl, ly, lpts):
    """0-24 neutrophils / eosinophils in stroma (60 % of slides); not TILs."""
    n_gran = int(rng.integers(0, 25)) if rng.random() < 0.6 else 0
    if n_gran:
        gp = hardcore(rng, stroma_sampler(rng, cv, fl, fl.st_c), 9.0, n_gran, existing=lpts, dmin_existing=8.0,
                      batch=200, rounds=3)
        gbank = [make_granulocyte(rng, eos=rng.random() < 0.4) for _ in range(10)]
        paste_many(ly.Hd, ly.Ed, ly.Mcell, gbank, gp, rng)


def orientation_field(rng, fl):
    """Collagen orientation: a random angle plus 4 low-frequency sine waves (150-600 µm), turned
    towards the tangent of the tumour outline near tumour (weight exp(-d/60 µm))."""
    Xc, Yc = fl.Xc, fl.Yc
    th0 = rng.uniform(0, np.pi)
    theta = np.full(fl.cshape, th0, np.float32)
    for _ in range(4):
        lam_w = rng.uniform(150, 600)
        ka = rng.uniform(0, 2 * np.pi)
        theta += rng.uniform(0.3, 0.8) * np.sin((Xc * np.cos(ka) + Yc * np.sin(ka)) * 2 * np.pi / lam_w
                                                + rng.uniform(0, 6.3))
    if fl.tum_c.any():
        dsm = ndi.gaussian_filter(fl.d_tum, 3)
        gy, gx = np.gradient(dsm)
        tang = np.arctan2(gy, gx) + np.pi / 2
        w = np.exp(-fl.d_tum / 60.0) * 0.9
        c2 = (1 - w) * np.cos(2 * theta) + w * np.cos(2 * tang)
        s2 = (1 - w) * np.sin(2 * theta) + w * np.sin(2 * tang)
        theta = 0.5 * np.arctan2(s2, c2)
    fl.theta = theta


def myxoid_patches(rng, cv, fl):
    """0-3 myxoid / oedematous patches (star polygons 50-180 µm, blurred 12 µm) in stroma."""
    myx = np.zeros(cv.shape, np.float32)
    for _ in range(int(rng.choice([0, 0, 1, 2, 3]))):
        yy, xx = np.nonzero(fl.st_c > 0.9)
        if len(yy) == 0:
            break
        k = rng.integers(0, len(yy))
        r = rng.uniform(50, 180)
        myx = np.maximum(myx, poly_mask(*star_polygon(rng, xx[k] * CG, yy[k] * CG, r, r * rng.uniform(0.5, 1),
                                                      rough=0.2), cv.shape).astype(np.float32))
    if myx.any():
        myx = ndi.gaussian_filter(myx, 12.0 / RU) * fl.stroma
    fl.myx = myx
    fl.myx_c = myx.reshape(fl.cshape[0], fl.f, fl.cshape[1], fl.f).mean((1, 3))


def draw_fibroblasts(rng, cv, fl, ly, lpts):
    """Fibroblasts: hard-core samples (spacing 20-32 µm, fewer in myxoid stroma) pasting spindle
    nuclei from a 12-angle bank, aligned with the orientation field."""
    cshape = fl.cshape
    fib_d = rng.uniform(20, 32)
    fbank = []
    for a_i in range(NANG):
        for _ in range(4):
            fbank.append(make_spindle(rng, a_i * np.pi / NANG, (4.5, 7.5), (0.8, 1.25), (1.2, 1.6)))
    fpts = hardcore(rng, stroma_sampler(rng, cv, fl, fl.st_c * (1 - 0.6 * fl.myx_c)), fib_d,
                    int(fl.stroma_area_px * RU * RU / fib_d ** 2), existing=lpts, dmin_existing=7.0, batch=3000,
                    rounds=4)
    if len(fpts):
        ci = np.clip((fpts[:, 1] / CG).astype(int), 0, cshape[0] - 1)
        cj = np.clip((fpts[:, 0] / CG).astype(int), 0, cshape[1] - 1)
        ai = np.round((fl.theta[ci, cj] % np.pi) / (np.pi / NANG)).astype(int) % NANG
        ids = ai * 4 + rng.integers(0, 4, len(fpts))
        paste_many(ly.Hd, ly.Ed, ly.Mcell, fbank, fpts, rng, orient=True, ids=ids)


def _fibre_class(rng, cv, fl, n, sig, amp_r, wav_a, Lmax=200):
    """One width class of collagen fibres: n streamlines of the orientation field (40-``Lmax`` µm, wavy
    offset of amplitude ``wav_a``), splatted bilinearly along their length and blurred by ``sig`` µm."""
    H, W = cv.shape
    cshape, theta = fl.cshape, fl.theta
    P = sample_weighted(rng, fl.st_c * (1 - 0.8 * fl.myx_c), n, CG)
    n = len(P)
    L = rng.uniform(40, Lmax, n)
    amp = rng.uniform(*amp_r, n) * np.sqrt(2 * np.pi) * sig / RU * RU
    ph = rng.uniform(0, 6.3, n)
    wl = rng.uniform(12, 35, n)
    steps = int(Lmax / RU)
    prev = None
    xs_all = np.empty((steps, n), np.float32)
    ys_all = np.empty((steps, n), np.float32)
    p = P.copy()
    for s_ in range(steps):
        ci = np.clip((p[:, 1] / CG).astype(int), 0, cshape[0] - 1)
        cj = np.clip((p[:, 0] / CG).astype(int), 0, cshape[1] - 1)
        t = theta[ci, cj]
        d = np.stack([np.cos(t), np.sin(t)], 1)
        if prev is not None:
            d *= np.sign((d * prev).sum(1) + 1e-9)[:, None]
        prev = d
        off = wav_a * np.sin(2 * np.pi * s_ * RU / wl + ph)
        xs_all[s_] = p[:, 0] - d[:, 1] * off
        ys_all[s_] = p[:, 1] + d[:, 0] * off
        p = p + d * RU
    alive = (np.arange(steps)[:, None] * RU) < L[None, :]
    fx = (xs_all / RU - 0.5)[alive]
    fy = (ys_all / RU - 0.5)[alive]
    wts = np.broadcast_to(amp[None, :], alive.shape)[alive]
    ok = (fx >= 0) & (fy >= 0) & (fx < W - 1) & (fy < H - 1)
    fx, fy, wts = fx[ok], fy[ok], wts[ok]
    ix, iy = fx.astype(int), fy.astype(int)
    ax, ay = fx - ix, fy - iy
    acc = np.zeros(H * W, np.float64)
    for ddy, ddx, ww in ((0, 0, (1 - ax) * (1 - ay)), (0, 1, ax * (1 - ay)), (1, 0, (1 - ax) * ay),
                         (1, 1, ax * ay)):
        acc += np.bincount((iy + ddy) * W + ix + ddx, weights=wts * ww, minlength=H * W)
    return ndi.gaussian_filter(acc.reshape(cv.shape).astype(np.float32), sig / RU)


def draw_collagen(rng, cv, sc, fl, ly):
    """Collagen: fibres in 3 width classes (σ 0.7 / 1.2 / 2.2 µm; 40 / 35 / 25 %), soft-saturated, on
    a ground eosin; myxoid stroma is pale and bluish; cell bodies displace collagen; vessel walls."""
    col = np.zeros(cv.shape, np.float32)
    area_um = fl.stroma_area_px * RU * RU
    spacing = rng.uniform(1.2, 2.2)
    nfib = int(area_um / (spacing * 110))
    wav_a = rng.uniform(0.3, 2.5)
    for sig, amp_r, share in [(0.7, (0.2, 0.45), 0.4), (1.2, (0.2, 0.4), 0.35), (2.2, (0.15, 0.35), 0.25)]:
        n = int(nfib * share)
        if n == 0:
            continue
        col += _fibre_class(rng, cv, fl, n, sig, amp_r, wav_a)
    emax = rng.uniform(1.0, 1.4)
    col = emax * (1 - np.exp(-col / emax))
    ground = rng.uniform(0.30, 0.45)
    stroma_f = fl.stroma.astype(np.float32)
    myx = fl.myx
    cells_cov = np.maximum(ly.Mtil, ly.Mcell)
    col = (ground * (1 - 0.5 * myx) + col * (1 - 0.75 * myx)) * stroma_f * (1 - 0.85 * cells_cov)
    ly.Ed += col
    ly.Hd += stroma_f * (0.03 + 0.14 * myx) * (1 - cells_cov)
    ly.Ed += sc.wall * (1 - cells_cov)
