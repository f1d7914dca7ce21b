"""The scene of one slide: a label map on the render grid (``RU`` µm/px) drawn as explicit geometry.

Stages, in their draw order (each takes the slide's rng and mutates the :class:`Scene`): tissue outline
and fragments → fat lobules → invasive tumour (ductal walks, lobular files) and retraction clefts →
DCIS and normal ducts / lobules → necrosis (then duct lumina and clefts become glass) → vessels →
tears. The order and number of random draws is the generator's contract: changing either changes
every slide drawn after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import poly_mask, random_walk, stamp_disks, star_polygon, superellipse
from .params import FAT, GLASS, LUMEN, NECROSIS, NORMAL_EPI, RU, STROMA, TRUTH_UM, TUMOUR


@dataclass
class Canvas:
    """The render grid: a ``Wu`` × ``Hu`` µm canvas at ``RU`` µm/px, padded to whole truth blocks."""

    hard: bool
    Wu: float
    Hu: float
    H: int
    W: int
    blk: int  # render px per truth pixel
    X1: np.ndarray  # x of the pixel centres (µm)
    Y1: np.ndarray

    @property
    def shape(self):
        return (self.H, self.W)

    @classmethod
    def make(cls, setting, size_um):
        Wu, Hu = float(size_um), 0.8 * float(size_um)
        blk = round(TRUTH_UM / RU)
        W = int(np.ceil(Wu / RU / blk) * blk)
        H = int(np.ceil(Hu / RU / blk) * blk)
        return cls(setting == "hard", Wu, Hu, H, W, blk, (np.arange(W) + 0.5) * RU, (np.arange(H) + 0.5) * RU)


@dataclass
class Scene:
    """Masks and geometry of one slide's scene; ``lab`` holds the label codes of ``params``."""

    tissue: np.ndarray
    lab: np.ndarray
    tis_area: int = 0
    fatreg: np.ndarray | None = None
    grade: int = 2
    tsdf: np.ndarray | None = None  # signed distance to the invasive tumour (µm)
    tumour: np.ndarray | None = None
    cleft: np.ndarray | None = None
    lob_cells: list = field(default_factory=list)  # (x, y) of lobular carcinoma cells
    duct_cells: list = field(default_factory=list)  # (x, y) of normal luminal cells
    myo: list = field(default_factory=list)  # (x, y, tangent angle) of myoepithelial cells
    nec_extra: np.ndarray | None = None  # comedo necrosis of DCIS
    duct_lumen: np.ndarray | None = None
    nec: np.ndarray | None = None
    lumen: np.ndarray | None = None  # vessel lumina
    wall: np.ndarray | None = None  # vessel-wall eosin OD
    vessels: list = field(default_factory=list)  # (cx, cy, a, b, ang, wall thickness, big)


def draw_tissue(rng, cv):
    """Tissue: one large star polygon (harmonic radius perturbation + jagged high harmonics) and 0-2
    small fragments; everything else is glass."""
    Wu, Hu, shape = cv.Wu, cv.Hu, cv.shape
    tissue = poly_mask(*star_polygon(rng, Wu * rng.uniform(0.42, 0.58), Hu * rng.uniform(0.42, 0.58),
                                     Wu * rng.uniform(0.40, 0.62), Hu * rng.uniform(0.40, 0.62),
                                     rough=0.16, jag=0.012), shape)
    for _ in range(rng.integers(0, 3)):
        r = rng.uniform(40, 120)
        tissue |= poly_mask(*star_polygon(rng, rng.uniform(0, Wu), rng.uniform(0, Hu), r, r * 0.7,
                                          rough=0.2), shape)
    sc = Scene(tissue=tissue, lab=np.where(tissue, STROMA, GLASS).astype(np.uint8))
    sc.tis_area = tissue.sum()
    return sc


def draw_fat_region(rng, cv, sc):
    """Fat lobules: star polygons seeded in tissue until a drawn fat fraction (0, 3-12 % or 10-30 %)
    is reached (at most 6 lobules). Adipocytes are drawn later (:func:`cells.draw_adipocytes`)."""
    fat_frac = rng.choice([0.0, rng.uniform(0.03, 0.12), rng.uniform(0.1, 0.3)], p=[0.25, 0.45, 0.3])
    fatreg = np.zeros(cv.shape, bool)
    tries = 0
    while fatreg.sum() < fat_frac * sc.tis_area and tries < 6:
        tries += 1
        ys, xs = np.nonzero(sc.tissue[::16, ::16])
        k = rng.integers(0, len(ys))
        r = rng.uniform(90, 260)
        fatreg |= poly_mask(*star_polygon(rng, xs[k] * 16 * RU, ys[k] * 16 * RU, r, r * rng.uniform(0.5, 1),
                                          rough=0.15), cv.shape)
    fatreg &= sc.tissue
    sc.lab[fatreg] = FAT
    sc.fatreg = fatreg


def _lobular_file(rng, x0, y0):
    """Invasive lobular pattern: a single file (straight-ish walk, 8.5-11 µm spacing, 70 %) or a small
    cluster of discrete cells; returns cell centres and radii."""
    ang = rng.uniform(0, np.pi * 2)
    if rng.random() < 0.7:
        n = int(rng.integers(5, 30))
        xs, ys, _ = random_walk(rng, x0, y0, ang, n, rng.uniform(8.5, 11), 0.12, 1, 1, 1, 0)
    else:
        n = int(rng.integers(3, 9))
        xs, ys = x0 + rng.normal(0, 9, n), y0 + rng.normal(0, 9, n)
    xs += rng.normal(0, 0.8, len(xs))
    ys += rng.normal(0, 0.8, len(ys))
    rs = rng.uniform(5.0, 6.5, len(xs))
    return xs, ys, rs


def _ductal_growth(rng, x0, y0):
    """Invasive ductal growth as disk unions: nests (short broad walks, 45 %), branching trabeculae /
    cords (long thin walks, 35 %) or an irregular cloud nest; plus 0-5 budding satellites."""
    kind = rng.random()
    if kind < 0.45:  # nests (short walks, broad)
        xs, ys, rs = random_walk(rng, x0, y0, rng.uniform(0, 6.3), int(rng.integers(3, 14)), 10.0,
                                 0.5, rng.uniform(18, 45), 12, 65, 3.0)
    elif kind < 0.8:  # trabeculae / cords, branching
        xs, ys, rs = random_walk(rng, x0, y0, rng.uniform(0, 6.3), int(rng.integers(10, 40)), 7.0,
                                 0.25, rng.uniform(7, 16), 6, 20, 1.2)
        for j in range(1, len(xs) - 3, 6):
            if rng.random() < 0.35:
                bx, by, br = random_walk(rng, xs[j], ys[j], rng.uniform(0, 6.3), int(rng.integers(4, 16)),
                                         7.0, 0.3, rs[j] * 0.8, 5, 16, 1.0)
                xs, ys, rs = np.r_[xs, bx], np.r_[ys, by], np.r_[rs, br]
    else:  # irregular large nest
        n = int(rng.integers(6, 18))
        xs, ys = x0 + rng.normal(0, 35, n), y0 + rng.normal(0, 35, n)
        rs = rng.uniform(15, 40, n)
    # budding at the edge
    nb = int(rng.integers(0, 6))
    if nb:
        j = rng.integers(0, len(xs), nb)
        a = rng.uniform(0, 6.3, nb)
        xs = np.r_[xs, xs[j] + (rs[j] + 4) * np.cos(a)]
        ys = np.r_[ys, ys[j] + (rs[j] + 4) * np.sin(a)]
        rs = np.r_[rs, rng.uniform(4, 8, nb)]
    return xs, ys, rs


def draw_tumour(rng, cv, sc, plan):
    """Invasive tumour: growths seeded in non-fat tissue and stamped into a signed distance until the
    tumour fraction of tissue (standard 20-60 %, hard 10-85 %) is reached. ~25 % of slides are lobular
    (~35 % of those also ductal); some ductal growths get a retraction cleft (thin glass rim)."""
    hard, shape = cv.hard, cv.shape
    tf = rng.uniform(0.10, 0.85) if hard else rng.uniform(0.20, 0.60)
    lob_mode = rng.random()
    lobular = lob_mode < 0.25
    ductal = (not lobular) or rng.random() < 0.35  # some mixed
    grade = rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4])
    plan.update(tumour_frac=round(tf, 3), lobular=bool(lobular), ductal=bool(ductal), grade=int(grade))
    tsdf = np.full(shape, 1e3, np.float32)
    csdf = np.full(shape, 1e3, np.float32)  # nests with retraction clefts
    avail = sc.tissue & ~sc.fatreg
    ys_a, xs_a = np.nonzero(avail[::8, ::8])
    goal = tf * sc.tis_area
    lob_goal = goal * (1.0 if not ductal else 0.4) if lobular else 0.0
    n_walk = 0
    cur = 0
    while cur < goal and n_walk < 400:
        n_walk += 1
        k = rng.integers(0, len(ys_a))
        x0, y0 = xs_a[k] * 8 * RU, ys_a[k] * 8 * RU
        if lobular and (cur < lob_goal or not ductal):  # single files / small clusters of discohesive cells
            xs, ys, rs = _lobular_file(rng, x0, y0)
            stamp_disks(tsdf, xs, ys, rs)
            sc.lob_cells += list(zip(xs, ys))
        else:
            xs, ys, rs = _ductal_growth(rng, x0, y0)
            stamp_disks(tsdf, xs, ys, rs)
            if rng.random() < (0.3 if hard else 0.15):
                stamp_disks(csdf, xs, ys, rs)
        cur = ((tsdf < 0) & sc.tissue).sum()
    sc.grade, sc.tsdf = grade, tsdf
    sc.tumour = (tsdf < 0) & sc.tissue
    # retraction clefts around some nests
    sc.cleft = (csdf > 0) & (csdf < rng.uniform(0.8, 2.0)) & (tsdf > 0) & sc.tissue
    sc.lab[sc.tumour] = TUMOUR


def _duct_parts(rng, cx, cy, is_dcis):
    """(x, y, a, b) of the superellipses of one DCIS duct (45-120 µm), normal lobule (5-13 acini of
    13-22 µm, 60 %) or normal duct (25-50 µm)."""
    if is_dcis:
        a = rng.uniform(45, 120)
        return [(cx, cy, a, a * rng.uniform(0.6, 1.0))]
    if rng.random() < 0.6:
        m = int(rng.integers(5, 14))
        return [(cx + rng.normal(0, 45), cy + rng.normal(0, 45), r, r * rng.uniform(0.75, 1))
                for r in rng.uniform(13, 22, m)]
    a = rng.uniform(25, 50)
    return [(cx, cy, a, a * rng.uniform(0.5, 0.9))]


def _fill_duct(rng, cv, sc, box, sd, inside, part, ang, is_dcis):
    """DCIS: solid tumour with comedo necrosis (50 %) or 2-8 cribriform lumina. Normal: epithelium
    with an empty lumen and a ring of luminal cells (one per 7.5 µm of perimeter)."""
    (y0, y1, x0, x1), (px, py, a, b) = box, part
    sub = sc.lab[y0:y1, x0:x1]
    if is_dcis:
        sub[inside] = TUMOUR
        if rng.random() < 0.5:  # comedo necrosis
            nec = (sd < -rng.uniform(18, 35)) & inside
            sc.nec_extra[y0:y1, x0:x1] |= nec
        else:  # cribriform lumina
            for _ in range(int(rng.integers(2, 9))):
                lr = rng.uniform(4, 12)
                lx, ly = px + rng.uniform(-0.6, 0.6) * a, py + rng.uniform(-0.6, 0.6) * b
                hole = (np.hypot(cv.X1[None, x0:x1] - lx, cv.Y1[y0:y1, None] - ly) < lr) & (sd < -12)
                sc.duct_lumen[y0:y1, x0:x1] |= hole
        return
    lum = (sd < -rng.uniform(7, 10)) & inside
    sub[inside] = NORMAL_EPI
    sc.duct_lumen[y0:y1, x0:x1] |= lum
    # luminal cells on a ring
    per = np.pi * (a + b)
    nl = max(6, int(per / 7.5))
    t = np.linspace(0, 2 * np.pi, nl, endpoint=False) + rng.uniform(0, 1)
    rr = 1 - 5.0 / min(a, b)
    lx = px + rr * (a * np.cos(t) * np.cos(ang) - b * np.sin(t) * np.sin(ang))
    ly = py + rr * (a * np.cos(t) * np.sin(ang) + b * np.sin(t) * np.cos(ang))
    sc.duct_cells += [(x, y) for x, y in zip(lx, ly)]


def _myoepithelial_rim(rng, part, ang):
    """(x, y, tangent angle) of flattened myoepithelial nuclei just inside the duct outline."""
    px, py, a, b = part
    per = np.pi * (a + b)
    nm = max(4, int(per / rng.uniform(9, 16)))
    t = np.sort(rng.uniform(0, 2 * np.pi, nm))
    rr = 1 - 1.6 / min(a, b)
    mx = px + rr * (a * np.cos(t) * np.cos(ang) - b * np.sin(t) * np.sin(ang))
    my = py + rr * (a * np.cos(t) * np.sin(ang) + b * np.sin(t) * np.cos(ang))
    # tangent direction of the ellipse
    dx = -a * np.sin(t) * np.cos(ang) - b * np.cos(t) * np.sin(ang)
    dy = -a * np.sin(t) * np.sin(ang) + b * np.cos(t) * np.cos(ang)
    tang = np.arctan2(dy, dx)
    return list(zip(mx, my, tang))


def draw_ducts(rng, cv, sc):
    """DCIS (0-3 standard, 0-2 hard) and normal ducts / lobules (0-4) as perturbed superellipses placed
    in stroma, each with a myoepithelial rim."""
    H, W = cv.shape
    dcis_n = int(rng.choice([0, 0, 1, 2, 3])) if not cv.hard else int(rng.choice([0, 1, 2]))
    norm_n = int(rng.choice([0, 1, 2, 3, 4]))
    st_y, st_x = np.nonzero(sc.lab[::8, ::8] == STROMA)
    sc.nec_extra = np.zeros(cv.shape, bool)
    sc.duct_lumen = np.zeros(cv.shape, bool)
    for d in range(dcis_n + norm_n):
        if len(st_y) == 0:
            break
        k = rng.integers(0, len(st_y))
        is_dcis = d < dcis_n
        for part in _duct_parts(rng, st_x[k] * 8 * RU, st_y[k] * 8 * RU, is_dcis):
            px, py, a, b = part
            R = a + 12
            x0, x1 = int(max(0, (px - R) / RU)), int(min(W, (px + R) / RU))
            y0, y1 = int(max(0, (py - R) / RU)), int(min(H, (py + R) / RU))
            if x0 >= x1 or y0 >= y1:
                continue
            ang = rng.uniform(0, np.pi)
            sd = superellipse(cv.X1[None, x0:x1], cv.Y1[y0:y1, None], a, b, ang, 2.0, 0.06, rng, px, py)
            inside = (sd < 0) & (sc.lab[y0:y1, x0:x1] == STROMA)
            _fill_duct(rng, cv, sc, (y0, y1, x0, x1), sd, inside, part, ang, is_dcis)
            sc.myo += _myoepithelial_rim(rng, part, ang)


def draw_necrosis(rng, cv, sc):
    """Necrosis (~22 % standard, ~45 % hard): 1-3 star polygons in the depth (> 8-16 µm) of large
    nests, plus DCIS comedo necrosis. Then duct lumina and retraction clefts become glass."""
    nec = sc.nec_extra.copy()
    tsdf = sc.tsdf
    if rng.random() < (0.45 if cv.hard else 0.22) and sc.tumour.any():
        deep = (tsdf < -18)
        dy_, dx_ = np.nonzero(deep[::8, ::8])
        for _ in range(int(rng.integers(1, 4))):
            if len(dy_) == 0:
                break
            k = rng.integers(0, len(dy_))
            xs_, ys_ = star_polygon(rng, dx_[k] * 8 * RU, dy_[k] * 8 * RU, rng.uniform(40, 150),
                                    rng.uniform(30, 120), rough=0.2)
            nec |= poly_mask(xs_, ys_, cv.shape) & (tsdf < -rng.uniform(8, 16))
    nec &= sc.tissue
    lab = sc.lab
    lab[nec] = NECROSIS
    lab[sc.duct_lumen & sc.tissue] = GLASS
    lab[sc.cleft & (lab == STROMA)] = GLASS
    sc.nec = nec


def draw_vessels(rng, cv, sc):
    """6-21 vessels in stroma: elliptical rings, capillaries (3-9 µm, thin wall) or 25 % larger vessels
    (12-45 µm, 3-9 µm wall). The lumen leaves stroma; the wall (an eosin layer) stays stroma."""
    H, W = cv.shape
    st = sc.lab == STROMA
    sy, sx = np.nonzero(st[::8, ::8])
    nv = int(rng.integers(6, 22))
    wall = np.zeros(cv.shape, np.float32)
    lumen = np.zeros(cv.shape, bool)
    for _ in range(nv):
        if len(sy) == 0:
            break
        k = rng.integers(0, len(sy))
        cx, cy = sx[k] * 8 * RU, sy[k] * 8 * RU
        big = rng.random() < 0.25
        a = rng.uniform(12, 45) if big else rng.uniform(3, 9)
        b = a * rng.uniform(0.35, 1.0)
        th = rng.uniform(3, 9) if big else rng.uniform(1.2, 2.0)
        ang = rng.uniform(0, np.pi)
        R = a + th + 3
        x0, x1 = int(max(0, (cx - R) / RU)), int(min(W, (cx + R) / RU))
        y0, y1 = int(max(0, (cy - R) / RU)), int(min(H, (cy + R) / RU))
        if x0 >= x1 or y0 >= y1:
            continue
        sd = superellipse(cv.X1[None, x0:x1], cv.Y1[y0:y1, None], a, b, ang, 2.0, 0.05, rng, cx, cy)
        okm = st[y0:y1, x0:x1]
        lum = (sd < 0) & okm
        lumen[y0:y1, x0:x1] |= lum
        wl = np.clip(np.minimum(0.5 + sd / RU, 0.5 + (th - sd) / RU), 0, 1) * okm
        np.maximum(wall[y0:y1, x0:x1], wl * (0.45 if big else 0.35), out=wall[y0:y1, x0:x1])
        sc.vessels.append((cx, cy, a, b, ang, th, big))
    sc.lab[lumen] = LUMEN
    sc.lumen, sc.wall = lumen, wall


def draw_tears(rng, cv, sc):
    """0-3 tears (+2 hard): tapered random-walk cracks that turn stroma and fat into glass."""
    n_tear = int(rng.integers(0, 4)) + (2 if cv.hard else 0)
    tear_sdf = np.full(cv.shape, 1e3, np.float32)
    for _ in range(n_tear):
        ys_t, xs_t = np.nonzero(sc.tissue[::8, ::8])
        k = rng.integers(0, len(ys_t))
        n = int(rng.integers(15, 90))
        xs, ys, rs = random_walk(rng, xs_t[k] * 8 * RU, ys_t[k] * 8 * RU, rng.uniform(0, 6.3), n, 4.0, 0.12,
                                 rng.uniform(0.8, 5), 0.5, 9, 0.6)
        taper = np.minimum(np.arange(n) + 1, n - np.arange(n)) / 5.0
        stamp_disks(tear_sdf, xs, ys, rs * np.clip(taper, 0.2, 1))
    lab = sc.lab
    tear = (tear_sdf < 0) & ((lab == STROMA) | (lab == FAT))
    lab[tear] = GLASS


def draw_scene(rng, cv, plan):
    """All scene stages in order; returns the :class:`Scene`."""
    sc = draw_tissue(rng, cv)
    draw_fat_region(rng, cv, sc)
    draw_tumour(rng, cv, sc, plan)
    draw_ducts(rng, cv, sc)
    draw_necrosis(rng, cv, sc)
    draw_vessels(rng, cv, sc)
    draw_tears(rng, cv, sc)
    return sc
