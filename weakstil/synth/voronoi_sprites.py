"""Drawing pieces of the ``voronoi`` family (:mod:`weakstil.synth.voronoi_render` assembles a slide from
them): smooth noise fields, the cell sprites (lymphocyte, plasma cell, neutrophil, eosinophil,
fibroblast, tumour nucleus, red cell) and how they are stamped into the H and E amounts, jittered
lattices, the Voronoi maps of a tessellation and the slide's sTIL% target."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

RES = 0.5  # render resolution, µm/px (a 0.25 µm/px scan is this image upsampled)


# ----------------------------------------------------------------------------- fields
def noise_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise (periodic), zero mean and unit s.d.; a coarse grid upsampled
    for large ``sigma_px``."""
    if sigma_px > 4:  # smooth noise: generate on a reduced grid, then upsample
        k = sigma_px / 3.0
        sh = (max(4, int(math.ceil(shape[0] / k)) + 1), max(4, int(math.ceil(shape[1] / k)) + 1))
        g = ndi.gaussian_filter(rng.standard_normal(sh).astype(np.float32), 3.0, mode="wrap")
        f = up(g, (int(round(sh[0] * k)), int(round(sh[1] * k))))[:shape[0], :shape[1]]
        f = np.ascontiguousarray(f)
    else:
        f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    f -= f.mean()
    s = f.std()
    return f / (s if s > 0 else 1.0)


def up(f: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resample of a field to ``shape`` (float32, Pillow)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(f, dtype=np.float32))
                      .resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32)


def quantile_thr(field: np.ndarray, mask: np.ndarray, frac: float) -> float:
    """The threshold above which ``frac`` of ``field``'s pixels in ``mask`` lie (inf for an empty mask)."""
    vals = field[mask]
    if vals.size == 0:
        return np.inf
    frac = min(max(frac, 0.0), 1.0)
    return np.quantile(vals, 1.0 - frac)


# ----------------------------------------------------------------------------- patches
def _grid(rad_um: float) -> list[np.ndarray]:
    """(yy, xx) µm coordinates of a square sprite at ``RES`` reaching ``rad_um`` from its centre."""
    n = int(math.ceil(rad_um / RES)) + 2
    ax = (np.arange(-n, n + 1) * RES).astype(np.float32)
    return np.meshgrid(ax, ax, indexing="ij")  # yy, xx in um


def blob(yy, xx, cy, cx, a, b, th, rough=None, edge=0.45):
    """Soft ellipse (values 0..1) of radii ``a``, ``b`` µm at angle ``th``, its border roughened by
    (amplitude, frequency, phase) harmonics; also returns the normalised radius."""
    y = yy - cy
    x = xx - cx
    c, s = math.cos(th), math.sin(th)
    xr = c * x + s * y
    yr = -s * x + c * y
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    if rough is not None:
        ang = np.arctan2(yr, xr)
        k = np.zeros_like(r)
        for (amp, freq, ph) in rough:
            k += amp * np.sin(freq * ang + ph)
        r = r / (1.0 + k)
    return np.clip((1.0 - r) * min(a, b) / edge + 0.5, 0.0, 1.0), r


def tex(rng, shape, sig=0.8, amp=0.3):
    """Multiplicative chromatin/granule texture around 1."""
    t = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig)
    t /= (t.std() + 1e-6)
    return 1.0 + amp * t


def make_lymph(rng):
    """A lymphocyte sprite: (cell alpha, nucleus H, cytoplasm E, cytoplasm H)."""
    rn = rng.uniform(2.5, 3.2)
    rc = rn + rng.uniform(0.4, 0.8)
    yy, xx = _grid(rc + 1)
    off = rng.uniform(0, 0.5)
    ang = rng.uniform(0, 2 * np.pi)
    cell, _ = blob(yy, xx, 0, 0, rc, rc * rng.uniform(0.85, 1.0), ang)
    rough = [(rng.uniform(0, 0.06), 3, rng.uniform(0, 6)), (rng.uniform(0, 0.04), 5, rng.uniform(0, 6))]
    nuc, _ = blob(yy, xx, off * math.sin(ang), off * math.cos(ang), rn, rn * rng.uniform(0.85, 1.0),
                  rng.uniform(0, np.pi), rough)
    nuc = nuc * rng.uniform(1.05, 1.35) * tex(rng, nuc.shape, 0.7, 0.15)
    return cell.astype(np.float32), nuc.astype(np.float32), 0.12, 0.10


def make_plasma(rng):
    """A plasma-cell sprite (eccentric clock-face nucleus, perinuclear hof), as :func:`make_lymph`."""
    a = rng.uniform(4.0, 4.9)
    b = a * rng.uniform(0.7, 0.85)
    th = rng.uniform(0, np.pi)
    yy, xx = _grid(a + 1)
    cell, _ = blob(yy, xx, 0, 0, a, b, th)
    rn = rng.uniform(2.3, 2.7)
    d = a - rn - 0.2
    cy, cx = d * math.sin(th), d * math.cos(th)
    nuc, r = blob(yy, xx, cy, cx, rn, rn * 0.95, 0)
    # clock-face chromatin: clumps near the rim
    ang = np.arctan2(yy - cy, xx - cx)
    clock = 0.8 + 0.3 * (np.cos(7 * ang + rng.uniform(0, 6)) > 0.2) * (r > 0.5) + 0.15 * (r < 0.25)
    nuc = nuc * clock * rng.uniform(1.0, 1.25)
    # perinuclear hof reduces cytoplasm stain
    hof, _ = blob(yy, xx, cy * 0.1, cx * 0.1, 1.6, 1.4, th)
    cyto_h = 0.30 * (1 - 0.6 * hof)
    return cell.astype(np.float32), nuc.astype(np.float32), 0.30, cyto_h.astype(np.float32)


def make_neutro(rng):
    """A neutrophil sprite (3-4 lobes joined by chromatin bridges), as :func:`make_lymph`."""
    rc = rng.uniform(4.8, 5.8)
    yy, xx = _grid(rc + 1)
    cell, _ = blob(yy, xx, 0, 0, rc, rc * rng.uniform(0.85, 1), rng.uniform(0, np.pi))
    nl = rng.integers(3, 5)
    nuc = np.zeros_like(cell)
    a0 = rng.uniform(0, 2 * np.pi)
    pts = []
    for k in range(nl):
        ang = a0 + 2 * np.pi * k / nl + rng.uniform(-0.4, 0.4)
        rr = rng.uniform(1.4, 2.2)
        pts.append((rr * math.sin(ang), rr * math.cos(ang)))
        l, _ = blob(yy, xx, pts[-1][0], pts[-1][1], rng.uniform(1.1, 1.5), rng.uniform(0.9, 1.2),
                    rng.uniform(0, np.pi), edge=0.3)
        nuc = np.maximum(nuc, l)
    for k in range(nl - 1):  # thin chromatin bridges
        (y0, x0), (y1, x1) = pts[k], pts[k + 1]
        for t in np.linspace(0, 1, 5):
            l, _ = blob(yy, xx, y0 + t * (y1 - y0), x0 + t * (x1 - x0), 0.45, 0.45, 0, edge=0.25)
            nuc = np.maximum(nuc, l)
    return cell.astype(np.float32), (nuc * 1.25).astype(np.float32), 0.28, 0.04


def make_eosino(rng):
    """An eosinophil sprite (bilobed nucleus, granular eosinophilic cytoplasm), as :func:`make_lymph`."""
    rc = rng.uniform(5.2, 6.3)
    yy, xx = _grid(rc + 1)
    cell, _ = blob(yy, xx, 0, 0, rc, rc * rng.uniform(0.85, 1), rng.uniform(0, np.pi))
    nuc = np.zeros_like(cell)
    a0 = rng.uniform(0, np.pi)
    for sgn in (-1, 1):
        l, _ = blob(yy, xx, sgn * 1.9 * math.sin(a0), sgn * 1.9 * math.cos(a0), 1.7, 1.3, a0, edge=0.3)
        nuc = np.maximum(nuc, l)
    gran = np.clip(tex(rng, cell.shape, 0.45, 0.6), 0.3, 2.0).astype(np.float32)
    return cell.astype(np.float32), (nuc * 1.1).astype(np.float32), (0.9 * gran).astype(np.float32), 0.03


def make_fibro(rng, th):
    """A spindle nucleus (fibroblast, endothelium, adipocyte) along angle ``th``."""
    a = rng.uniform(4.5, 8.5)
    b = rng.uniform(0.8, 1.4)
    yy, xx = _grid(a + 1)
    rough = [(0.06, 2, rng.uniform(0, 6))]
    nuc, _ = blob(yy, xx, 0, 0, a, b, th, rough, edge=0.3)
    return nuc.astype(np.float32) * rng.uniform(0.9, 1.3)


def make_tumour_nuc(rng, kind, scale):
    """A tumour nucleus of ``kind`` (vesicular, hyper, granular, mitosis): (H amount, mask)."""
    a = rng.uniform(4.0, 7.5) * scale
    b = a * rng.uniform(0.65, 0.95)
    th = rng.uniform(0, np.pi)
    L = rng.uniform(3.5, 6) * scale
    if kind == "mitosis":
        a = max(a, L + 1.5)
        b = a * 0.8
    yy, xx = _grid(a + 1)
    rough = [(rng.uniform(0.02, 0.10), 2, rng.uniform(0, 6)),
             (rng.uniform(0.0, 0.07), 3, rng.uniform(0, 6)),
             (rng.uniform(0.0, 0.05), 5, rng.uniform(0, 6))]
    m, r = blob(yy, xx, 0, 0, a, b, th, rough, edge=0.5)
    if kind == "vesicular":
        v = m * (0.32 + 0.55 * np.clip((r - 0.62) / 0.3, 0, 1)) * tex(rng, m.shape, 1.0, 0.35)
        nn = rng.integers(1, 3)
        for _ in range(nn):
            rr = rng.uniform(0, 0.4) * a
            an = rng.uniform(0, 2 * np.pi)
            nl, _ = blob(yy, xx, rr * math.sin(an), rr * math.cos(an), rng.uniform(0.8, 1.3),
                         rng.uniform(0.7, 1.1), 0, edge=0.3)
            v = np.maximum(v, nl * 1.05)
    elif kind == "hyper":
        v = m * rng.uniform(0.95, 1.3) * tex(rng, m.shape, 0.8, 0.2)
    elif kind == "mitosis":
        # condensed chromosome plate / clumps, no nuclear membrane
        v = np.zeros_like(m)
        for _ in range(int(rng.integers(12, 22))):
            t = rng.uniform(-L, L)
            cy = t * math.sin(th) + rng.normal(0, 0.8)
            cx = t * math.cos(th) + rng.normal(0, 0.8)
            l, _ = blob(yy, xx, cy, cx, rng.uniform(0.8, 1.6), rng.uniform(0.5, 0.9), rng.uniform(0, np.pi),
                        edge=0.25)
            v = np.maximum(v, l * 1.5)
    else:  # coarse granular
        v = m * (0.55 + 0.25 * (r > 0.7)) * tex(rng, m.shape, 0.6, 0.45)
    return np.clip(v, 0, 2).astype(np.float32), m.astype(np.float32)


def make_rbc(rng):
    """A red-cell sprite (biconcave: paler centre): (red amount, mask)."""
    r = rng.uniform(3.0, 3.8)
    yy, xx = _grid(r + 1)
    m, rr = blob(yy, xx, 0, 0, r, r * rng.uniform(0.75, 1.0), rng.uniform(0, np.pi), edge=0.3)
    return (m * (1 - 0.35 * (rr < 0.5))).astype(np.float32), m.astype(np.float32)


# ----------------------------------------------------------------------------- stamping
def tile_window(shape, y, x, ph, pw):
    """(image slices, sprite slices) of a ``ph`` x ``pw`` sprite centred at (y, x) px, clipped; None
    when it falls outside."""
    y0 = int(round(y)) - ph // 2
    x0 = int(round(x)) - pw // 2
    y1 = y0 + ph
    x1 = x0 + pw
    sy0 = max(0, -y0)
    sx0 = max(0, -x0)
    sy1 = ph - max(0, y1 - shape[0])
    sx1 = pw - max(0, x1 - shape[1])
    if sy1 <= sy0 or sx1 <= sx0:
        return None
    return (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1)), (slice(sy0, sy1), slice(sx0, sx1))


def stamp_cell(H, E, y, x, cell, nuc, e_val, h_val, mask=None, mask_thr=0.5):
    """Paint a cell sprite over H and E (alpha blend, nucleus on top); mark its body (alpha >
    ``mask_thr``) in ``mask``."""
    w = tile_window(H.shape, y, x, cell.shape[0], cell.shape[1])
    if w is None:
        return
    (dy, dx), (sy, sx) = w
    a = cell[sy, sx]
    ev = e_val[sy, sx] if isinstance(e_val, np.ndarray) else e_val
    hv = h_val[sy, sx] if isinstance(h_val, np.ndarray) else h_val
    Er = E[dy, dx]
    Hr = H[dy, dx]
    Er *= (1 - a)
    Er += a * ev
    Hr *= (1 - a)
    Hr += a * hv
    np.maximum(Hr, nuc[sy, sx], out=Hr)
    if mask is not None:
        mask[dy, dx] |= a > mask_thr


def stamp_nuc(H, E, y, x, nuc, m, e_keep=0.55):
    """Paint a bare nucleus: H is the maximum, E is dimmed to ``e_keep`` under its mask."""
    w = tile_window(H.shape, y, x, nuc.shape[0], nuc.shape[1])
    if w is None:
        return
    (dy, dx), (sy, sx) = w
    Hr = H[dy, dx]
    np.maximum(Hr, nuc[sy, sx], out=Hr)
    E[dy, dx] *= (1 - (1 - e_keep) * m[sy, sx])


# ----------------------------------------------------------------------------- slide
def jitter_lattice(rng, h_um, w_um, sp, jit):
    """A hexagonal lattice of spacing ``sp`` µm, jittered by ``jit``·sp; (y, x) µm inside the canvas."""
    rows = int(h_um / (sp * 0.866)) + 2
    cols = int(w_um / sp) + 2
    r, c = np.mgrid[0:rows, 0:cols]
    y = r * sp * 0.866
    x = c * sp + (r % 2) * sp * 0.5
    y = y + rng.uniform(-jit, jit, y.shape) * sp
    x = x + rng.uniform(-jit, jit, x.shape) * sp
    y = y.ravel() - sp * 0.5
    x = x.ravel() - sp * 0.5
    ok = (y >= 0) & (y < h_um) & (x >= 0) & (x < w_um)
    return y[ok], x[ok]


def sample_true_til(rng):
    """The slide's sTIL% target: 66 % log-uniform 1-20, 24 % U(20, 60), 10 % U(60, 95)."""
    u = rng.uniform()
    if u < 0.66:
        return float(np.exp(rng.uniform(np.log(1.0), np.log(20.0))))
    if u < 0.90:
        return float(rng.uniform(20, 60))
    return float(rng.uniform(60, 95))


def voronoi_maps(seeds_yx_um, mask_c, step_um):
    """Distances to the nearest and second-nearest seed (µm) and the nearest seed's index, for the
    pixels of ``mask_c`` (``step_um`` µm per pixel); 99 µm and -1 elsewhere."""
    yy, xx = np.nonzero(mask_c)
    pts = np.stack([(yy + 0.5) * step_um, (xx + 0.5) * step_um], 1)
    d1 = np.full(mask_c.shape, 99.0, np.float32)
    d2 = np.full(mask_c.shape, 99.0, np.float32)
    idx = np.full(mask_c.shape, -1, np.int32)
    if len(seeds_yx_um) >= 2 and len(pts):
        tree = cKDTree(seeds_yx_um)
        d, i = tree.query(pts, k=2)
        d1[yy, xx] = d[:, 0]
        d2[yy, xx] = d[:, 1]
        idx[yy, xx] = i[:, 0]
    return d1, d2, idx
