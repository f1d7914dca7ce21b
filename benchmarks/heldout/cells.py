"""Cell stages outside plain stroma: vessel cells, tumour cells (ductal, mitoses, lobular,
intratumoral lymphocytes), normal-duct and myoepithelial cells, necrotic debris, adipocytes."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .geometry import bandnoise, ellipse_points, ellipse_tangent, hardcore, sample_weighted
from .params import CG, FAT, GLASS, NORMAL_EPI, RU, TUMOUR
from .sprites import (
    make_disk,
    make_ductal,
    make_lobular_nucleus,
    make_mitosis,
    make_rbc,
    make_spindle,
    paste,
    paste_many,
)
from .stroma import NANG


def _tangent_bin(a, b, ang, t):
    """Index into a ``NANG``-angle spindle bank of the ellipse's tangent at parameter angles ``t``."""
    return np.round((ellipse_tangent(a, b, ang, t) % np.pi) / (np.pi / NANG)).astype(int) % NANG


def draw_vessel_cells(rng, sc, ly):
    """Endothelial nuclei along each vessel outline (one per 12-25 µm), lumen 20-90 % packed with red
    cells (third absorber), smooth-muscle nuclei in the walls of large vessels, a serum tint."""
    endo_bank = [make_spindle(rng, a_i * np.pi / NANG, (3.5, 5.0), (0.8, 1.1), (1.5, 1.9), 0.05)
                 for a_i in range(NANG)]
    rbc_bank = [make_rbc(rng) for _ in range(8)]
    for (cx, cy, a, b, ang, th, big) in sc.vessels:
        per = np.pi * (a + b)
        ne = max(2, int(per / rng.uniform(12, 25)))
        t = rng.uniform(0, 2 * np.pi, ne)
        ex, ey = ellipse_points(cx, cy, a, b, ang, t, 1.0)
        paste_many(ly.Hd, ly.Ed, ly.Mcell, endo_bank, np.stack([ex, ey], 1), rng, orient=True,
                   ids=_tangent_bin(a, b, ang, t))
        fill = rng.uniform(0.2, 0.9)
        nr = int(fill * a * b / 9.0) + 1
        rr = np.sqrt(rng.uniform(0, 1, nr)) * 0.85
        t = rng.uniform(0, 2 * np.pi, nr)
        rx, ry = ellipse_points(cx, cy, a, b, ang, t, rr)
        paste_many(ly.dummy, ly.Rd, None, rbc_bank, np.stack([rx, ry], 1), rng)
        if big:  # smooth muscle nuclei in the wall
            ns = int(per / 10)
            t = rng.uniform(0, 2 * np.pi, ns)
            f_ = 1 + (th * rng.uniform(0.3, 0.8, ns)) / min(a, b)
            sx_, sy_ = ellipse_points(cx, cy, a, b, ang, t, f_)
            paste_many(ly.Hd, ly.Ed, ly.Mcell, endo_bank, np.stack([sx_, sy_], 1), rng, orient=True,
                       ids=_tangent_bin(a, b, ang, t))
    ly.Ed += sc.lumen * rng.uniform(0.03, 0.12)  # serum


def _tumour_points(rng, cv, sc, fl, tum_mask, size, dmin_t, lob_set):
    """Hard-core tumour-cell centres (spacing ``dmin_t``) inside tumour, away from nest edges, avoiding
    lobular cells."""
    H, W = cv.shape
    dweight = tum_mask.reshape(fl.cshape[0], fl.f, fl.cshape[1], fl.f).mean((1, 3))
    tsdf = sc.tsdf

    def t_sampler(n):
        p = sample_weighted(rng, dweight, n, CG)
        iy = np.clip((p[:, 1] / RU).astype(int), 0, H - 1)
        ix = np.clip((p[:, 0] / RU).astype(int), 0, W - 1)
        ok = tum_mask[iy, ix] & ((tsdf[iy, ix] < -size * 0.7) | (tsdf[iy, ix] > 100))
        return p[ok]

    est = int(dweight.sum() * CG * CG / (dmin_t ** 2 * 0.9)) + 10
    return hardcore(rng, t_sampler, dmin_t, est, existing=lob_set if len(lob_set) else None,
                    dmin_existing=dmin_t, batch=max(3000, est), rounds=16)


def _intratumoral_fraction(rng, hard):
    """Share of tumour cells replaced by intratumoral lymphocytes: hard 3-25 % in 80 % of slides;
    otherwise 1-5 % in 15 %."""
    if hard and rng.random() < 0.8:
        return rng.uniform(0.03, 0.25)
    if rng.random() < 0.15:
        return rng.uniform(0.01, 0.05)
    return 0.0


def _lobular_cells(rng, ly, cyto, cytoH, lob_set):
    """Lobular carcinoma cells: pale cytoplasm disks and round uniform nuclei (jittered 1 µm)."""
    lbank = [make_lobular_nucleus(rng) for _ in range(24)]
    lc = [make_disk(rng, r, 1.0, 1.0, soft=1.5) for r in rng.uniform(4.8, 6.2, 8)]
    for (x, y) in lob_set:
        s = lc[rng.integers(0, len(lc))] * rng.uniform(0.6, 1.0)
        paste(cyto, cytoH, None, s, x, y)
    sh = rng.normal(0, 1.0, (len(lob_set), 2))
    paste_many(ly.Hd, ly.Ed, ly.Mcell, lbank, lob_set + sh, rng)


def draw_tumour_cells(rng, cv, sc, fl, ly, lymph_bank):
    """Tumour cells: ductal nuclei (grade sets size 4.6-6.2 µm semi-axis, pleomorphism, mitotic rate
    0.3-3 %) over cytoplasm disks, lobular cells, intratumoral lymphocytes (not TILs: no ``Mtil``);
    tumour cytoplasm tint. Returns the intratumoral lymphocyte centres."""
    H, W = cv.shape
    tum_mask = sc.lab == TUMOUR
    cyto = np.zeros(cv.shape, np.float32)
    cytoH = np.zeros(cv.shape, np.float32)
    t_e, t_h = rng.uniform(0.45, 0.7), rng.uniform(0.2, 0.35)
    if not tum_mask.any():
        return []
    grade = sc.grade
    size = {1: 4.6, 2: 5.4, 3: 6.2}[grade]
    pleo = {1: 0.5, 2: 0.9, 3: 1.4}[grade]
    vesic = rng.uniform(0.3, 0.85)
    dbank = [make_ductal(rng, size, pleo, vesic) for _ in range(60)]
    mbank = [make_mitosis(rng) for _ in range(6)]
    dmin_t = size * 1.7 + rng.uniform(0.5, 2.0)
    cbank = [make_disk(rng, r, 1.0, 1.0) for r in dmin_t * rng.uniform(0.5, 0.65, 16)]
    lob_set = np.array(sc.lob_cells) if sc.lob_cells else np.zeros((0, 2))
    if len(lob_set):
        ly_ = np.clip((lob_set[:, 1] / RU).astype(int), 0, H - 1)
        lx_ = np.clip((lob_set[:, 0] / RU).astype(int), 0, W - 1)
        lob_set = lob_set[tum_mask[ly_, lx_]]
    tpts = _tumour_points(rng, cv, sc, fl, tum_mask, size, dmin_t, lob_set)
    frac = _intratumoral_fraction(rng, cv.hard)
    is_intra = rng.random(len(tpts)) < frac
    mit_p = {1: 0.003, 2: 0.01, 3: 0.03}[grade]
    is_mit = (rng.random(len(tpts)) < mit_p) & ~is_intra
    tc = tpts[~is_intra]
    intra = tpts[is_intra]
    ids = rng.integers(0, len(cbank), len(tc))
    for (x, y), i in zip(tc, ids):
        s = cbank[i]
        amp = rng.uniform(0.75, 1.25)
        paste(cyto, cytoH, None, s * amp, x, y)
    paste_many(ly.Hd, ly.Ed, ly.Mcell, dbank, tpts[~is_intra & ~is_mit], rng)
    paste_many(ly.Hd, ly.Ed, ly.Mcell, mbank, tpts[is_mit], rng)
    paste_many(ly.Hd, ly.Ed, ly.dummy, lymph_bank, intra, rng)  # intratumoral lymphocytes: not in Mtil
    if len(lob_set):
        _lobular_cells(rng, ly, cyto, cytoH, lob_set)
    cyto = np.minimum(cyto, 1.2)
    base = tum_mask * 0.6
    cyt = np.maximum(cyto, base)
    ly.Ed += cyt * t_e * tum_mask
    ly.Hd += cyt * t_h * tum_mask
    return intra


def draw_duct_cells(rng, sc, ly):
    """Normal luminal nuclei on the duct rings, normal-epithelium tint, myoepithelial spindles."""
    if sc.duct_cells:
        nbank = [make_ductal(rng, 3.6, 0.3, 0.3) for _ in range(12)]
        paste_many(ly.Hd, ly.Ed, ly.Mcell, nbank, np.array(sc.duct_cells), rng)
    ne_mask = sc.lab == NORMAL_EPI
    ly.Ed += ne_mask * 0.35
    ly.Hd += ne_mask * 0.08
    if sc.myo:
        myo = np.array(sc.myo)
        mbank2 = [make_spindle(rng, a_i * np.pi / NANG, (3.5, 5.0), (1.0, 1.4), (1.6, 2.0), 0.0)
                  for a_i in range(NANG)]
        ids = np.round((myo[:, 2] % np.pi) / (np.pi / NANG)).astype(int) % NANG
        paste_many(ly.Hd, ly.Ed, ly.Mcell, mbank2, myo[:, :2], rng, orient=True, ids=ids)


def draw_necrosis_texture(rng, cv, sc, ly):
    """Necrosis: mottled pink debris replacing the tissue beneath, plus nuclear dust."""
    nec = sc.nec
    if not nec.any():
        return
    H, W = cv.shape
    nz = bandnoise(rng, cv.shape, 1.0, 4.0)
    necf = nec.astype(np.float32)
    ly.Ed = ly.Ed * (1 - necf) + necf * (rng.uniform(0.6, 0.95) * (1 + 0.25 * np.clip(nz, -2, 2)))
    ly.Hd = ly.Hd * (1 - 0.7 * necf) + necf * (0.22 + 0.08 * np.clip(nz, -2, 2))
    ny, nx = np.nonzero(nec[::2, ::2])
    nd = int(nec.sum() * RU * RU * rng.uniform(0.03, 0.08))
    k = rng.integers(0, len(ny), nd)
    dust = np.zeros(cv.shape, np.float32)
    np.add.at(dust, (np.minimum(ny[k] * 2 + rng.integers(0, 2, nd), H - 1),
                     np.minimum(nx[k] * 2 + rng.integers(0, 2, nd), W - 1)), rng.uniform(1, 3, nd))
    dust = ndi.gaussian_filter(dust, 0.9)
    ly.Hd += dust * 4.0 * necf


def _adipocyte_metric(rng, cv, fpts_, Rm, box):
    """Nearest and second-nearest anisotropic superellipse distances (d1, d2) to the adipocyte centres
    over the fat's bounding box; septa lie where they meet."""
    by0, by1, bx0, bx1 = box
    d1 = np.full((by1 - by0, bx1 - bx0), 1e4, np.float32)
    d2 = d1.copy()
    for (x, y) in fpts_:
        R = Rm * rng.uniform(0.8, 1.2)
        a, b = R, R * rng.uniform(0.7, 1.0)
        ang = rng.uniform(0, np.pi)
        p = rng.uniform(1.8, 2.6)
        B = 2.3 * R
        x0, x1 = int(max(bx0, (x - B) / RU)), int(min(bx1, (x + B) / RU))
        y0, y1 = int(max(by0, (y - B) / RU)), int(min(by1, (y + B) / RU))
        if x0 >= x1 or y0 >= y1:
            continue
        Xl, Yl = cv.X1[None, x0:x1] - x, cv.Y1[y0:y1, None] - y
        u = Xl * np.cos(ang) + Yl * np.sin(ang)
        v = -Xl * np.sin(ang) + Yl * np.cos(ang)
        dd = R * (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1 / p)
        s1 = d1[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
        s2 = d2[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0]
        np.minimum(s2, np.maximum(s1, dd), out=s2)
        np.minimum(s1, dd, out=s1)
    return d1, d2


def draw_adipocytes(rng, cv, sc, fl, ly):
    """Adipocytes: cells of an anisotropic superellipse metric around hard-core centres (radius 28-45
    µm); thin curved eosinophilic septa, occasional flattened nuclei on them."""
    fat_m = sc.lab == FAT
    if not fat_m.any():
        return
    yy, xx = np.nonzero(fat_m)
    by0, by1, bx0, bx1 = yy.min(), yy.max() + 1, xx.min(), xx.max() + 1
    Rm = rng.uniform(28, 45)
    fw = fat_m.reshape(fl.cshape[0], fl.f, fl.cshape[1], fl.f).mean((1, 3))
    fpts_ = hardcore(rng, lambda n: sample_weighted(rng, fw, n, CG), 1.75 * Rm, 10000, batch=800, rounds=6)
    d1, d2 = _adipocyte_metric(rng, cv, fpts_, Rm, (by0, by1, bx0, bx1))
    memb = np.clip((1.4 - (d2 - d1)) / 1.0, 0, 1) * fat_m[by0:by1, bx0:bx1]
    memb = np.maximum(memb, (d1 > 1.5 * Rm) * fat_m[by0:by1, bx0:bx1])
    ly.Ed[by0:by1, bx0:bx1] += memb * rng.uniform(0.45, 0.7)
    ly.Hd[by0:by1, bx0:bx1] += memb * 0.05
    # occasional flattened nuclei on septa
    my_, mx_ = np.nonzero(memb[::6, ::6] > 0.8)
    if len(my_):
        k = rng.integers(0, len(my_), max(1, len(fpts_) // 3))
        fn = [make_spindle(rng, rng.uniform(0, np.pi), (3.0, 4.5), (0.7, 1.0), (1.4, 1.8), 0) for _ in range(6)]
        paste_many(ly.Hd, ly.Ed, ly.Mcell, fn, np.stack([(mx_[k] * 6 + bx0) * RU, (my_[k] * 6 + by0) * RU], 1), rng)


def clear_glass(sc, ly):
    """Cells may sit on glass edges; everything outside tissue keeps only 10 % of its stain."""
    glass = (sc.lab == GLASS).astype(np.float32)
    keep = 1 - glass * 0.9
    ly.Hd *= keep
    ly.Ed *= keep
