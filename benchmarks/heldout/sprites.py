"""Cell sprites and pasting.

A sprite is a float32 array (3, h, w) on the render grid: channel 0 haematoxylin OD, channel 1 eosin
OD (the red-cell absorber for red cells), channel 2 the cell-body coverage (0..1) that marks where the
cell lies (TIL area for the truth, collagen displacement). Nuclei are superellipses with harmonic
outline noise and band-passed chromatin noise. Each slide draws its own banks of sprites; a cell
pastes one bank member, randomly flipped / transposed (or oriented, for spindles).
"""

from __future__ import annotations

import numpy as np

from .geometry import bandnoise, cov, superellipse
from .params import RU


def _grid(half_um):
    n = int(np.ceil(half_um / RU))
    g = (np.arange(-n, n + 1) * RU).astype(np.float32)
    return g[None, :], g[:, None]


def sprite(Hc, Ec, Mc):
    return np.stack([Hc, Ec, Mc]).astype(np.float32)


def make_lymph(rng, plasma=False):
    """Lymphocyte: dense round nucleus (radius 2.5-3.5 µm) with a thin cytoplasmic rim; or a plasma
    cell: eccentric clock-face nucleus in an oval amphophilic body with a paranuclear hof."""
    r_n = rng.uniform(2.5, 3.5)
    if not plasma:
        X, Y = _grid(r_n + 2.0)
        sd = superellipse(X, Y, r_n, r_n * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 2.0, 0.06, rng)
        n = cov(sd)
        body = cov(sd - rng.uniform(0.5, 0.9))
        tex = bandnoise(rng, n.shape, 0.8, 2.5)
        Hc = n * rng.uniform(1.9, 2.5) * (1 + 0.12 * tex) + (body - n) * 0.22
        Ec = (body - n) * 0.18 + n * 0.1
        return sprite(Hc, Ec, body)
    r_n = rng.uniform(2.4, 3.0)
    a, b = rng.uniform(5.0, 6.2), rng.uniform(3.8, 4.6)
    X, Y = _grid(a + 1.5)
    ang = rng.uniform(0, 2 * np.pi)
    body = cov(superellipse(X, Y, a, b, ang, 2.1, 0.05, rng))
    off = a - r_n - 0.4
    cx, cy = off * np.cos(ang), off * np.sin(ang)
    sd = superellipse(X, Y, r_n, r_n, 0, 2.0, 0.04, rng, cx, cy)
    n = cov(sd)
    hof = np.exp(-(((X - cx * 0.1) ** 2 + (Y - cy * 0.1) ** 2) / (2 * 1.3 ** 2)))
    rim = np.exp(-(sd + 0.6) ** 2 / (2 * 0.35 ** 2)) * n
    ang_c = np.arctan2(Y - cy, X - cx)
    clock = (0.5 + 0.5 * np.cos(7 * ang_c + rng.uniform(0, 6.3))) * rim
    Hc = n * (1.0 + 1.2 * clock + 0.3 * rim) + (body - n) * 0.55 * (1 - 0.6 * hof)
    Ec = (body - n) * 0.45 * (1 - 0.4 * hof) + n * 0.1
    return sprite(Hc, Ec, body)


def make_granulocyte(rng, eos=False):
    """Neutrophil (3-4 nuclear lobes, pale cytoplasm) or eosinophil (bilobed, red granular cytoplasm)."""
    R = rng.uniform(4.5, 5.8)
    X, Y = _grid(R + 1.5)
    body = cov(superellipse(X, Y, R, R * rng.uniform(0.85, 1), rng.uniform(0, 3.2), 2.0, 0.05, rng))
    nl = 2 if eos else rng.integers(3, 5)
    n = np.zeros_like(body)
    a0 = rng.uniform(0, 6.3)
    for k in range(nl):
        ang = a0 + k * (2 * np.pi / nl) * rng.uniform(0.5, 0.8)
        cx, cy = 1.8 * np.cos(ang), 1.8 * np.sin(ang)
        n = np.maximum(n, cov(superellipse(X, Y, 1.6, 1.2, ang, 2.0, 0, None, cx, cy)))
    if eos:
        gr = np.clip(bandnoise(rng, body.shape, 0.5, 1.5), -2, 2)
        Ec = body * (1.05 + 0.2 * gr) * (1 - n)
        Hc = n * 1.9
    else:
        Ec = body * 0.25 * (1 - n)
        Hc = n * 2.1 + body * 0.05
    return sprite(Hc, Ec, body)


def make_spindle(rng, ang, a_rng=(5.0, 8.0), b_rng=(1.0, 1.6), hlev=(1.5, 1.9), cyto=0.12):
    """Spindle nucleus at angle ``ang`` with a faint cytoplasmic tail: fibroblasts, endothelium,
    smooth muscle, myoepithelium, flattened nuclei on fat septa."""
    a, b = rng.uniform(*a_rng), rng.uniform(*b_rng)
    X, Y = _grid(a + 1.5)
    sd = superellipse(X, Y, a, b, ang, rng.uniform(1.5, 2.0), 0.05, rng)
    n = cov(sd)
    bend = superellipse(X, Y, a * 1.5, b * 2.2, ang, 1.6)
    c = cov(bend, 2.0)
    tex = bandnoise(rng, n.shape, 0.6, 2.0)
    Hc = n * rng.uniform(*hlev) * (1 + 0.12 * tex)
    Ec = (c - n).clip(0) * cyto
    return sprite(Hc, Ec, n)


def make_ductal(rng, size, pleo, vesic_p):
    """Carcinoma (or normal luminal) nucleus: semi-axis ~N(size, pleo) µm; vesicular (pale, membrane
    chromatin, 1-2 nucleoli) with probability ``vesic_p``, hyperchromatic otherwise."""
    a = np.clip(rng.normal(size, pleo), 3.6, 8.5)
    b = a * rng.uniform(0.68, 1.0)
    X, Y = _grid(a + 1.5)
    sd = superellipse(X, Y, a, b, rng.uniform(0, np.pi), rng.uniform(1.9, 2.4), 0.025 + 0.05 * pleo / 1.5, rng)
    n = cov(sd)
    tex = bandnoise(rng, n.shape, 0.7, 2.4)
    if rng.random() < vesic_p:  # vesicular: pale, chromatin on the membrane, nucleoli
        rim = np.exp(-(sd + 0.5) ** 2 / (2 * 0.4 ** 2)) * n
        Hc = n * rng.uniform(0.55, 0.85) * (1 + 0.35 * np.clip(tex, -2, 2)) + rim * 0.8
        Ec = n * 0.12
        for _ in range(rng.integers(1, 3)):
            rr = rng.uniform(0.7, 1.3)
            cx, cy = rng.uniform(-0.4, 0.4) * a, rng.uniform(-0.4, 0.4) * b
            nu = cov(np.hypot(X - cx, Y - cy) - rr)
            Hc += nu * 0.9
            Ec += nu * 0.7
    else:  # hyperchromatic
        Hc = n * rng.uniform(1.3, 1.9) * (1 + 0.2 * np.clip(tex, -2, 2))
        Ec = n * 0.08
    return sprite(Hc, Ec, n)


def make_mitosis(rng):
    """Mitotic figure: a metaphase plate (60 %) or two anaphase plates, dark, with a clear halo."""
    X, Y = _grid(7.0)
    ang = rng.uniform(0, np.pi)
    if rng.random() < 0.6:  # metaphase plate
        sd = superellipse(X, Y, rng.uniform(4, 6), rng.uniform(1.0, 1.8), ang, 2.0, 0.3, rng)
        n = cov(sd)
    else:  # anaphase: two plates
        n = np.zeros((Y.shape[0], X.shape[1]), np.float32)
        for s in (-1, 1):
            cx, cy = s * 3.0 * np.cos(ang + 1.57), s * 3.0 * np.sin(ang + 1.57)
            n = np.maximum(n, cov(superellipse(X, Y, 4.0, 1.1, ang, 2.0, 0.3, rng, cx, cy)))
    tex = np.clip(bandnoise(rng, n.shape, 0.4, 1.2), -2, 2)
    Hc = n * (2.4 + 0.4 * tex)
    halo = cov(np.hypot(X, Y) - 6.5, 3.0)
    return sprite(Hc, -0.15 * halo * (1 - n), n)


def make_lobular_nucleus(rng):
    """Lobular carcinoma nucleus: round, uniform (radius 3-4.3 µm), moderately dark, small nucleolus at times."""
    r = rng.uniform(3.0, 4.3)
    X, Y = _grid(r + 1.2)
    sd = superellipse(X, Y, r, r * rng.uniform(0.88, 1), rng.uniform(0, 3.2), 2.0, 0.03, rng)
    n = cov(sd)
    tex = bandnoise(rng, n.shape, 0.6, 2.0)
    Hc = n * rng.uniform(1.15, 1.55) * (1 + 0.15 * tex)
    if rng.random() < 0.3:
        nu = cov(np.hypot(X, Y) - 0.6)
        Hc += nu * 0.4
    return sprite(Hc, n * 0.1, n)


def make_disk(rng, r, e, h, soft=2.0, tex_amp=0.15):
    """Soft textured disk of radius ~r µm (tumour-cell cytoplasm)."""
    X, Y = _grid(r + 2)
    c = cov(superellipse(X, Y, r, r * rng.uniform(0.8, 1), rng.uniform(0, 3.2), 2.0, 0.1, rng), soft)
    tex = bandnoise(rng, c.shape, 0.8, 3.0)
    return sprite(c * h * (1 + tex_amp * tex), c * e * (1 + tex_amp * tex), c)


def make_rbc(rng):
    """Red cell: disk of radius 3.2-3.8 µm with central pallor (channel 1 = red-cell absorber)."""
    r = rng.uniform(3.2, 3.8)
    X, Y = _grid(r + 1)
    d = np.hypot(X, Y * rng.uniform(1.0, 1.25))
    c = cov(d - r)
    pallor = 1 - 0.35 * np.exp(-d ** 2 / (2 * (0.45 * r) ** 2))
    return sprite(np.zeros_like(c), c * pallor, c)  # channel 1 here = red-cell absorber


DIHEDRAL = [lambda a: a, lambda a: a[:, ::-1, :], lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, ::-1],
            lambda a: a.transpose(0, 2, 1), lambda a: a.transpose(0, 2, 1)[:, ::-1, :],
            lambda a: a.transpose(0, 2, 1)[:, :, ::-1], lambda a: a.transpose(0, 2, 1)[:, ::-1, ::-1]]


def paste(A, B, M, spr, x_um, y_um, op_m="max"):
    """Add sprite channels 0/1 into A/B and max channel 2 into M at (x, y) µm (clipped)."""
    H, W = A.shape
    h, w = spr.shape[1:]
    cy, cx = int(y_um / RU), int(x_um / RU)
    y0, x0 = cy - h // 2, cx - w // 2
    sy0, sx0 = max(0, -y0), max(0, -x0)
    y1, x1 = min(H, y0 + h), min(W, x0 + w)
    y0c, x0c = max(0, y0), max(0, x0)
    if y1 <= y0c or x1 <= x0c:
        return
    sl = (slice(y0c, y1), slice(x0c, x1))
    s = spr[:, sy0:sy0 + (y1 - y0c), sx0:sx0 + (x1 - x0c)]
    A[sl] += s[0]
    B[sl] += s[1]
    if M is not None:
        np.maximum(M[sl], s[2], out=M[sl])


def paste_many(A, B, M, bank, pts, rng, orient=False, ids=None):
    """Paste a bank member at each point: random members unless ``ids``; a random dihedral transform,
    or (``orient``: the bank is indexed by angle) only a 180° turn half of the time."""
    if ids is None:
        ids = rng.integers(0, len(bank), len(pts))
    tr = rng.integers(0, 8 if not orient else 1, len(pts))
    for (x, y), i, t in zip(pts, ids, tr):
        s = bank[i]
        if orient and rng.random() < 0.5:
            s = s[:, ::-1, ::-1]
        elif not orient:
            s = DIHEDRAL[t](s)
        paste(A, B, M, s, x, y)
