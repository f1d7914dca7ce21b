"""Drawing parts of the ``regions`` family (:mod:`weakstil.synth.regions`): smooth random fields and
their resampling, the level-0 canvas (H, E and "red" amounts, region codes, inflammatory-cell bodies)
and the cell sprites (tumour nuclei, mitoses, spindles, lymphocytes, plasma cells, red-cell fields,
pen strokes). Moved unchanged from the held-out generator: a seed draws the same shapes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

# region codes (per level-0 pixel)
BG, STROMA, TUMOUR, FAT, NECROSIS, VESSEL = 0, 1, 2, 3, 4, 5
CG = 2.0  # coarse grid for compartment geometry (µm / px)
VG = 1.0  # grid for Voronoi (cell borders, adipocyte membranes) (µm / px)

# ----------------------------------------------------------------------------- helpers
def resample(c, c_px, shape, px):
    """Bilinear resampling of grid c (pixel centres at (i+.5)*c_px um) to a grid of `shape`
    with pixel size px (um)."""
    def idx(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * (px / c_px) - 0.5
        x = np.clip(x, 0, n_in - 1.000001)
        i0 = np.floor(x).astype(np.intp)
        return i0, (x - i0).astype(np.float32)
    c = np.asarray(c, np.float32)
    iy, wy = idx(shape[0], c.shape[0])
    ix, wx = idx(shape[1], c.shape[1])
    rows = c[iy] + (c[iy + 1] - c[iy]) * wy[:, None]
    d = np.empty_like(rows)
    d[:, :-1] = rows[:, 1:] - rows[:, :-1]
    d[:, -1] = 0
    out = rows[:, ix]
    out += d[:, ix] * wx
    return out


def noise(rng, shape, px, scale, aniso=1.0, angle=0.0):
    """Smooth gaussian random field (unit sd) on a grid of `shape` with pixel px (um);
    correlation length ~ scale (um). aniso>1 stretches it along `angle` (rad)."""
    g = max(px, scale / 3.0)           # generation grid spacing
    pad = 6 if aniso == 1.0 else int(6 * aniso) + 6
    ls = (int(math.ceil(shape[0] * px / g)) + 2 * pad, int(math.ceil(shape[1] * px / g)) + 2 * pad)
    n = rng.standard_normal(ls).astype(np.float32)
    sig = scale / g
    if aniso == 1.0:
        n = ndi.gaussian_filter(n, sig, mode='wrap')
    else:
        n = ndi.gaussian_filter(n, (sig, sig * aniso), mode='wrap')
        n = ndi.rotate(n, math.degrees(angle), reshape=False, order=1, mode='wrap')
    n = n[pad:-pad, pad:-pad]
    n = (n - n.mean()) / (n.std() + 1e-8)
    if g == px:
        return np.ascontiguousarray(n[:shape[0], :shape[1]])
    # resample: generation grid pixel centres are at (i+.5)*g
    return resample(n, g, shape, px)


def grid_lookup(grid, u, v):
    """periodic bilinear lookup of a (2^k x 2^m) grid at float coordinates (u: rows, v: cols)."""
    nu, nv = grid.shape
    u0 = np.floor(u)
    v0 = np.floor(v)
    fu = u - u0
    fv = v - v0
    i0 = u0.astype(np.int32) & (nu - 1)
    j0 = v0.astype(np.int32) & (nv - 1)
    i1 = (i0 + 1) & (nu - 1)
    j1 = (j0 + 1) & (nv - 1)
    g = grid.ravel()
    r0 = i0 * nv
    r1 = i1 * nv
    a = g[r0 + j0]
    b = g[r0 + j1]
    a += (b - a) * fv
    c = g[r1 + j0]
    d = g[r1 + j1]
    c += (d - c) * fv
    a += (c - a) * fu
    return a


def block_sum(mask, b, th, tw):
    """Sum of mask over b x b blocks, output (th, tw); mask padded with zeros."""
    H, W = mask.shape
    m = mask
    if H != th * b or W != tw * b:
        m = np.zeros((th * b, tw * b), mask.dtype)
        hh, ww = min(H, th * b), min(W, tw * b)
        m[:hh, :ww] = mask[:hh, :ww]
    return m.reshape(th, b, tw, b).sum(axis=(1, 3), dtype=np.float64)


# ----------------------------------------------------------------------------- canvas
class Canvas:
    def __init__(self, H0, W0, mpp):
        self.H0, self.W0, self.mpp = H0, W0, mpp
        self.h = np.zeros((H0, W0), np.float32)
        self.e = np.zeros((H0, W0), np.float32)
        self.r = np.zeros((H0, W0), np.float32)
        self.R = np.zeros((H0, W0), np.uint8)
        self.L = np.zeros((H0, W0), bool)

    def patch(self, cx, cy, rad):
        m = self.mpp
        x0 = max(int((cx - rad) / m), 0)
        x1 = min(int((cx + rad) / m) + 2, self.W0)
        y0 = max(int((cy - rad) / m), 0)
        y1 = min(int((cy + rad) / m) + 2, self.H0)
        if x0 >= x1 or y0 >= y1:
            return None
        X = ((np.arange(x0, x1, dtype=np.float32) + 0.5) * m - cx)[None, :]
        Y = ((np.arange(y0, y1, dtype=np.float32) + 0.5) * m - cy)[:, None]
        return (slice(y0, y1), slice(x0, x1)), X, Y

    @staticmethod
    def comp(arr, sl, a, val):
        v = arr[sl]
        v += a * (val - v)


def soft(q, width):
    """alpha from normalised radius q (inside q<1) with edge width (in q units)."""
    return np.clip((1.0 - q) / width + 0.5, 0.0, 1.0)


def hexgrid_local(rng, cx, cy, a, b, ang, spacing):
    """points on a jittered grid inside an ellipse (for red cells in a lumen)."""
    n = int(2 * max(a, b) / spacing) + 2
    g = (np.arange(-n, n + 1) * spacing)
    X, Y = np.meshgrid(g + rng.uniform(0, spacing), g * 0.9 + rng.uniform(0, spacing))
    X = X.ravel() + rng.normal(0, 0.8, X.size)
    Y = Y.ravel() + rng.normal(0, 0.8, X.size)
    ok = (X / max(a - 2.5, 0.5)) ** 2 + (Y / max(b - 2.5, 0.5)) ** 2 < 1
    if not ok.any() and rng.random() < 0.7:
        ok = (X == X) & (np.arange(X.size) == 0)
        X[:], Y[:] = 0, 0
    c_, s_ = math.cos(ang), math.sin(ang)
    return cx + X[ok] * c_ - Y[ok] * s_, cy + X[ok] * s_ + Y[ok] * c_


def pen_stroke(rng, Hc, Wc, xc, yc, Wum, Hum, ft):
    """a pen-mark stroke (smooth random curve) as a coarse density map."""
    n = 200
    x, y = rng.uniform(0, Wum), rng.choice([rng.uniform(0, 0.15), rng.uniform(0.85, 1.0)]) * Hum
    ang = rng.uniform(0, 2 * np.pi)
    step = rng.uniform(4, 8)
    img = np.zeros((Hc, Wc), bool)
    for _ in range(n):
        ang += rng.normal(0, 0.08)
        x += step * math.cos(ang)
        y += step * math.sin(ang)
        iy, ix = int(y / CG), int(x / CG)
        if 0 <= iy < Hc and 0 <= ix < Wc:
            img[iy, ix] = True
    if not img.any():
        return np.zeros((Hc, Wc), np.float32)
    d = ndi.distance_transform_edt(~img) * CG
    w = rng.uniform(15, 60)
    m = np.clip((w - d) / 6.0, 0, 1) * (0.75 + 0.25 * np.tanh(noise(rng, (Hc, Wc), CG, 20)))
    return m.astype(np.float32)


# ----------------------------------------------------------------------------- cell sprites
def rotated(X, Y, ang):
    """Patch coordinates in a frame turned by ``ang`` (a sprite's own axes)."""
    c, s = math.cos(ang), math.sin(ang)
    return X * c + Y * s, -X * s + Y * c


def tumour_nucleus(cv, G, rng, cx, cy, a, grade, hn, nucl):
    b = a * rng.uniform(0.68, 0.98)
    P = cv.patch(cx, cy, a * 1.3 + 1.0)
    if P is None:
        return
    sl, X, Y = P
    ang = rng.uniform(0, np.pi)
    xr, yr = rotated(X, Y, ang)
    rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    phi = np.arctan2(yr, xr)
    amp = 0.03 + 0.025 * grade
    rb = 1 + rng.normal(0, amp) * np.cos(2 * phi + rng.uniform(0, 6.3)) \
        + rng.normal(0, amp) * np.cos(3 * phi + rng.uniform(0, 6.3)) \
        + rng.normal(0, amp * 0.5) * np.cos(5 * phi + rng.uniform(0, 6.3))
    q = rho / rb
    alpha = soft(q, 0.3 / a)
    rim = np.exp(-((q - 0.92) / 0.07) ** 2)
    g = G[sl]
    hv = hn * (1 + 0.4 * g) + 0.85 * hn * rim + 0.15
    ev = 0.12 + 0.05 * g
    nn = rng.poisson(nucl)
    for _ in range(min(nn, 3)):
        rr = rng.uniform(0.45, 0.75 + 0.15 * grade)
        ox, oy = rng.uniform(-0.45, 0.45) * a, rng.uniform(-0.45, 0.45) * b
        nu = np.exp(-((xr - ox) ** 2 + (yr - oy) ** 2) / (rr * rr))
        hv = hv + 1.0 * nu
        ev = ev + 0.7 * nu
    Canvas.comp(cv.h, sl, alpha, np.maximum(hv, 0.05))
    Canvas.comp(cv.e, sl, alpha, ev)
    Rs = cv.R[sl]
    Rs[(alpha > 0.5) & (Rs == STROMA)] = TUMOUR


def mitosis(cv, G, rng, cx, cy, a):
    P = cv.patch(cx, cy, a * 1.6 + 1)
    if P is None:
        return
    sl, X, Y = P
    ang = rng.uniform(0, np.pi)
    xr, yr = rotated(X, Y, ang)
    halo = soft(np.sqrt(X * X + Y * Y) / (a * 1.4), 0.2)
    Canvas.comp(cv.e, sl, halo, 0.15)
    Canvas.comp(cv.h, sl, halo, 0.08)
    g = G[sl]
    if rng.random() < 0.6:   # metaphase plate
        q = np.sqrt((xr / (a * 1.1)) ** 2 + (yr / (a * 0.32)) ** 2) + 0.25 * g * 0.5
        al = soft(q, 0.25)
    else:                    # anaphase: two bars
        q1 = np.sqrt((xr / (a * 0.3)) ** 2 + ((yr - a * 0.8) / (a * 0.9)) ** 2) + 0.12 * g
        q2 = np.sqrt((xr / (a * 0.3)) ** 2 + ((yr + a * 0.8) / (a * 0.9)) ** 2) + 0.12 * g
        al = np.maximum(soft(q1, 0.25), soft(q2, 0.25))
    Canvas.comp(cv.h, sl, al, 2.4 + 0.3 * g)
    Canvas.comp(cv.e, sl, al, 0.1)
    Rs = cv.R[sl]
    Rs[(halo > 0.5) & (Rs == STROMA)] = TUMOUR


def spindle(cv, G, cx, cy, th, a, b, hv, curv):
    P = cv.patch(cx, cy, a + 1.5)
    if P is None:
        return
    sl, X, Y = P
    xr, yr = rotated(X, Y, th)
    yr = yr - curv * xr * xr
    xa = np.minimum((xr / a) ** 2, 1.0)
    q = np.sqrt((xr / a) ** 2 + (yr / (b * (1 - 0.45 * xa) + 0.15)) ** 2)
    al = soft(q, 0.15)
    Canvas.comp(cv.h, sl, al, hv * (1 + 0.2 * G[sl]))
    Canvas.comp(cv.e, sl, al, 0.15)


def _mark_body(cv, sl, alpha, stromal):
    """An inflammatory cell's truth: its body (alpha above 0.5) counts as lymphocyte area, and a cell
    centred in stroma turns the tissue under its body into stroma."""
    body = alpha > 0.5
    cv.L[sl] |= body
    if stromal:
        Rs = cv.R[sl]
        Rs[body & (Rs != BG)] = STROMA


def lymphocyte(cv, G, rng, cx, cy, r, hl, stromal):
    rn = r * math.exp(rng.normal(0, 0.08))
    rc = rn + rng.uniform(0.35, 0.8)           # thin cytoplasmic rim
    P = cv.patch(cx, cy, rc + 1.0)
    if P is None:
        return
    sl, X, Y = P
    ang = rng.uniform(0, np.pi)
    ell = rng.uniform(0.86, 1.0)
    xr, yr = rotated(X, Y, ang)
    yr = yr / ell
    rho = np.sqrt(xr * xr + yr * yr)
    phi = np.arctan2(yr, xr)
    rb = 1 + rng.normal(0, 0.035) * np.cos(2 * phi + rng.uniform(0, 6.3)) \
        + rng.normal(0, 0.03) * np.cos(3 * phi + rng.uniform(0, 6.3))
    q = rho / rb
    ab = soft(q / rc, 0.25 / rc)
    an = soft(q / rn, 0.3 / rn)
    g = G[sl]
    Canvas.comp(cv.h, sl, ab, 0.3)
    Canvas.comp(cv.e, sl, ab, 0.22)
    hv = hl * math.exp(rng.normal(0, 0.1)) * (1 + 0.12 * g) * (1 - 0.12 * np.exp(-(q / (0.5 * rn)) ** 2))
    Canvas.comp(cv.h, sl, an, hv)
    Canvas.comp(cv.e, sl, an, 0.08)
    _mark_body(cv, sl, ab, stromal)


def plasma_cell(cv, G, rng, cx, cy, stromal):
    A = rng.uniform(4.6, 6.2)
    B = rng.uniform(3.5, 4.4)
    rn = rng.uniform(2.3, 2.9)
    P = cv.patch(cx, cy, A + 1.2)
    if P is None:
        return
    sl, X, Y = P
    ang = rng.uniform(0, 2 * np.pi)
    xr, yr = rotated(X, Y, ang)
    qb = np.sqrt((xr / A) ** 2 + (yr / B) ** 2)
    ab = soft(qb, 0.25 / B)
    off = A - rn - 0.4
    hof = np.exp(-(((xr - (off - rn - 1.0)) ** 2 + yr * yr) / 1.6))
    g = G[sl]
    Canvas.comp(cv.h, sl, ab, 0.65 * (1 - 0.5 * hof) + 0.05 * g)
    Canvas.comp(cv.e, sl, ab, 0.5 * (1 - 0.4 * hof))
    xn, yn = xr - off, yr
    rr = np.sqrt(xn * xn + yn * yn) / rn
    an = soft(rr, 0.3 / rn)
    phi = np.arctan2(yn, xn)
    clock = np.clip(np.cos(rng.integers(4, 7) * phi + rng.uniform(0, 6.3)), 0, 1) * np.clip((rr - 0.45) * 4, 0, 1)
    hv = 1.75 + 0.55 * clock + 0.35 * np.exp(-(rr / 0.22) ** 2) + 0.2 * g
    Canvas.comp(cv.h, sl, an, hv)
    Canvas.comp(cv.e, sl, an, 0.1)
    _mark_body(cv, sl, ab, stromal)
