"""The scene of one ``regions`` slide (:mod:`weakstil.synth.regions`): regions, textures, vessels,
cells, truth maps, artefacts and colour, in that order (the order of the random draws)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from weakstil.synth.regions_sprites import (BG, CG, FAT, NECROSIS, STROMA, TUMOUR, VESSEL, VG, Canvas,
                                            block_sum, grid_lookup, hexgrid_local, lymphocyte, mitosis,
                                            noise, pen_stroke, plasma_cell, resample, rotated, soft, spindle,
                                            tumour_nucleus)
from weakstil.synth.truth import TRUTH_UM

# ----------------------------------------------------------------------------- render
def render(p):
    """Draw one slide from its plan ``p``: (level-0 RGB uint8, truth maps at 16 µm/px, cell counts)."""
    rng = np.random.default_rng(p['render_seed'])
    mpp = p['mpp']
    Wum, Hum = p['width_um'], p['height_um']
    H0, W0 = int(round(Hum / mpp)), int(round(Wum / mpp))
    Hc, Wc = int(math.ceil(Hum / CG)), int(math.ceil(Wum / CG))
    yc = ((np.arange(Hc) + 0.5) * CG)[:, None]
    xc = ((np.arange(Wc) + 0.5) * CG)[None, :]
    cv = Canvas(H0, W0, mpp)
    info = {}

    # ---------------- tissue outline (continuous field, >0 inside)
    tp = p['tissue']
    cx, cy = tp['cx'] * Wum, tp['cy'] * Hum
    ca, sa = math.cos(tp['ang']), math.sin(tp['ang'])
    dx, dy = xc - cx, yc - cy
    u = (dx * ca + dy * sa) / (tp['rx'] * Wum)
    v = (-dx * sa + dy * ca) / (tp['ry'] * Hum)
    rho = np.sqrt(u * u + v * v) + 1e-6
    phi = np.arctan2(v, u)
    rb = 1.0 + sum(a * np.cos(k * phi + ph) for k, (a, ph) in zip(range(2, 7), tp['harm']))
    ft = (1.0 - rho / rb) * 4 + 0.25 * noise(rng, (Hc, Wc), CG, 60) + 0.08 * noise(rng, (Hc, Wc), CG, 10)
    if tp['second']:   # a second, smaller fragment
        fx, fy = rng.uniform(0.1, 0.9) * Wum, rng.uniform(0.1, 0.9) * Hum
        fr = rng.uniform(0.10, 0.2) * Wum
        f2 = (1.0 - np.sqrt((xc - fx) ** 2 + (yc - fy) ** 2) / fr) * 3 + 0.2 * noise(rng, (Hc, Wc), CG, 40)
        ft = np.maximum(ft, f2)
    for _ in range(tp['n_tears']):     # thin tissue tears (glass)
        x1, y1 = rng.uniform(0.2, 0.8) * Wum, rng.uniform(0.2, 0.8) * Hum
        ang = rng.uniform(0, np.pi)
        ln = rng.uniform(60, 300)
        x2, y2 = x1 + ln * math.cos(ang), y1 + ln * math.sin(ang)
        vx, vy = x2 - x1, y2 - y1
        t = np.clip(((xc - x1) * vx + (yc - y1) * vy) / (ln * ln), 0, 1)
        d = np.sqrt((xc - x1 - t * vx) ** 2 + (yc - y1 - t * vy) ** 2)
        w = rng.uniform(2, 9) * (0.6 + 0.8 * np.sin(np.pi * t))
        ft = np.minimum(ft, (d - w) / 6.0)
    tissue_c = ft > 0

    # ---------------- fat (field, >0 inside)
    ff = noise(rng, (Hc, Wc), CG, rng.uniform(90, 220)) - 0.8 * np.clip(ft, -1, 1.5)
    if p['fat_frac'] > 0 and tissue_c.any():
        thr = np.quantile(ff[tissue_c], 1 - p['fat_frac'])
        ff = (ff - thr) * 3
    else:
        ff = np.full_like(ft, -5)
    fat_c = tissue_c & (ff > 0)

    # ---------------- tumour (field, >0 inside)
    pat = p['pattern']
    s = p['nest_scale']
    iso = noise(rng, (Hc, Wc), CG, s) - 0.6 * noise(rng, (Hc, Wc), CG, 3 * s)
    ang = rng.uniform(0, np.pi)
    cord = noise(rng, (Hc, Wc), CG, s * 0.45, aniso=rng.uniform(3, 6), angle=ang)
    sheet = noise(rng, (Hc, Wc), CG, 2.5 * s)
    if pat == 'nests':
        fu = iso
    elif pat == 'cords':
        fu = 0.85 * cord + 0.4 * iso
    elif pat == 'sheets':
        fu = 0.8 * sheet + 0.5 * iso
    else:
        w = 1 / (1 + np.exp(-2.5 * noise(rng, (Hc, Wc), CG, 200)))
        fu = w * iso + (1 - w) * (0.85 * cord + 0.4 * iso)
    fu = fu / (fu.std() + 1e-6) + p['bed_weight'] * noise(rng, (Hc, Wc), CG, rng.uniform(200, 400))
    fu = fu + 0.15 * noise(rng, (Hc, Wc), CG, 5)
    avail = tissue_c & ~fat_c
    ftgt = p['tumour_frac'] * tissue_c.sum() / max(avail.sum(), 1)
    ftgt = min(ftgt, 0.95)
    if avail.any():
        thr = np.quantile(fu[avail], 1 - ftgt)
    else:
        thr = 1e9
    fu = (fu - thr) * 2.5
    tum_c = avail & (fu > 0)
    # necrosis: deep inside large nests
    if p['necrosis'] and tum_c.any():
        dist = ndi.distance_transform_edt(tum_c) * CG
        fn = (dist - p['necrosis_depth']) / 8.0 + 0.35 * noise(rng, (Hc, Wc), CG, 15)
        fr_n = (fn[tum_c] > 0).mean()
        if fr_n < 0.01:      # nests too thin: pick the deepest 6 %
            fn = fn - np.quantile(fn[tum_c], 0.94)
        elif fr_n > 0.25:    # cap necrosis at 25 % of the tumour area
            fn = fn - np.quantile(fn[tum_c], 0.75)
    else:
        fn = np.full_like(ft, -5)

    # ---------------- full-resolution regions
    R = cv.R
    f0 = resample(ft, CG, (H0, W0), mpp)
    tis0 = f0 > 0
    R[tis0] = STROMA
    f0 = resample(ff, CG, (H0, W0), mpp)
    R[tis0 & (f0 > 0)] = FAT
    f0 = resample(fu, CG, (H0, W0), mpp)
    tum0 = (f0 > 0) & (R == STROMA)
    R[tum0] = TUMOUR
    del tum0
    if p['necrosis']:
        f0 = resample(fn, CG, (H0, W0), mpp)
        R[(f0 > 0) & (R == TUMOUR)] = NECROSIS
    del f0, tis0
    # coarse region map (for object placement / densities)
    Rc = np.zeros((Hc, Wc), np.uint8)
    Rc[tissue_c] = STROMA
    Rc[fat_c] = FAT
    Rc[tum_c] = TUMOUR
    Rc[tum_c & (fn > 0)] = NECROSIS

    def lookup_c(arr, xs, ys):
        return arr[np.clip((ys / CG).astype(int), 0, Hc - 1), np.clip((xs / CG).astype(int), 0, Wc - 1)]

    def lookup0(xs, ys):
        return R[np.clip((ys / mpp).astype(int), 0, H0 - 1), np.clip((xs / mpp).astype(int), 0, W0 - 1)]

    def hexgrid(spacing, jitter):
        dy = spacing * math.sqrt(3) / 2
        ny, nx = int(Hum / dy) + 2, int(Wum / spacing) + 2
        jj, ii = np.meshgrid(np.arange(nx), np.arange(ny))
        xs = (jj + 0.5 * (ii % 2)) * spacing + rng.uniform(0, spacing)
        ys = ii * dy + rng.uniform(0, dy)
        xs = xs.ravel() + rng.normal(0, jitter, xs.size)
        ys = ys.ravel() + rng.normal(0, jitter, ys.size)
        ok = (xs >= 0) & (xs < Wum) & (ys >= 0) & (ys < Hum)
        return xs[ok], ys[ok]

    # ---------------- fine noise textures
    gpx = max(mpp, 0.5)
    G = noise(rng, (int(math.ceil(Hum / gpx)), int(math.ceil(Wum / gpx))), gpx, 0.5)
    if gpx != mpp:
        G = resample(G, gpx, (H0, W0), mpp)
    G = G[:H0, :W0]
    thick = resample(np.exp(p['thick_sigma'] * noise(rng, (Hc, Wc), CG, 250)), CG, (H0, W0), mpp)
    Y0 = ((np.arange(H0, dtype=np.float32) + 0.5) * mpp)[:, None]
    X0 = ((np.arange(W0, dtype=np.float32) + 0.5) * mpp)[None, :]

    # ---------------- stroma texture: wavy collagen fibres/bundles with clefts
    # anisotropic noise looked up in warped, rotated coordinates (u across, v along the fibres),
    # rendered on a <=0.5 um grid and resampled to level 0.
    h, e = cv.h, cv.e
    FG = max(mpp, 0.5)
    Hf, Wf = int(math.ceil(Hum / FG)), int(math.ceil(Wum / FG))
    Yf = ((np.arange(Hf, dtype=np.float32) + 0.5) * FG)[:, None]
    Xf = ((np.arange(Wf, dtype=np.float32) + 0.5) * FG)[None, :]
    wmix_c = 1 / (1 + np.exp(-4.0 * noise(rng, (Hc, Wc), CG, rng.uniform(60, 160))))
    wmix = resample(wmix_c, CG, (Hf, Wf), FG)
    fib = np.zeros((Hf, Wf), np.float32)
    dirs = []
    for k in range(2):
        th = p['fibre_theta'][k]
        c_, s_ = math.cos(th), math.sin(th)
        warp_c = (noise(rng, (Hc, Wc), CG, rng.uniform(12, 28)) * (2.5 * p['fibre_warp'])
                  + noise(rng, (Hc, Wc), CG, rng.uniform(40, 90)) * 6.0
                  + noise(rng, (Hc, Wc), CG, 6) * 0.5)
        gy, gx = np.gradient(warp_c, CG)
        dirs.append(np.arctan2(s_ + gy, c_ + gx) + np.pi / 2)    # local fibre direction
        u = (Xf * c_ + Yf * s_) + resample(warp_c, CG, (Hf, Wf), FG)
        v = (-Xf * s_ + Yf * c_)
        grid = ndi.gaussian_filter(rng.standard_normal((512, 512)).astype(np.float32), [0.7, 1.0], mode='wrap')
        grid /= grid.std()
        T = grid_lookup(grid, u * (1.0 / p['fibre_lambda'][k] * 3.5 / 1.3), v * (1.0 / rng.uniform(7, 13)))
        fib += T * (wmix if k == 0 else 1 - wmix)
        del u, v, T
    fib_theta_c = np.where(wmix_c > 0.5, dirs[0], dirs[1])
    fib *= 1.0 / (fib.std() + 1e-6)
    dens = noise(rng, (Hc, Wc), CG, rng.uniform(40, 120))
    loose_c = 1 / (1 + np.exp(-(dens + rng.uniform(-0.6, 1.2)) * 2.5))          # 1 = dense collagen
    loose = resample(loose_c, CG, (Hf, Wf), FG)
    es = (0.5 + 0.5 * loose) * (0.55 + 0.45 / (1 + np.exp(-1.8 * fib)))
    cleft = np.clip((-fib - 1.0) * 1.5, 0, 1) * (0.45 + 0.5 * (1 - loose))
    es *= 1 - 0.85 * cleft
    del cleft, fib, loose, wmix
    if FG != mpp:
        es = resample(es, FG, (H0, W0), mpp)
    es = es[:H0, :W0] * p['stroma_e']
    st = R == STROMA
    e[st] = es[st] * (1 + 0.06 * G[st])
    h[st] = (0.07 + 0.02 * G[st])
    del es

    # ---------------- Voronoi borders (tumour cells, adipocytes) on a 1 um grid
    tum_mask0 = (R == TUMOUR) | (R == NECROSIS)
    txs, tys = hexgrid(p['tum_spacing'], 0.25 * p['tum_spacing'])
    keep = lookup0(txs, tys)
    tnec = keep == NECROSIS
    keep = keep == TUMOUR
    nec_x, nec_y = txs[tnec], tys[tnec]
    txs, tys = txs[keep], tys[keep]
    Hv, Wv = int(math.ceil(Hum / VG)), int(math.ceil(Wum / VG))
    yv, xv = np.mgrid[0:Hv, 0:Wv]
    pts = np.stack([(xv.ravel() + 0.5) * VG, (yv.ravel() + 0.5) * VG], 1)
    Rv = Rc[np.clip(((yv.ravel() + 0.5) * VG / CG).astype(int), 0, Hc - 1),
            np.clip(((xv.ravel() + 0.5) * VG / CG).astype(int), 0, Wc - 1)]
    Vf = np.full(Hv * Wv, 50.0, np.float32)
    if txs.size >= 2:
        sel = ndi.binary_dilation((Rv == TUMOUR).reshape(Hv, Wv), iterations=4).ravel()
        d, _ = cKDTree(np.stack([txs, tys], 1)).query(pts[sel], k=2)
        Vf[sel] = d[:, 1] - d[:, 0]
    axs, ays = hexgrid(p['adipocyte_um'], 0.22 * p['adipocyte_um'])
    if (Rc == FAT).any() and axs.size >= 2:
        sel = ndi.binary_dilation((Rv == FAT).reshape(Hv, Wv), iterations=8).ravel()
        d, _ = cKDTree(np.stack([axs, ays], 1)).query(pts[sel], k=2)
        Vf[sel] = np.minimum(Vf[sel], d[:, 1] - d[:, 0])
    V0 = resample(Vf.reshape(Hv, Wv), VG, (H0, W0), mpp)
    del pts, Rv, xv, yv

    # tumour cytoplasm with faint cell borders
    tm = R == TUMOUR
    bord = np.clip(1 - V0[tm] / 1.2, 0, 1)
    Gt = G[tm]
    e[tm] = p['tum_cyto_e'] * (1 + 0.15 * Gt) + 0.12 * bord
    h[tm] = p['tum_cyto_h'] * (1 + 0.2 * Gt) + 0.05 * bord
    del bord, Gt, tm
    # fat: empty cells with thin eosinophilic membranes
    fm = R == FAT
    mem = np.clip(1 - V0[fm] / rng.uniform(1.4, 2.2), 0, 1)
    e[fm] = 0.01 + rng.uniform(0.4, 0.65) * mem * (1 + 0.2 * G[fm])
    h[fm] = 0.004 + 0.06 * mem
    del mem, fm, V0
    # necrosis: granular pink debris with nuclear dust
    if p['necrosis']:
        nm = R == NECROSIS
        if nm.any():
            Gd = noise(rng, (Hv, Wv), VG, 1.0)
            Gd = resample(Gd, VG, (H0, W0), mpp)[nm]
            Gm = noise(rng, (Hc, Wc), CG, 6)
            Gm = resample(Gm, CG, (H0, W0), mpp)[nm]
            dust = np.clip((Gd - 2.0) * 2.5, 0, 1)
            e[nm] = rng.uniform(0.45, 0.75) * (0.85 + 0.12 * Gm + 0.1 * G[nm])
            h[nm] = 0.15 + 0.05 * Gm + 1.9 * dust
            del Gd, Gm, dust, nm
    e *= thick
    h *= thick

    # ---------------- vessels (in stroma)
    st_c = (Rc == STROMA)
    dist_st = ndi.distance_transform_edt(st_c) * CG
    area_st = st_c.sum() * CG * CG / 1e6
    nv = rng.poisson(p['n_vessels_per_mm2'] * area_st)
    rbc_list = []
    endo_list = []
    cand = np.argwhere(dist_st > 12)
    for _ in range(nv):
        if cand.size == 0:
            break
        iy, ix = cand[rng.integers(len(cand))]
        vy, vx = (iy + 0.5) * CG, (ix + 0.5) * CG
        room = dist_st[iy, ix] - 4
        if rng.random() < 0.5:
            a = rng.uniform(2.5, 5)          # capillary
        else:
            a = rng.uniform(6, 28)
        a = min(a, room)
        if a < 2.5:
            continue
        b = a * rng.uniform(0.35, 1.0)
        ang = rng.uniform(0, np.pi)
        wall = rng.uniform(1.2, 2.5) + 0.08 * a
        P = cv.patch(vx, vy, a + wall + 1)
        if P is None:
            continue
        sl, X, Y = P
        xr, yr = rotated(X, Y, ang)
        q = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        qo = np.sqrt((xr / (a + wall)) ** 2 + (yr / (b + wall)) ** 2)
        lum = q < 1
        ring = (qo < 1) & ~lum
        Rs = R[sl]
        okm = Rs == STROMA
        Rs[lum & okm] = VESSEL
        es, hs = e[sl], h[sl]
        es[ring & okm] = 0.75 + 0.1 * G[sl][ring & okm]
        es[lum & okm] = rng.uniform(0.03, 0.2)
        hs[lum & okm] = 0.01
        # red cells inside
        fill = rng.uniform(0.05, 0.9)
        gx, gy = hexgrid_local(rng, vx, vy, a, b, ang, 6.8)
        for x_, y_ in zip(gx, gy):
            if rng.random() < fill:
                rbc_list.append((x_, y_))
        # endothelial nuclei along the wall
        ne = max(1, int(2 * np.pi * math.sqrt((a * a + b * b) / 2) / 18 * rng.uniform(0.6, 1.4)))
        for t in rng.uniform(0, 2 * np.pi, ne):
            ex, ey = (a + wall * 0.45) * math.cos(t), (b + wall * 0.45) * math.sin(t)
            px_, py_ = vx + ex * math.cos(ang) - ey * math.sin(ang), vy + ex * math.sin(ang) + ey * math.cos(ang)
            tang = math.atan2(b * math.cos(t), -a * math.sin(t)) + ang
            endo_list.append((px_, py_, tang))
    # a few extravasated red cells
    n_ex = rng.poisson(3)
    for _ in range(n_ex):
        iy, ix = np.argwhere(st_c)[rng.integers(st_c.sum())] if st_c.any() else (0, 0)
        rbc_list.append(((ix + 0.5) * CG + rng.normal(0, 1), (iy + 0.5) * CG + rng.normal(0, 1)))

    # ---------------- fibroblasts (spindle nuclei, along fibres)
    area_st0 = area_st
    nfb = rng.poisson(p['fibroblast_per_mm2'] * area_st0)
    fx = rng.uniform(0, Wum, nfb * 2)
    fy = rng.uniform(0, Hum, nfb * 2)
    ok = lookup0(fx, fy) == STROMA
    fx, fy = fx[ok][:nfb], fy[ok][:nfb]
    fth = lookup_c(fib_theta_c, fx, fy) + rng.normal(0, 0.2, fx.size)
    for x_, y_, th in zip(fx, fy, fth):
        spindle(cv, G, x_, y_, th, rng.uniform(4.5, 9), rng.uniform(0.7, 1.3),
                rng.uniform(1.3, 1.9), rng.normal(0, 0.02))
    for x_, y_, th in endo_list:
        spindle(cv, G, x_, y_, th, rng.uniform(3.5, 6), rng.uniform(0.7, 1.1), rng.uniform(1.3, 1.8), 0)

    # ---------------- tumour cells
    nt = txs.size
    tsize = p['tum_nuc_um'] * np.exp(rng.normal(0, p['tum_pleo'], nt))
    tsize = np.minimum(tsize, 0.62 * p['tum_spacing'])
    is_mit = rng.random(nt) < p['mitosis_frac']
    hn = p['tum_h'] * np.exp(rng.normal(0, 0.18, nt))
    for i in range(nt):
        if is_mit[i]:
            mitosis(cv, G, rng, txs[i], tys[i], tsize[i])
        else:
            tumour_nucleus(cv, G, rng, txs[i], tys[i], tsize[i], p['grade'], hn[i], p['nucleoli'])
    # ghost nuclei in necrosis
    for x_, y_ in zip(nec_x, nec_y):
        if rng.random() < 0.25:
            P = cv.patch(x_, y_, 5)
            if P:
                sl, X, Y = P
                a_ = soft(np.sqrt(X * X + Y * Y) / rng.uniform(3, 4.5), 0.15) * 0.5
                Canvas.comp(h, sl, a_, 0.45)

    # ---------------- red blood cells
    for x_, y_ in rbc_list:
        P = cv.patch(x_, y_, 4.5)
        if P is None:
            continue
        sl, X, Y = P
        rr = rng.uniform(3.3, 3.9)
        ell = rng.uniform(0.8, 1.0)
        ang = rng.uniform(0, np.pi)
        xr, yr = rotated(X, Y, ang)
        yr = yr / ell
        q = np.sqrt(xr * xr + yr * yr) / rr
        a_ = soft(q, 0.12)
        val = rng.uniform(1.3, 1.9) * (1 - 0.35 * np.exp(-(q / 0.45) ** 2))
        Canvas.comp(cv.r, sl, a_, val)
        Canvas.comp(e, sl, a_, 0.05)
        Canvas.comp(h, sl, a_, 0.02)

    # ---------------- inflammatory cells (lymphocytes, plasma cells)
    lxs, lys = hexgrid(p['lym_spacing'] * (1 - 0.25 * min(max((p['target_stil'] - 35) / 50, 0), 1)), 1.4)
    lreg = lookup0(lxs, lys)
    inner = lreg != BG
    lxs, lys, lreg = lxs[inner], lys[inner], lreg[inner]
    # density modulation field on the coarse grid
    het = np.exp(p['het_sigma'] * noise(rng, (Hc, Wc), CG, p['het_scale']) - p['het_sigma'] ** 2 / 2)
    clus = np.exp(p['clust_sigma'] * noise(rng, (Hc, Wc), CG, p['clust_scale']) - p['clust_sigma'] ** 2 / 2)
    if tum_c.any():
        dtum = ndi.distance_transform_edt(~tum_c) * CG
    else:
        dtum = np.full((Hc, Wc), 1e4)
    peri = 1 + p['peri_beta'] * np.exp(-dtum / p['peri_len'])
    mod = het * clus * peri
    agg = np.zeros((Hc, Wc), np.float32)
    cand = np.argwhere(st_c)
    for _ in range(p['n_aggregates']):
        if cand.size == 0:
            break
        iy, ix = cand[rng.integers(len(cand))]
        ra = rng.uniform(20, 70)
        d2 = (xc - (ix + 0.5) * CG) ** 2 + (yc - (iy + 0.5) * CG) ** 2
        agg = np.maximum(agg, np.clip(1.6 * np.exp(-d2 / (2 * ra * ra)) - 0.3, 0, 1))
    m_l = lookup_c(mod, lxs, lys)
    a_l = lookup_c(agg, lxs, lys)
    in_st = lreg == STROMA
    target = p['target_stil'] / 100.0
    U = rng.random(lxs.size)          # common random numbers: acceptance is monotone in `base`

    def prob(base, a_l):
        return 1 - (1 - np.minimum(1, base * m_l)) * (1 - a_l)

    # solve the density scale so that the union area of stromal inflammatory cells (simulated on a
    # ~1 um grid with discs of the mean body radius) is the target fraction of the stroma
    k0 = max(1, int(round(1.0 / mpp)))
    gpx = k0 * mpp
    stv = R[k0 // 2::k0, k0 // 2::k0] == STROMA
    Hs, Ws = stv.shape
    rb = (p['lym_r'] + 0.6) * (1 + 0.25 * p['plasma_frac']) / gpx
    pad = int(rb) + 2
    oy, ox = np.mgrid[-pad:pad + 1, -pad:pad + 1]
    inside = oy * oy + ox * ox <= rb * rb
    offs = (oy[inside] * (Ws + 2 * pad) + ox[inside]).astype(np.int64)
    ci = (np.clip((lys[in_st] / gpx).astype(int), 0, Hs - 1) + pad) * (Ws + 2 * pad) \
        + np.clip((lxs[in_st] / gpx).astype(int), 0, Ws - 1) + pad
    stv_p = np.zeros((Hs + 2 * pad, Ws + 2 * pad), bool)
    stv_p[pad:pad + Hs, pad:pad + Ws] = stv
    den = max(stv.sum(), 1)
    U_st = U[in_st]

    def realised(base, a_l):
        acc = U_st < prob(base, a_l)[in_st]
        cov = np.zeros(stv_p.size, bool)
        cov[(ci[acc][:, None] + offs[None, :]).ravel()] = True
        return (cov & stv_p.ravel()).sum() / den
    r0 = realised(0.0, a_l)
    if r0 > target:   # aggregates alone exceed target: shrink them
        a_l = a_l * (target / max(r0, 1e-9)) * 0.8
    lo, hi = 0.0, 1.0
    while realised(hi, a_l) < target and hi < 1e3:
        lo, hi = hi, hi * 4
    for _ in range(16):
        mid = 0.5 * (lo + hi)
        if realised(mid, a_l) < target:
            lo = mid
        else:
            hi = mid
    base = 0.5 * (lo + hi)
    pr = prob(base, a_l)
    it = lreg == TUMOUR
    pr[it] = np.minimum(0.9, p['it_factor'] * np.minimum(1, base * m_l[it]) + p['it_floor'] * m_l[it] / (1 + m_l[it]))
    pr[lreg == FAT] = np.minimum(0.2, 0.04 * np.minimum(1, base * m_l[lreg == FAT]))
    pr[lreg == NECROSIS] = 0.03
    pr[lreg == VESSEL] = 0.02
    acc = U < pr
    lxs, lys, lreg = lxs[acc], lys[acc], lreg[acc]
    order = rng.permutation(lxs.size)
    lxs, lys, lreg = lxs[order], lys[order], lreg[order]
    is_pl = rng.random(lxs.size) < p['plasma_frac']
    n_lym = n_pl = n_it = 0
    for i in range(lxs.size):
        stromal = lreg[i] == STROMA
        if is_pl[i] and lreg[i] != TUMOUR:
            plasma_cell(cv, G, rng, lxs[i], lys[i], stromal)
            n_pl += 1
        else:
            lymphocyte(cv, G, rng, lxs[i], lys[i], p['lym_r'], p['lym_h'], stromal)
            n_lym += 1
        n_it += lreg[i] == TUMOUR
    info.update(n_tumour_cells=int(nt), n_lymphocytes=int(n_lym), n_plasma=int(n_pl),
                n_intratumoral=int(n_it), lym_base=float(base), n_fibroblasts=int(fx.size),
                n_vessels=int(nv), n_rbc=len(rbc_list))

    # ---------------- truth (before artefacts; artefacts do not change the truth)
    th_, tw_ = int(math.ceil(Hum / TRUTH_UM)), int(math.ceil(Wum / TRUTH_UM))
    b = int(round(TRUTH_UM / mpp))
    npx = float(b * b)
    stm = R == STROMA
    truth = dict(
        stroma=(block_sum(stm, b, th_, tw_) / npx).astype(np.float32),
        lymph_in_stroma=(block_sum(stm & cv.L, b, th_, tw_) / npx).astype(np.float32),
        tumour=(block_sum(R == TUMOUR, b, th_, tw_) / npx).astype(np.float32),
        fat=(block_sum(R == FAT, b, th_, tw_) / npx).astype(np.float32),
        tissue=(block_sum(R != BG, b, th_, tw_) / npx).astype(np.float32),
        necrosis=(block_sum(R == NECROSIS, b, th_, tw_) / npx).astype(np.float32),
    )
    del stm

    # ---------------- artefacts in stain space
    hard = p['setting'] == 'hard'
    if p['fold']:
        x1, y1 = rng.uniform(0.1, 0.9) * Wum, rng.uniform(0.1, 0.9) * Hum
        ang = rng.uniform(0, np.pi)
        d = ((xc - x1) * math.sin(ang) - (yc - y1) * math.cos(ang))
        along = ((xc - x1) * math.cos(ang) + (yc - y1) * math.sin(ang))
        wid = rng.uniform(15, 70)
        ln = rng.uniform(150, 600)
        band = np.clip(1 - np.abs(d) / wid, 0, 1) ** 0.3 * (np.abs(along) < ln) + 0 * d
        band = ndi.gaussian_filter(band.astype(np.float32), 2)
        band0 = resample(band, CG, (H0, W0), mpp)
        fac = 1 + rng.uniform(0.7, 1.1) * band0
        h *= fac
        e *= fac
        del band0, fac

    # ---------------- colour (Beer-Lambert) with per-slide stain matrix
    vH, vE, vR = (np.array(p[k], np.float32) for k in ('vecH', 'vecE', 'vecR'))
    h *= p['sH']
    e *= p['sE']
    bg = np.array(p['bg_od'], np.float32)
    resid = np.array(p['residual'], np.float32)
    he = h + e
    pen = None
    if p['pen']:
        pen = pen_stroke(rng, Hc, Wc, xc, yc, Wum, Hum, ft)
        pen0 = resample(pen, CG, (H0, W0), mpp)
        pen_vec = {'green': [0.85, 0.25, 0.75], 'blue': [0.95, 0.55, 0.1],
                   'black': [0.8, 0.8, 0.8]}[p['pen_colour']]
        pen_int = rng.uniform(0.6, 1.6)
    sig_px = p['blur_um'] / mpp
    od = np.empty((3, H0, W0), np.float32)
    for c in range(3):
        o = od[c]
        np.multiply(h, vH[c], out=o)
        o += e * vE[c]
        o += cv.r * vR[c]
        o += bg[c]
        o += resid[c] * he
        if pen is not None:
            o += pen0 * (pen_vec[c] * pen_int)
        if sig_px > 0.3:
            o[...] = ndi.gaussian_filter(o, sig_px, truncate=3.0)
    del h, e, he
    cv.h = cv.e = cv.r = None
    if p['oof']:     # out-of-focus patch
        cxo, cyo = rng.uniform(0, Wum), rng.uniform(0, Hum)
        ro = rng.uniform(150, 400)
        m = np.clip(1.5 - np.sqrt((xc - cxo) ** 2 + (yc - cyo) ** 2) / ro, 0, 1).astype(np.float32)
        m0 = resample(m, CG, (H0, W0), mpp)
        ds = 4
        for c in range(3):
            o = od[c]
            hs, ws = (H0 // ds) * ds, (W0 // ds) * ds
            small = o[:hs, :ws].reshape(H0 // ds, ds, W0 // ds, ds).mean(axis=(1, 3))
            small = ndi.gaussian_filter(small, rng.uniform(1.5, 3.0) / (mpp * ds))
            bl = resample(small, mpp * ds, (H0, W0), mpp)
            o += m0 * (bl - o)
        del m0
    # intensity
    img = np.empty((H0, W0, 3), np.uint8)
    # scanner stripes (vertical line-scan stripes) and slight per-tile variation
    stripe_w = int(round(rng.uniform(240, 500) / mpp))
    nstr = W0 // stripe_w + 1
    sfac = 1 + p['stripe_amp'] * rng.uniform(-1, 1, nstr)
    col_fac = np.repeat(sfac, stripe_w)[:W0].astype(np.float32)
    tile_fac = 1 + (0.003 * (2 if hard else 1)) * rng.uniform(-1, 1, ((H0 + 255) // 256, (W0 + 255) // 256))
    tile_fac = np.repeat(np.repeat(tile_fac, 256, 0), 256, 1)[:H0, :W0].astype(np.float32)
    nb = rng.standard_normal((512, 512, 3)).astype(np.float32) * p['noise_sd']
    oy, ox = rng.integers(0, 512, 2)
    reps = (H0 // 512 + 2, W0 // 512 + 2, 1)
    nz = np.tile(nb, reps)[oy:oy + H0, ox:ox + W0]
    for c in range(3):
        I = np.exp(-od[c])
        I *= 255.0
        I *= col_fac[None, :]
        I *= tile_fac
        I += nz[:, :, c]
        np.clip(I, 0, 255, out=I)
        img[:, :, c] = I + 0.5
        del I
    del od, nz, tile_fac
    return img, truth, info
