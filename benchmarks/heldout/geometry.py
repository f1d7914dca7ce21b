"""Geometry primitives: smooth / band-passed noise, star polygons, signed distances (disks,
superellipses), anti-aliased coverage, random walks, weighted sampling and hard-core (Poisson-disc)
dart throwing. Coordinates are µm; render pixels are ``RU`` µm wide."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree
from skimage.draw import polygon as draw_polygon

from .params import RU


def smooth_noise(rng, shape, cells, order=3):
    """Low-frequency noise (for stain/scanner fields only): a coarse random grid, cubic-zoomed."""
    gh, gw = max(2, int(cells[0])), max(2, int(cells[1]))
    g = rng.standard_normal((gh + 3, gw + 3)).astype(np.float32)
    z = ndi.zoom(g, ((shape[0] + 0.0) / gh, (shape[1] + 0.0) / gw), order=order)
    o0, o1 = (z.shape[0] - shape[0]) // 2, (z.shape[1] - shape[1]) // 2
    z = z[o0:o0 + shape[0], o1:o1 + shape[1]]
    return (z - z.mean()) / (z.std() + 1e-6)


def bandnoise(rng, shape, s1, s2):
    """White noise band-passed by a difference of Gaussians (σ s1 − σ s2, px), unit std (chromatin, debris)."""
    z = rng.standard_normal(shape).astype(np.float32)
    a = ndi.gaussian_filter(z, s1) - ndi.gaussian_filter(z, s2)
    return a / (a.std() + 1e-6)


def star_polygon(rng, cx, cy, rx, ry, n=360, rough=0.08, kmax=9, jag=0.01):
    """Vertices (µm) of an ellipse whose radius is perturbed by harmonics 2..kmax (``rough``) and six
    random high harmonics (``jag``), randomly rotated: tissue outlines, fat lobules, necrosis, folds."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    f = np.ones_like(t)
    for k in range(2, kmax + 1):
        f += rng.normal(0, rough / k ** 0.8) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    for k in rng.integers(15, 80, 6):
        f += rng.normal(0, jag) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    f = np.clip(f, 0.35, None)
    rot = rng.uniform(0, np.pi)
    x, y = rx * f * np.cos(t), ry * f * np.sin(t)
    xr = cx + x * np.cos(rot) - y * np.sin(rot)
    yr = cy + x * np.sin(rot) + y * np.cos(rot)
    return xr, yr


def poly_mask(xs_um, ys_um, shape):
    """Boolean render-grid mask of the polygon with vertices in µm."""
    m = np.zeros(shape, bool)
    rr, cc = draw_polygon(np.asarray(ys_um) / RU, np.asarray(xs_um) / RU, shape)
    m[rr, cc] = True
    return m


def stamp_disks(sdf, xs, ys, rs, margin=4.0):
    """sdf = min(sdf, |p - c| - r) for disks (µm), evaluated in each disk's box (render px)."""
    H, W = sdf.shape
    for x, y, r in zip(xs, ys, rs):
        R = r + margin
        x0, x1 = int(max(0, (x - R) / RU)), int(min(W, (x + R) / RU + 1))
        y0, y1 = int(max(0, (y - R) / RU)), int(min(H, (y + R) / RU + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        gx = (np.arange(x0, x1) + 0.5) * RU - x
        gy = (np.arange(y0, y1) + 0.5) * RU - y
        d = np.sqrt(gy[:, None] ** 2 + gx[None, :] ** 2) - r
        np.minimum(sdf[y0:y1, x0:x1], d, out=sdf[y0:y1, x0:x1])


def random_walk(rng, x, y, ang, n, step, turn, r0, rmin, rmax, rsd):
    """n nodes (x, y, radius) of a walk with fixed step, Gaussian turning (σ ``turn``) and a radius
    that wanders (σ ``rsd``) within [rmin, rmax]."""
    xs, ys, rs = [x], [y], [r0]
    r = r0
    for _ in range(n - 1):
        ang += rng.normal(0, turn)
        x += step * np.cos(ang)
        y += step * np.sin(ang)
        r = float(np.clip(r + rng.normal(0, rsd), rmin, rmax))
        xs.append(x), ys.append(y), rs.append(r)
    return np.array(xs), np.array(ys), np.array(rs)


def sample_weighted(rng, weight, n, cell_um):
    """n points (µm) drawn with density ∝ weight (a coarse grid of cell_um µm)."""
    w = weight.ravel().astype(np.float64)
    c = np.cumsum(w)
    if c[-1] <= 0:
        return np.zeros((0, 2))
    idx = np.searchsorted(c, rng.uniform(0, c[-1], n))
    idx = np.minimum(idx, w.size - 1)
    iy, ix = np.divmod(idx, weight.shape[1])
    return np.stack([(ix + rng.uniform(0, 1, n)) * cell_um, (iy + rng.uniform(0, 1, n)) * cell_um], 1)


def hardcore(rng, sampler, dmin, n_max, existing=None, dmin_existing=None, batch=3000, rounds=12):
    """Poisson-disc (hard-core) dart throwing in batches; returns accepted points in order."""
    acc = np.zeros((0, 2))
    ex_tree = cKDTree(existing) if existing is not None and len(existing) else None
    for _ in range(rounds):
        cand = sampler(batch)
        if len(cand) == 0:
            break
        if ex_tree is not None:
            d, _ = ex_tree.query(cand, distance_upper_bound=dmin_existing)
            cand = cand[~np.isfinite(d) | (d >= dmin_existing)]
        if len(acc):
            d, _ = cKDTree(acc).query(cand, distance_upper_bound=dmin)
            cand = cand[~np.isfinite(d)]
        if len(cand) > 1:
            pairs = cKDTree(cand).query_pairs(dmin, output_type="ndarray")
            if len(pairs):
                keep = np.ones(len(cand), bool)
                keep[pairs.max(1)] = False
                cand = cand[keep]
        got = len(cand)
        acc = np.concatenate([acc, cand])
        if len(acc) >= n_max or got < 0.01 * batch:
            break
    return acc[:n_max]


def superellipse(X, Y, a, b, ang, p=2.0, harm=0.0, rng=None, cx=0.0, cy=0.0):
    """Approximate signed distance (µm) to a perturbed superellipse of semi-axes a, b."""
    x, y = X - cx, Y - cy
    u = x * np.cos(ang) + y * np.sin(ang)
    v = -x * np.sin(ang) + y * np.cos(ang)
    rn = (np.abs(u / a) ** p + np.abs(v / b) ** p) ** (1.0 / p)
    if harm and rng is not None:
        phi = np.arctan2(v, u)
        f = 1.0
        for k in (2, 3, 4, 5):
            f = f + rng.normal(0, harm / k ** 0.5) * np.cos(k * phi + rng.uniform(0, 6.3))
        rn = rn / np.clip(f, 0.6, 1.4)
    return (rn - 1.0) * min(a, b)


def cov(sdf, soft=1.0):
    """Anti-aliased coverage (0..1) of a signed distance (µm), edge ``soft`` render px wide."""
    return np.clip(0.5 - sdf / (RU * soft), 0, 1)


def ellipse_points(cx, cy, a, b, ang, t, scale=1.0):
    """Points at parameter angles ``t`` on the rotated ellipse (semi-axes a, b) scaled by ``scale``."""
    x = cx + scale * (a * np.cos(t) * np.cos(ang) - b * np.sin(t) * np.sin(ang))
    y = cy + scale * (a * np.cos(t) * np.sin(ang) + b * np.sin(t) * np.cos(ang))
    return x, y


def ellipse_tangent(a, b, ang, t):
    """Tangent angle of the rotated ellipse at parameter angles ``t``."""
    dx = -a * np.sin(t) * np.cos(ang) - b * np.cos(t) * np.sin(ang)
    dy = -a * np.sin(t) * np.sin(ang) + b * np.cos(t) * np.cos(ang)
    return np.arctan2(dy, dx)
