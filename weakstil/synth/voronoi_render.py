"""The scene of one ``voronoi`` slide (:mod:`weakstil.synth.voronoi`): layout, stroma, fat, tumour,
necrosis, vessels, fibroblasts, inflammatory cells, truth maps, then stain and scanner, in that order
(the order of the random draws of the held-out generator this was moved from)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from weakstil.synth.truth import TRUTH_UM
from weakstil.synth.voronoi_sprites import (
    RES,
    jitter_lattice,
    make_eosino,
    make_fibro,
    make_lymph,
    make_neutro,
    make_plasma,
    make_rbc,
    make_tumour_nuc,
    noise_field,
    quantile_thr,
    sample_true_til,
    stamp_cell,
    stamp_nuc,
    tile_window,
    up,
    voronoi_maps,
)

COARSE = 2.0  # µm per pixel of the coarse fields
FIBRE_UM = 1.0  # µm per pixel of the collagen fibre field
TUMOUR_UM = 1.0  # µm per pixel of the tumour-cell tessellation


# ----------------------------------------------------------------------------- the slide, stage by stage
@dataclass
class _Canvas:
    """The slide being drawn at ``RES``: its size, the H, E and red (haemoglobin) amounts and the
    region masks (level-0 booleans) with the tumour mask on the coarse grid."""

    h_um: float
    w_um: float
    tissue: np.ndarray
    fat: np.ndarray
    tumour: np.ndarray
    necrosis: np.ndarray
    lumen: np.ndarray
    stroma: np.ndarray
    tum_c: np.ndarray
    shp: tuple[int, int] = field(init=False)
    cshp: tuple[int, int] = field(init=False)
    H: np.ndarray = field(init=False)
    E: np.ndarray = field(init=False)
    R: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.shp = self.tissue.shape
        self.cshp = (int(math.ceil(self.h_um / COARSE)), int(math.ceil(self.w_um / COARSE)))
        self.H = np.zeros(self.shp, np.float32)
        self.E = np.zeros(self.shp, np.float32)
        self.R = np.zeros(self.shp, np.float32)


@dataclass
class Rendered:
    """One drawn slide: ``img`` (uint8 RGB at ``RES`` µm/px), the truth maps (16 µm/px), the true
    sTIL% (as the held-out generator computed it), the JPEG quality and the slide's scene parameters."""

    img: np.ndarray
    truth: dict
    stil: float
    quality: int
    scene: dict


def _slide_params(rng: np.random.Generator, hard: bool) -> dict:
    """The slide-level draws: tumour, tissue and fat fractions, architecture, sTIL% target,
    intratumoral density, necrosis, granulocytes, plasma share, aggregates, nuclear scale."""
    p = {"tum_frac": rng.uniform(0.10, 0.85) if hard else rng.uniform(0.20, 0.60),
         "tis_frac": rng.uniform(0.50, 0.85)}
    p["fat_frac"] = rng.choice([0.0, rng.uniform(0.02, 0.10), rng.uniform(0.08, 0.25)], p=[0.35, 0.4, 0.25])
    p["arch"] = rng.choice(["nests", "cords", "glands", "mixed"], p=[0.35, 0.2, 0.2, 0.25])
    p["til_target"] = sample_true_til(rng)
    p_itil = 0.65 if hard else 0.15
    p["itil"] = ((rng.uniform(0.08, 0.45) if hard else rng.uniform(0.01, 0.05)) if rng.uniform() < p_itil
                 else rng.uniform(0, 0.01))
    p["has_necr"] = rng.uniform() < (0.5 if hard else 0.3)
    p["n_granulo"] = rng.uniform(0, 1) ** 2 * (3.0 if hard else 1.2)  # per 1000 µm² stroma (x1e-3)
    p["plasma_frac"] = rng.uniform(0.03, 0.25)
    p["agg_mode"] = rng.uniform() < 0.45
    p["nuc_scale"] = rng.uniform(0.85, 1.2)
    return p


def _layout(rng: np.random.Generator, p: dict, h_um: float, w_um: float) -> _Canvas:
    """Tissue, fat, tumour nests, necrosis and gland lumens: coarse noise fields thresholded at the
    slide's quantiles, resampled to ``RES``."""
    ch, cw = int(math.ceil(h_um / COARSE)), int(math.ceil(w_um / COARSE))
    shp, cshp = (int(round(h_um / RES)), int(round(w_um / RES))), (ch, cw)
    arch, fat_frac = p["arch"], p["fat_frac"]
    big = noise_field(rng, cshp, 180 / COARSE)
    mid = noise_field(rng, cshp, 45 / COARSE)
    small = noise_field(rng, cshp, 12 / COARSE)
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    ry = (yy / ch - 0.5) * 2
    rx = (xx / cw - 0.5) * 2
    rad = np.sqrt((ry / rng.uniform(0.9, 1.3)) ** 2 + (rx / rng.uniform(0.9, 1.3)) ** 2)
    tis_f = -1.6 * rad + 0.9 * big + 0.35 * mid + 0.15 * small
    holes = noise_field(rng, cshp, 10 / COARSE)
    tis_f = tis_f - 2.5 * np.clip(holes - 2.3, 0, None)  # occasional small holes / tears
    t_thr = np.quantile(tis_f, 1 - p["tis_frac"])

    fat_f = noise_field(rng, cshp, 70 / COARSE) + 0.3 * mid
    nest_bp = noise_field(rng, cshp, 14 / COARSE) - 0.6 * noise_field(rng, cshp, 40 / COARSE)
    zone = noise_field(rng, cshp, 160 / COARSE)
    if arch == "cords":
        nest_f = -np.abs(nest_bp) * 1.8 + 0.6 * zone
    elif arch == "mixed":
        nest_f = np.maximum(nest_bp, -np.abs(nest_bp) * 2.5 + 0.8) + 0.6 * zone
    else:
        nest_f = nest_bp + 0.7 * zone + (0.3 * noise_field(rng, cshp, 60 / COARSE) if arch == "glands" else 0)

    tis_c = tis_f > t_thr
    fat_thr = quantile_thr(fat_f, tis_c, fat_frac) if fat_frac > 0 else np.inf
    fat_c = tis_c & (fat_f > fat_thr)
    nt_mask = tis_c & ~fat_c
    want = p["tum_frac"] / max(1e-3, 1 - fat_frac)
    nest_thr = quantile_thr(nest_f, nt_mask, want)
    disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3.2
    got = ndi.binary_opening(nt_mask & (nest_f > nest_thr), structure=disk).sum() / max(1, nt_mask.sum())
    if 0 < got < want:  # the sliver removal below loses area: compensate once
        nest_thr = quantile_thr(nest_f, nt_mask, min(0.97, want * want / got))

    tissue = up(tis_f, shp) > t_thr
    fat = tissue & (up(fat_f, shp) > fat_thr)
    tumour = tissue & ~fat & (up(nest_f, shp) > nest_thr)
    # drop slivers thinner than about one tumour cell (no nuclei could sit there)
    tc0 = nt_mask & (nest_f > nest_thr)
    tumour &= up(ndi.binary_opening(tc0, structure=disk).astype(np.float32), shp) > 0.5
    tum_c = tumour[2::4, 2::4][:ch, :cw]
    dist_c = ndi.distance_transform_edt(tum_c) * COARSE  # µm from the nest edge
    necrosis = np.zeros(shp, bool)
    lumen = np.zeros(shp, bool)
    if p["has_necr"]:
        nf = dist_c + 6 * noise_field(rng, cshp, 8 / COARSE)
        thr = max(18.0, np.quantile(dist_c[tum_c], 0.80)) if tum_c.any() else 999
        necrosis = tumour & (up(nf.astype(np.float32), shp) > thr)
        if necrosis.mean() < 0.002 and tum_c.any():  # no big nests -> a patchy geographic focus
            cy, cx = rng.uniform(0.2, 0.8) * h_um, rng.uniform(0.2, 0.8) * w_um
            g = np.exp(-(((yy * COARSE - cy) / 120) ** 2 + ((xx * COARSE - cx) / 160) ** 2)) + 0.25 * small
            necrosis = tissue & ~fat & (up(g.astype(np.float32), shp) > 0.6)
    if arch in ("glands", "mixed"):
        lf = dist_c + 5 * noise_field(rng, cshp, 6 / COARSE)
        lum_thr = rng.uniform(9, 14)
        lumen = (tumour & ~necrosis & (up(lf.astype(np.float32), shp) > lum_thr)
                 & (up(noise_field(rng, cshp, 20 / COARSE), shp) > (-0.3 if arch == "glands" else 0.5)))
    tumour &= ~necrosis
    stroma = tissue & ~fat & ~tumour & ~necrosis
    return _Canvas(h_um, w_um, tissue, fat, tumour, necrosis, lumen, stroma, tum_c)


def _paint_stroma(rng: np.random.Generator, cv: _Canvas) -> np.ndarray:
    """Collagen: four oriented fibre fields blended by smooth weights, warped (wavy), with pale
    clefts; returns the dominant orientation (0-3, multiples of 45°) per µm for the fibroblasts."""
    fh, fw = int(math.ceil(cv.h_um / FIBRE_UM)), int(math.ceil(cv.w_um / FIBRE_UM))
    fibres = []
    for ang in (0, 45, 90, 135):
        n = rng.standard_normal((fh, fw)).astype(np.float32)
        if ang in (45, 135):
            n = ndi.rotate(n, ang, reshape=False, order=0, mode="wrap")
            f = ndi.gaussian_filter(n, (0.55, 6))
            f = ndi.rotate(f, -ang, reshape=False, order=1, mode="wrap")
        else:
            f = ndi.gaussian_filter(n, (0.55, 6) if ang == 0 else (6, 0.55))
        fibres.append(f / (f.std() + 1e-6))
    ow = [np.exp(2.2 * noise_field(rng, (fh, fw), 40)) for _ in range(4)]
    fib = sum(f * o for f, o in zip(fibres, ow)) / sum(ow)
    # wavy collagen: warp the fibre field with a smooth displacement
    gy, gx = np.mgrid[0:fh, 0:fw].astype(np.float32)
    amp_w = rng.uniform(2, 5)
    fib = ndi.map_coordinates(fib, [gy + amp_w * noise_field(rng, (fh, fw), 12),
                                    gx + amp_w * noise_field(rng, (fh, fw), 12)], order=1, mode="reflect")
    orient = np.argmax(np.stack(ow), 0)
    dens = noise_field(rng, (fh, fw), 50)
    e_str = rng.uniform(0.42, 0.65)
    coll = e_str * np.clip(0.72 + 0.4 * np.tanh(1.6 * fib) + 0.15 * dens, 0.12, 1.4)
    cleft = np.abs(noise_field(rng, (fh, fw), 3)) < 0.04  # pale clefts between bundles
    coll = np.where(cleft, coll * 0.35, coll)
    coll = up(coll.astype(np.float32), cv.shp)
    cv.E[cv.stroma] = coll[cv.stroma]
    cv.H[cv.stroma] = 0.03
    return orient


def _paint_fat(rng: np.random.Generator, cv: _Canvas) -> None:
    """Adipocytes: a Voronoi tessellation of jittered-hexagonal seeds (membranes where the two
    nearest seeds are about equally far), with a few flattened nuclei on the membranes."""
    fat, H, E = cv.fat, cv.H, cv.E
    ch, cw = cv.cshp
    fat_c2 = fat[2::4, 2::4][:ch, :cw]
    if not fat.any():
        return
    sy, sx = jitter_lattice(rng, cv.h_um, cv.w_um, rng.uniform(45, 75), 0.35)
    d1, d2, _ = voronoi_maps(np.stack([sy, sx], 1), ndi.binary_dilation(fat_c2, iterations=2), COARSE)
    gap = up(d2 - d1, cv.shp)
    memb = np.clip(1.0 - gap / 1.6, 0, 1)
    E[fat] = 0.45 * memb[fat] + 0.01
    H[fat] = 0.02
    cand = np.argwhere(fat & (memb > 0.8) & (up(d1, cv.shp) < 90))
    if len(cand):
        pick = rng.choice(len(cand), min(len(cand), int(fat.sum() * RES * RES / 12000)), replace=False)
        for py, px in cand[pick]:
            nuc = make_fibro(rng, rng.uniform(0, np.pi)) * 0.8
            stamp_nuc(H, E, py, px, nuc, (nuc > 0.3).astype(np.float32))


def _paint_tumour(rng: np.random.Generator, cv: _Canvas, nuc_scale: float) -> int:
    """Tumour cells: a Voronoi tessellation of jittered-hexagonal seeds in the nests (per-cell
    cytoplasm, membranes), a nucleus per seed from banks of four kinds; returns the cell count."""
    H, E, tumour, lumen = cv.H, cv.E, cv.tumour, cv.lumen
    h, w = cv.shp
    sp = rng.uniform(14, 19) * nuc_scale
    sy, sx = jitter_lattice(rng, cv.h_um, cv.w_um, sp, 0.33)
    iy = np.clip((sy / RES).astype(int), 0, h - 1)
    ix = np.clip((sx / RES).astype(int), 0, w - 1)
    keep = tumour[iy, ix] & ~lumen[iy, ix]
    sy, sx = sy[keep], sx[keep]
    n_cells = len(sy)
    th_, tw_ = int(math.ceil(cv.h_um / TUMOUR_UM)), int(math.ceil(cv.w_um / TUMOUR_UM))
    tum_1 = tumour[1::2, 1::2][:th_, :tw_]
    d1, d2, idx = voronoi_maps(np.stack([sy, sx], 1) if n_cells else np.zeros((0, 2)), tum_1, TUMOUR_UM)
    cell_e = rng.uniform(0.2, 0.38) * rng.uniform(0.8, 1.2, max(n_cells, 1)).astype(np.float32)
    cyto = np.where(idx >= 0, cell_e[np.maximum(idx, 0)], 0).astype(np.float32)
    memb = np.clip(1.0 - (d2 - d1) / 1.3, 0, 1) * (idx >= 0)
    cyto = cyto * (1 + 0.25 * noise_field(rng, cyto.shape, 1.2)) + 0.22 * memb
    cyto = up(cyto.astype(np.float32), cv.shp)
    tl = tumour & ~lumen
    E[tl] = cyto[tl]
    H[tl] = (rng.uniform(0.10, 0.22) * (1 + 0.3 * up(noise_field(rng, cv.cshp, 3), cv.shp)))[tl]
    E[lumen] = 0.06 * (rng.uniform() < 0.5)  # some lumina with faint secretion
    kinds = rng.choice(["vesicular", "hyper", "granular", "mitosis"], size=n_cells,
                       p=[0.42, 0.28, 0.285, 0.015])
    bank = {k: [make_tumour_nuc(rng, k, nuc_scale) for _ in range(24 if k != "mitosis" else 6)]
            for k in ("vesicular", "hyper", "granular", "mitosis")}
    for k in range(n_cells):
        nuc, m = bank[kinds[k]][rng.integers(len(bank[kinds[k]]))]
        stamp_nuc(H, E, sy[k] / RES, sx[k] / RES, nuc, m)
    return n_cells


def _paint_necrosis(rng: np.random.Generator, cv: _Canvas) -> None:
    """Necrosis: eosinophilic debris and karyorrhectic dust."""
    necrosis = cv.necrosis
    if not necrosis.any():
        return
    tx = up(noise_field(rng, cv.cshp, 4 / COARSE), cv.shp)
    cv.E[necrosis] = (rng.uniform(0.55, 0.85) * (1 + 0.25 * tx))[necrosis]
    cv.H[necrosis] = 0.12 + 0.05 * tx[necrosis]
    pts = np.zeros(cv.shp, np.float32)
    ny, nx = np.nonzero(necrosis)
    sel = rng.choice(len(ny), int(len(ny) * 0.012), replace=False)
    pts[ny[sel], nx[sel]] = rng.uniform(8, 30, len(sel))
    dust = ndi.gaussian_filter(pts, 1.2)
    cv.H += np.clip(dust, 0, 1.3) * necrosis


def _paint_vessels(rng: np.random.Generator, cv: _Canvas, str_area: float,
                   st_pts: np.ndarray) -> list[tuple[float, float, float]]:
    """Vessels in stroma (lumen, wall, red cells, endothelial nuclei along the rim); returns their
    (y, x, semi-axis) in µm. The lumen stays stroma in the truth."""
    H, E, R, stroma, shp = cv.H, cv.E, cv.R, cv.stroma, cv.shp
    h, w = shp
    n_ves = int(str_area / rng.uniform(15000, 35000))
    centres = []
    rbc_bank = [make_rbc(rng) for _ in range(8)]
    for _ in range(min(n_ves, len(st_pts))):
        py, px = st_pts[rng.integers(len(st_pts))]
        a = rng.uniform(5, 22)
        b = a * rng.uniform(0.35, 0.9)
        th = rng.uniform(0, np.pi)
        rr_ = int((a + 6) / RES)
        if not all(stroma[min(h - 1, max(0, py + oy)), min(w - 1, max(0, px + ox))]
                   for oy, ox in ((rr_, 0), (-rr_, 0), (0, rr_), (0, -rr_))):
            continue
        centres.append((py * RES, px * RES, a))
        n = int((a + 5) / RES) + 2
        y0, y1 = max(0, py - n), min(h, py + n + 1)
        x0, x1 = max(0, px - n), min(w, px + n + 1)
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        yy_ = (gy - py) * RES
        xx_ = (gx - px) * RES
        c, s = math.cos(th), math.sin(th)
        xr = c * xx_ + s * yy_
        yr = -s * xx_ + c * yy_
        r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        st = stroma[y0:y1, x0:x1]
        lum = (r < 1.0) & st
        wall = (r >= 1.0) & (r < 1.0 + 3.0 / b) & st
        E[y0:y1, x0:x1][lum] = 0.05
        E[y0:y1, x0:x1][wall] = np.maximum(E[y0:y1, x0:x1][wall], 0.75)
        n_rbc = int(rng.uniform(0.1, 0.7) * math.pi * a * b / 12)
        for _ in range(n_rbc):
            rr = math.sqrt(rng.uniform()) * 0.85
            an = rng.uniform(0, 2 * np.pi)
            ly, lx = rr * b * math.sin(an), rr * a * math.cos(an)
            cy, cx = py + (s * lx + c * ly) / RES, px + (c * lx - s * ly) / RES
            m, _ = rbc_bank[rng.integers(8)]
            ww = tile_window(shp, cy, cx, *m.shape)
            if ww is None:
                continue
            (dy, dx), (sy_, sx_) = ww
            np.maximum(R[dy, dx], m[sy_, sx_] * stroma[dy, dx], out=R[dy, dx])
        n_endo = max(2, int(2 * math.pi * math.sqrt((a * a + b * b) / 2) / 14))
        for k in range(n_endo):
            an = 2 * np.pi * k / n_endo + rng.uniform(-0.2, 0.2)
            ly, lx = (b + 0.8) * math.sin(an), (a + 0.8) * math.cos(an)
            dly, dlx = b * math.cos(an), -a * math.sin(an)
            tang = math.atan2(s * dlx + c * dly, c * dlx - s * dly)  # tangent (y, x) in image coords
            nuc = make_fibro(rng, tang) * 0.9
            stamp_nuc(H, E, py + (s * lx + c * ly) / RES, px + (c * lx - s * ly) / RES, nuc,
                      (nuc > 0.3).astype(np.float32))
    return centres


def _paint_fibroblasts(rng: np.random.Generator, cv: _Canvas, orient: np.ndarray, str_area: float,
                       st_pts: np.ndarray) -> None:
    """Spindle fibroblast nuclei in stroma, oriented along the local fibres."""
    n_fib = int(str_area / rng.uniform(500, 1100))
    if not (len(st_pts) and n_fib):
        return
    fh, fw = orient.shape
    fb_bank = {o: [make_fibro(rng, -np.deg2rad(o * 45) + rng.normal(0, 0.15)) for _ in range(8)]
               for o in range(4)}
    pts = np.argwhere(cv.stroma[::3, ::3]) * 3
    sel = pts[rng.choice(len(pts), min(n_fib, len(pts)), replace=False)]
    for py, px in sel:
        o = orient[min(fh - 1, int(py * RES / FIBRE_UM)), min(fw - 1, int(px * RES / FIBRE_UM))]
        nuc = fb_bank[o][rng.integers(8)]
        stamp_nuc(cv.H, cv.E, py, px, nuc * 0.8, (nuc > 0.3).astype(np.float32), e_keep=0.75)


def _paint_inflammatory(rng: np.random.Generator, cv: _Canvas, p: dict, hard: bool,
                        ves_centres: list, str_area: float, st_pts: np.ndarray) -> np.ndarray:
    """Lymphocytes and plasma cells on a jittered hexagonal lattice, each site accepted with the
    probability of a TIL density field (aggregates, perivascular cuffs, the tumour border) scaled to
    the slide's sTIL% target in stroma, and with an independent intratumoral density in tumour; then
    neutrophils and eosinophils, which overwrite. Returns the lymphocyte-body mask (alpha > 0.5)."""
    H, E, shp, cshp = cv.H, cv.E, cv.shp, cv.cshp
    stroma, tumour, lumen, necrosis = cv.stroma, cv.tumour, cv.lumen, cv.necrosis
    h, w = shp
    ch, cw = cshp
    til_target, itil = p["til_target"], p["itil"]
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    mod = 0.6 + 0.5 * np.exp(noise_field(rng, cshp, 30 / COARSE) * 0.8)
    if p["agg_mode"]:
        n_agg = int(rng.integers(1, 6))
        for _ in range(n_agg):
            cy, cx = rng.uniform(0, cv.h_um), rng.uniform(0, cv.w_um)
            rr = rng.uniform(30, 90)
            mod += rng.uniform(3, 8) * np.exp(-(((yy * COARSE - cy) ** 2 + (xx * COARSE - cx) ** 2)
                                                / (2 * rr * rr)))
    for vy, vx, a in ves_centres:
        if rng.uniform() < 0.5:
            d = np.sqrt((yy * COARSE - vy) ** 2 + (xx * COARSE - vx) ** 2)
            mod += rng.uniform(1, 4) * np.exp(-((d - a - 8) / 10) ** 2)
    dist_tum = ndi.distance_transform_edt(~cv.tum_c) * COARSE
    mod *= 1 + rng.uniform(0, 1.5) * np.exp(-dist_tum / 60)
    mod = mod ** (1.0 - 0.85 * til_target / 100.0)  # dense infiltrates are diffuse
    str_c = stroma[2::4, 2::4][:ch, :cw]
    mean_mod = mod[str_c].mean() if str_c.any() else 1.0
    packing = 0.93
    tt = til_target / 100.0
    p_str = np.clip(tt * (1 + 0.05 * tt) * mod / mean_mod / packing, 0, 1)
    # tumour (intratumoral, not counted) density
    p_tum = np.clip(itil * (0.4 + 0.6 * np.exp(noise_field(rng, cshp, 25 / COARSE))) / 1.4, 0, 0.9)
    p_nec = 0.05 if hard else 0.02
    lsp = rng.uniform(6.3, 6.9)
    ly, lx = jitter_lattice(rng, cv.h_um, cv.w_um, lsp, 0.18)
    cy_ = np.clip((ly / COARSE).astype(int), 0, ch - 1)
    cx_ = np.clip((lx / COARSE).astype(int), 0, cw - 1)
    fy_ = np.clip((ly / RES).astype(int), 0, h - 1)
    fx_ = np.clip((lx / RES).astype(int), 0, w - 1)
    in_s = stroma[fy_, fx_]
    in_t = tumour[fy_, fx_] & ~lumen[fy_, fx_]
    in_n = necrosis[fy_, fx_]
    prob = np.where(in_s, p_str[cy_, cx_], 0) + np.where(in_t, p_tum[cy_, cx_], 0) + np.where(in_n, p_nec, 0)
    acc = rng.uniform(size=prob.shape) < prob
    ly, lx, is_s = ly[acc], lx[acc], in_s[acc]
    lymph_mask = np.zeros(shp, bool)
    lb = [make_lymph(rng) for _ in range(30)]
    pb = [make_plasma(rng) for _ in range(20)]
    order = rng.permutation(len(ly))
    isplasma = (rng.uniform(size=len(ly)) < p["plasma_frac"]) & is_s
    for k in order:
        cell, nuc, ev, hv = (pb[rng.integers(20)] if isplasma[k] else lb[rng.integers(30)])
        stamp_cell(H, E, ly[k] / RES, lx[k] / RES, cell, nuc, ev, hv, lymph_mask)
    # neutrophils and eosinophils overwrite: their bodies leave the lymphocyte mask
    n_gr = int(str_area * p["n_granulo"] / 1000 * 0.1)
    if n_gr and len(st_pts):
        nb = [make_neutro(rng) for _ in range(12)]
        eb = [make_eosino(rng) for _ in range(12)]
        eo_frac = rng.uniform(0.1, 0.9)
        clus = st_pts[rng.integers(len(st_pts), size=max(1, n_gr // 25))]
        for _ in range(n_gr):
            if rng.uniform() < 0.5:
                py, px = st_pts[rng.integers(len(st_pts))]
            else:
                c0 = clus[rng.integers(len(clus))]
                py, px = c0[0] + rng.normal(0, 40), c0[1] + rng.normal(0, 40)
            py = int(np.clip(py, 0, h - 1))
            px = int(np.clip(px, 0, w - 1))
            if not stroma[py, px]:
                continue
            cell, nuc, ev, hv = (eb if rng.uniform() < eo_frac else nb)[rng.integers(12)]
            stamp_cell(H, E, py, px, cell, nuc, ev, hv)
            ww = tile_window(shp, py, px, *cell.shape)
            if ww is not None:
                (dy, dx), (sy_, sx_) = ww
                lymph_mask[dy, dx] &= ~(cell[sy_, sx_] > 0.5)
    return lymph_mask


def _truth(cv: _Canvas, lymph_mask: np.ndarray) -> tuple[dict, float]:
    """Area-fraction maps at ``TRUTH_UM`` (before any artefact) and the slide's true sTIL%."""
    h, w = cv.shp
    bs = int(TRUTH_UM / RES)
    mh, mw = int(math.ceil(cv.h_um / TRUTH_UM)), int(math.ceil(cv.w_um / TRUTH_UM))

    def block(m: np.ndarray) -> np.ndarray:
        pad = np.zeros((mh * bs, mw * bs), np.float32)
        pad[:h, :w] = m
        return pad.reshape(mh, bs, mw, bs).mean((1, 3)).astype(np.float32)

    truth = {"stroma": block(cv.stroma), "lymph_in_stroma": block(lymph_mask & cv.stroma),
             "tumour": block(cv.tumour), "fat": block(cv.fat), "tissue": block(cv.tissue),
             "necrosis": block(cv.necrosis)}
    stil = float(100.0 * truth["lymph_in_stroma"].sum() / max(truth["stroma"].sum(), 1e-9))
    return truth, stil


def _stain_and_scan(rng: np.random.Generator, cv: _Canvas, hard: bool) -> np.ndarray:
    """Beer-Lambert colour from per-slide H and E vectors and intensities (with smooth uneven
    staining), a fold, a pen mark, focus blur varying across the slide, stitching seams and noise."""
    shp, cshp, tissue = cv.shp, cv.cshp, cv.tissue
    h, w = shp
    ch, cw = cshp
    sv = 2.0 if hard else 1.0
    hvec = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.05 * sv, 3)
    evec = np.array([0.05, 0.90, 0.40]) + rng.normal(0, 0.05 * sv, 3)
    rvec = np.array([0.15, 1.0, 0.85])
    hvec = np.clip(hvec, 0.02, None)
    evec = np.clip(evec, 0.01, None)
    hvec = hvec / np.linalg.norm(hvec) * 2.0
    evec = evec / np.linalg.norm(evec) * 0.98
    rvec = rvec / np.linalg.norm(rvec) * 1.9
    h_int = np.exp(rng.normal(0, 0.13 * sv))
    e_int = np.exp(rng.normal(0, 0.16 * sv))
    uh = up(1 + 0.08 * sv * noise_field(rng, (ch // 4 + 1, cw // 4 + 1), 20), shp)
    ue = up(1 + 0.10 * sv * noise_field(rng, (ch // 4 + 1, cw // 4 + 1), 20), shp)
    Hs = cv.H * (h_int * uh)
    Es = cv.E * (e_int * ue)
    tissue_od = 0.03 * tissue  # faint section background density
    # tissue fold: doubled section -> higher optical density in a band
    if rng.uniform() < (0.3 if hard else 0.08):
        a0 = rng.uniform(0, np.pi)
        c0 = rng.uniform(0.2, 0.8, 2) * [h, w]
        gy, gx = np.mgrid[0:ch, 0:cw].astype(np.float32) * (COARSE / RES)
        dd = (gy - c0[0]) * math.cos(a0) - (gx - c0[1]) * math.sin(a0)
        dd = dd + 40 * noise_field(rng, cshp, 60)
        band = (np.abs(dd) < rng.uniform(40, 120)).astype(np.float32)
        band = up(ndi.gaussian_filter(band, 2), shp) * tissue
        f = 1 + 0.9 * band
        Hs *= f
        Es *= f
    hvec, evec, rvec = hvec.astype(np.float32), evec.astype(np.float32), rvec.astype(np.float32)
    Hs, Es, tissue_od = Hs.astype(np.float32), Es.astype(np.float32), tissue_od.astype(np.float32)
    OD = Hs[..., None] * hvec + Es[..., None] * evec + cv.R[..., None] * rvec + tissue_od[..., None]
    I0 = np.array([241, 240, 242], np.float32) + rng.normal(0, 2.5, 3).astype(np.float32)
    img = I0 * np.exp(-OD.astype(np.float32))
    del OD
    if rng.uniform() < (0.3 if hard else 0.1):  # pen mark
        col = [np.array(v) for v in ([0.9, 0.3, 0.1], [0.8, 0.15, 0.9], [0.9, 0.9, 0.9])][rng.integers(3)]
        p0 = rng.uniform(0, 1, 2) * [cv.h_um, cv.w_um]
        p1 = rng.uniform(0, 1, 2) * [cv.h_um, cv.w_um]
        bend = rng.normal(0, 150, 2)
        pen = np.zeros(cshp, np.float32)
        for t in np.linspace(0, 1, 200):
            pt = p0 * (1 - t) + p1 * t + bend * math.sin(math.pi * t)
            py, px = int(pt[0] / COARSE), int(pt[1] / COARSE)
            if 0 <= py < ch and 0 <= px < cw:
                pen[py, px] = 1
        pen = ndi.gaussian_filter(
            ndi.binary_dilation(pen > 0, iterations=int(rng.integers(4, 12))).astype(np.float32), 1.5)
        pen = up(pen, shp) * rng.uniform(0.8, 1.6)
        img *= np.exp(-pen[..., None] * col.astype(np.float32))
    # focus blur varying across the slide
    s_lo = rng.uniform(0.35, 0.7) * (1.3 if hard else 1.0)
    s_hi = s_lo + rng.uniform(0.3, 1.0) * (1.8 if hard else 1.0)
    fw_ = up(np.clip(noise_field(rng, (ch // 8 + 1, cw // 8 + 1), 6) * 0.6 + 0.3, 0, 1).astype(np.float32),
             shp)
    b1 = ndi.gaussian_filter(img, (s_lo, s_lo, 0), truncate=3.0)
    b2 = ndi.gaussian_filter(img, (s_hi, s_hi, 0), truncate=3.0)
    img = b1 + (b2 - b1) * fw_[..., None]
    del b1, b2
    if rng.uniform() < (0.6 if hard else 0.25):  # stitching seams: per-stripe brightness steps
        step = int(rng.choice([600, 800, 1000]))
        amp = 0.03 if hard else 0.015
        for x0 in range(0, w, step):
            img[:, x0:x0 + step] *= 1 + rng.normal(0, amp)
    img += (rng.standard_normal(img.shape).astype(np.float32)
            * (rng.uniform(2, 5) if hard else rng.uniform(1, 2.5)))
    return np.clip(img, 0, 255).astype(np.uint8)


def render(rng: np.random.Generator, hard: bool, h_um: float, w_um: float) -> Rendered:
    """Draw one slide of ``h_um`` x ``w_um`` µm at ``RES`` µm/px with ``rng`` (the slide's stream,
    after its scan-resolution draw), in the held-out generator's order of random draws."""
    p = _slide_params(rng, hard)
    cv = _layout(rng, p, h_um, w_um)
    orient = _paint_stroma(rng, cv)
    _paint_fat(rng, cv)
    n_tumour = _paint_tumour(rng, cv, p["nuc_scale"])
    _paint_necrosis(rng, cv)
    str_area = cv.stroma.sum() * RES * RES
    st_pts = np.argwhere(cv.stroma[::8, ::8]) * 8
    ves_centres = _paint_vessels(rng, cv, str_area, st_pts)
    _paint_fibroblasts(rng, cv, orient, str_area, st_pts)
    lymph_mask = _paint_inflammatory(rng, cv, p, hard, ves_centres, str_area, st_pts)
    truth, stil = _truth(cv, lymph_mask)
    img = _stain_and_scan(rng, cv, hard)
    quality = int(rng.integers(68, 84)) if hard else int(rng.integers(85, 93))
    scene = {"arch": str(p["arch"]), "target_stil": round(float(p["til_target"]), 3),
             "intratumoral": round(float(p["itil"]), 4), "tumour_frac": round(float(p["tum_frac"]), 4),
             "fat_frac": round(float(p["fat_frac"]), 4), "necrosis": bool(p["has_necr"]),
             "tumour_cells": n_tumour, "vessels": len(ves_centres), "jpeg_quality": quality}
    return Rendered(img, truth, stil, quality, scene)
