"""tiles.csv (one row a tile: written and read here, the one reader of the format) and top_tiles.png
(the highest- and lowest-scoring tiles at review resolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakstil.errors import HeatmapInputError
from weakstil.fs import atomic_path
from weakstil.outputs.colors import DEFAULT_CMAP, check_tiles, stil_rgb

REVIEW_MPP = 0.5
_PAD, _LABEL, _HEAD = 8, 20, 36  # top_tiles.png: gap, label band above a tile, title band (px)


TILE_COLUMNS = ("x", "y", "width", "height", "prediction", "attention", "contribution")
GEOMETRY_COLUMNS = TILE_COLUMNS[:4]
VALUE_COLUMNS = TILE_COLUMNS[4:]  # the per-tile layers (see weakstil.outputs.colors.LAYERS)
STROMA_COLUMN = "stroma"  # optional, last: the estimated stroma fraction (0-1) from a +stainmorph encoder
STROMA_MIN = 0.5  # top_tiles.png ranks only tiles estimated at least this much stroma (sTIL% is on stroma)


# --- tiles.csv --------------------------------------------------------------------------------
def tiles_frame(coords_l0, size_l0, prediction, attention=None, contribution=None, stroma=None):
    """tiles.csv as a DataFrame: x, y, width, height (level-0 px, int), prediction (0–100), attention,
    contribution (NaN where not given) and, when given, ``stroma`` (estimated stroma fraction 0–1)."""
    import pandas as pd

    coords, size, pred, extra = check_tiles(
        coords_l0, size_l0, prediction, attention=attention, contribution=contribution
    )
    n = len(coords)
    width = np.full(n, int(round(size)), dtype=np.int64)
    nan = np.full(n, np.nan)
    frame = pd.DataFrame({
        "x": coords[:, 0], "y": coords[:, 1], "width": width, "height": width.copy(),
        "prediction": pred,
        "attention": extra["attention"] if extra["attention"] is not None else nan,
        "contribution": extra["contribution"] if extra["contribution"] is not None else nan.copy(),
    }, columns=list(TILE_COLUMNS))
    if stroma is not None:
        stroma = np.asarray(stroma, dtype=np.float64)
        if stroma.shape != (n,):
            raise HeatmapInputError(f"stroma has shape {stroma.shape}; expected ({n},), one value per tile")
        frame[STROMA_COLUMN] = stroma
    return frame


def write_tiles_csv(path, coords_l0, size_l0, prediction, attention=None, contribution=None,
                    stroma=None) -> Path:
    """Write tiles.csv atomically (floats with 6 significant digits, NaN as an empty field)."""
    frame = tiles_frame(coords_l0, size_l0, prediction, attention, contribution, stroma)
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


@dataclass
class TilesTable:
    """tiles.csv of one slide as arrays, rows in file order: ``coords_l0`` (N, 2) int64 top-left
    corners, ``width``/``height`` (N,) level-0 px, ``values`` one float64 (N,) array per
    :data:`VALUE_COLUMNS` (NaN = no value; a column the file lacks is all NaN), and ``stamp``
    (path, size, mtime_ns) of the file read, a cache key for what is drawn from it."""

    coords_l0: np.ndarray
    width: np.ndarray
    height: np.ndarray
    values: dict[str, np.ndarray]
    stamp: tuple = ()
    stroma: np.ndarray | None = None  # the optional ``stroma`` column (None: the file has none)

    def __len__(self) -> int:
        return len(self.coords_l0)

    @property
    def prediction(self) -> np.ndarray:
        return self.values["prediction"]

    @property
    def attention(self) -> np.ndarray | None:
        """The attention column, or None where no tile has one (mean pooling writes empty fields)."""
        return self._given("attention")

    @property
    def contribution(self) -> np.ndarray | None:
        return self._given("contribution")

    def _given(self, name: str) -> np.ndarray | None:
        values = self.values[name]
        return values if np.isfinite(values).any() else None


def read_tiles_csv(path: str | Path, *, drop_incomplete: bool = False) -> TilesTable:
    """Read a tiles.csv written by ``weakstil score`` (empty fields are NaN).

    A file that cannot be read, lacks a geometry column or ``prediction``, holds a non-numeric value,
    or a row without a position or a positive size raises :class:`HeatmapInputError`. With
    ``drop_incomplete`` (the viewer, which shows what it can) such rows are left out and non-numeric
    values read as NaN instead; a missing column or unreadable file still raises.
    """
    import pandas as pd

    path = Path(path)
    fix = "rerun `weakstil score` for this slide to rewrite its tiles.csv"
    try:
        stat = path.stat()
        frame = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise HeatmapInputError(f"cannot read tiles.csv ({exc})", path=path, fix=fix) from exc
    missing = [c for c in (*GEOMETRY_COLUMNS, "prediction") if c not in frame.columns]
    if missing:
        raise HeatmapInputError(f"tiles.csv lacks column(s) {', '.join(missing)} "
                                f"(expected {', '.join(TILE_COLUMNS)})", path=path, fix=fix)
    columns = {}
    for name in TILE_COLUMNS:
        raw = frame[name] if name in frame.columns else pd.Series(np.nan, index=frame.index)
        number = pd.to_numeric(raw, errors="coerce")
        if not drop_incomplete and (number.isna() & raw.notna()).any():
            raise HeatmapInputError(f"tiles.csv holds non-numeric values in column {name}", path=path, fix=fix)
        columns[name] = number.to_numpy(dtype=np.float64)
    geometry = np.stack([columns[c] for c in GEOMETRY_COLUMNS], axis=1) if len(frame) else np.zeros((0, 4))
    ok = np.isfinite(geometry).all(axis=1) & (geometry[:, 2] > 0) & (geometry[:, 3] > 0)
    if not drop_incomplete and not ok.all():
        raise HeatmapInputError("tiles.csv has tiles without a position or size", path=path, fix=fix)
    return TilesTable(coords_l0=np.rint(geometry[ok, :2]).astype(np.int64), width=geometry[ok, 2],
                      height=geometry[ok, 3], values={c: columns[c][ok] for c in VALUE_COLUMNS},
                      stamp=(str(path), stat.st_size, stat.st_mtime_ns),
                      stroma=(pd.to_numeric(frame[STROMA_COLUMN], errors="coerce").to_numpy(np.float64)[ok]
                              if STROMA_COLUMN in frame.columns else None))


# --- top_tiles.png ----------------------------------------------------------------------------
def level_for_downsample(level_downsamples, downsample: float) -> int:
    """The coarsest level whose downsample is ≤ ``downsample`` × 1.01 (as SlideHandle); 0 if none."""
    ok = [i for i, ds in enumerate(level_downsamples) if ds <= downsample * 1.01]
    return max(ok, key=lambda i: level_downsamples[i]) if ok else 0


def review_tile_px(size_l0: float, slide_mpp: float | None, review_mpp: float = REVIEW_MPP) -> int:
    """Edge in pixels of a tile shown at ``review_mpp`` µm/px (level-0 px if the mpp is unknown)."""
    return max(1, round(size_l0 * (slide_mpp / review_mpp if slide_mpp else 1.0)))


def read_tile_rgb(slide, xy_l0, size_l0: float, tile_px: int) -> np.ndarray:
    """A tile read from the best level for ``tile_px`` output pixels, resized to (tile_px, tile_px, 3)."""
    from PIL import Image

    target_ds = size_l0 / tile_px
    level = level_for_downsample(slide.level_downsamples, target_ds)
    read_px = max(1, math.ceil(size_l0 / slide.level_downsamples[level]))
    region = np.asarray(slide.read_region((int(xy_l0[0]), int(xy_l0[1])), level, (read_px, read_px)))[..., :3]
    if region.shape[:2] != (tile_px, tile_px):
        region = np.asarray(Image.fromarray(region).resize((tile_px, tile_px), Image.Resampling.LANCZOS))
    return region


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def rank_tiles(pred, attention=None, stroma=None, k: int = 8) -> tuple[list[np.ndarray], bool, bool]:
    """The rows of top_tiles.png: ``([top, bottom] tile indices, weighted, on_stroma)``.

    ``pred`` (N,) tile sTIL% (NaN: no prediction); ``attention`` (N,) pooling weights or None;
    ``stroma`` (N,) the estimated stroma fraction of each tile (the stain morphometry's
    ``stroma_est``) or None. sTIL% is defined on stroma, so where ``stroma`` is given both rows hold
    only tiles estimated at least :data:`STROMA_MIN` stroma (``on_stroma``; every tile when none is):
    a tumour nest with intratumoral lymphocytes is not shown as a high-sTIL tile. With pooling weights
    that differ, the top row ranks by weight × sTIL% × estimated stroma there — the tile's stromal
    lymphocytes' share of the score: on the seven synthetic benchmark cohorts the top 8 tiles' mean true
    stroma rose by 0.01–0.06 over weight × sTIL% alone, and no cohort's worst slide fell below 50 %
    that had been above it (docs/accuracy.md, session 21).
    """
    pred = np.asarray(pred, dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(pred))
    if valid.size == 0:
        raise HeatmapInputError("no tile has a prediction; there is nothing to show in top_tiles.png")
    on_stroma = False
    if stroma is not None:
        stroma = np.asarray(stroma, dtype=np.float64)
        if stroma.shape != pred.shape:
            raise HeatmapInputError(f"stroma has shape {stroma.shape} for {len(pred)} tiles")
        eligible = valid[np.nan_to_num(stroma[valid], nan=0.0) >= STROMA_MIN]
        if eligible.size:
            valid, on_stroma = eligible, True
    order = valid[np.argsort(-pred[valid], kind="stable")]
    n_top = min(k, math.ceil(len(order) / 2))
    rows = [order[:n_top], order[n_top:][::-1][:k]]
    weights = None if attention is None else np.asarray(attention, dtype=np.float64)
    weighted = weights is not None and np.isfinite(weights[valid]).all() and np.ptp(weights[valid]) > 1e-6 * max(
        float(np.max(weights[valid])), 1e-12)
    if weighted:  # rank by what the pooling makes of each tile, not by tile value alone
        contribution = pred[valid] * weights[valid]
        if on_stroma:  # × the tile's estimated stroma: its stromal lymphocytes' share of the score
            contribution = contribution * stroma[valid]
        top = valid[np.argsort(-contribution, kind="stable")][:n_top]
        heavy = np.setdiff1d(valid[weights[valid] >= np.median(weights[valid])], top)
        rest = np.setdiff1d(valid, np.concatenate([top, heavy]))
        bottom = np.concatenate([heavy[np.argsort(pred[heavy], kind="stable")],
                                 rest[np.argsort(pred[rest], kind="stable")]])[:k]
        rows = [top, bottom]
    return rows, weighted, on_stroma


def top_tiles_png(slide, coords_l0, size_l0, prediction, path, *, k: int = 8, attention=None, stroma=None,
                  cmap: str = DEFAULT_CMAP, review_mpp: float = REVIEW_MPP, max_tile_px: int = 256) -> Path:
    """Grid of the k highest- (top row) and k lowest-scoring (bottom row) tiles at ~``review_mpp`` µm/px.

    With pooling weights that differ between tiles (``attention``; weighted or attention pooling),
    the top row holds the tiles that raise the score most, by contribution (weight × sTIL%), and the
    bottom row the lowest sTIL% among the tiles weighted at least the median: sTIL% is defined on
    stroma, and the weights are the model's stroma-likeness, so a tumour nest with a high tile value
    but a low weight is not shown as "highest" (on the synthetic benchmark the top 8 tiles' mean
    stroma fraction rose from 0.63 to 0.86, docs/accuracy.md). With uniform weights (``mean``) both
    rows rank by sTIL%. With ``stroma`` (the estimated stroma fraction per tile, from a
    ``+stainmorph`` encoder) both rows hold only tiles at least :data:`STROMA_MIN` stroma-like, and a
    weighted top row ranks by weight × sTIL% × estimated stroma (:func:`rank_tiles`); where no tile is
    stroma-like, the heading says so.

    Each tile is labelled with its sTIL% over a swatch of its heatmap colour, and with its attention
    relative to uniform if given ("attn 2.0x": twice the mean). Fewer than 2k predicted tiles are split
    between the rows without repeats. The image is always ``top_tiles_size(k, tile_px)`` pixels.
    """
    from PIL import Image, ImageDraw

    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction, attention=attention)
    rows, weighted, on_stroma = rank_tiles(pred, extra["attention"], stroma, k)
    tile_px = min(review_tile_px(size, getattr(slide, "mpp", None), review_mpp), max_tile_px)
    width, height = top_tiles_size(k, tile_px)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(18), _font(14)
    heading = (f"{slide.slide_id}: largest contribution to the score (top); lowest sTIL% of well-weighted tiles "
               "(bottom)" if weighted else f"{slide.slide_id}: highest (top) and lowest (bottom) tile sTIL%")
    if on_stroma:
        heading += f", tiles at least {STROMA_MIN:.0%} stroma-like"  # no ≥: not in every font
    elif stroma is not None:  # sTIL% is a share of the stroma: say so when there is hardly any
        heading += f"; no tile is {STROMA_MIN:.0%} stroma-like, read with care"
    draw.text((_PAD, 8), heading, fill="black", font=big)
    att = extra["attention"]
    for r, (row, title) in enumerate(zip(rows, ("highest", "lowest"))):
        y0 = _HEAD + r * (tile_px + _LABEL + _PAD)
        for c, i in enumerate(row):
            x0 = _PAD + c * (tile_px + _PAD)
            canvas.paste(Image.fromarray(read_tile_rgb(slide, coords[i], size, tile_px)), (x0, y0 + _LABEL))
            draw.rectangle((x0, y0 + 2, x0 + 14, y0 + 16), fill=tuple(stil_rgb([pred[i]], cmap)[0].tolist()))
            label = f"{pred[i]:.1f}%"
            if att is not None and np.isfinite(att[i]):
                label += f"  attn {att[i] * len(pred):.1f}x"
            draw.text((x0 + 20, y0 + 1), label, fill="black", font=small)
        if len(row) == 0:
            draw.text((_PAD, y0 + _LABEL), f"no further tiles for the {title} row", fill="gray", font=small)
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def top_tiles_size(k: int, tile_px: int) -> tuple[int, int]:
    """(width, height) in pixels of the top-tiles image for ``k`` columns of ``tile_px`` tiles."""
    return _PAD + k * (tile_px + _PAD), _HEAD + 2 * (tile_px + _LABEL + _PAD)
