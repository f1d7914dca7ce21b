"""Per-slide review outputs: tiles.csv, heatmap.png, heatmap.tif, tiles.geojson, top_tiles.png.

Everything here takes a slide (the ``SlideHandle`` duck type: ``dimensions``, ``level_dimensions``,
``level_downsamples``, ``mpp``, ``slide_id``, ``read_region``, ``get_thumbnail``) and per-tile arrays:
``coords_l0`` (N, 2) level-0 top-left corners, ``size_l0`` the tile edge in level-0 px,
``prediction`` (N,) in sTIL% 0–100 (NaN = no prediction for that tile), and optionally
``attention`` (N,) (sums to 1 over the slide's tiles) and ``contribution`` = attention × prediction
(N,) (sums to the slide score, in sTIL% points).

Colour scales (``LAYERS``) are FIXED, never stretched to a slide's own range, so a colour means the
same on every slide:

* **prediction** (tile sTIL%): 0–100, linear, viridis (``stil_rgb``). Perceptually uniform, readable
  with colour-vision deficiency, and neither end is white or black, so no value looks like slide
  background or like the TIFF's "no prediction" white.
* **attention**: shown as N × attention, i.e. relative to uniform weighting 1/N ("1×" = an average
  tile, "4×" = four times its share), on a log2 scale from 1/16× to 16× (RdYlBu_r, diverging about
  1×: blue below average, pale yellow at 1×, red above, so the lowest weights are a saturated blue,
  never the near-black of magma that reads as missing tissue; values outside are clipped to the ends). Raw attention shrinks with the number of tiles, N × attention does not, and
  a ratio scale is symmetric about 1× (1/4× is as far below average as 4× is above). With mean
  pooling every tile is 1×.
* **contribution**: shown as N × contribution in sTIL% points — the points a tile would give the
  slide score if every tile weighed like it; its mean over the tiles is the slide score, and with
  uniform attention it equals the tile's sTIL%. Log10 scale from 1 to 1000 points (plasma), because
  attention spreads it over orders of magnitude.

``heatmap.png`` shows the H&E thumbnail (with a scale bar) next to one panel per layer (prediction;
attention and contribution when given), each with its own colour bar; the slide score is in the title
and marked on the sTIL% bar. Tiles are blended over the thumbnail; where there is no tile (background,
tiles without a value) the thumbnail shows through uncoloured.

``heatmap.tif`` is the prediction overlay at the slide's own geometry: level 0 has the slide's
level-0 width × height and mpp, so overlay pixel (x, y) is slide pixel (x, y) (OpenSlide, TiffSlide
and QuPath open it; a viewer can lay it over the slide 1:1). Aperio-like layout (see NOTES.md):
page 0 = level 0 (256-px tiles), page 1 = a stripped thumbnail, then levels reduced 4× each until
the larger side is ≤ 1024 px. Tiles are in their exact heatmap colour (lossless deflate with the
horizontal predictor), white where there is no prediction; tile edges are exact at level 0 and
rounded to the nearest pixel at reduced levels. The file is written tile by tile, one band of 256
rows at a time: a band is kept as its few distinct pixel rows (one per run of rows between tile
edges), each 256-px TIFF tile is expanded from those and deflated (in threads), and tiles of one flat
colour — background, tile interiors — are encoded once per colour and every repeat points at the same
bytes in the file (shared tile offsets). Memory grows with the slide's width (one band of distinct
rows per level) and its number of 256-px tiles (offset tables, ~70 bytes a tile), never with its area
in pixels. Measured with ``python -m benchmarks.bench_overlay`` on a shared 2-core machine (load
average ~8 from other jobs): a 100,000 × 80,000 px slide with 25,100 tiles of 448 px (112 µm at
0.25 µm/px) is written in 11–12 s wall, 5.9 s CPU, to a 48 MB file (122,383 level-0 tiles of which
51,986 hold distinct bytes); the process peaks at 87 MB RSS, 57 MB of it before writing (Python,
numpy, matplotlib, tifffile, imagecodecs), so the writer needs ~30 MB — a full-size RGB raster would
be 22.9 GB.

``tiles.geojson`` is a QuPath-importable FeatureCollection of tile objects in level-0 px with
measurements ``sTIL %``, ``attention``, ``relative attention`` (= N × attention) and
``contribution``. Every file is written to ``<name>.<pid>.partial`` and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from weakstil.errors import ConfigError, HeatmapInputError

DEFAULT_CMAP = "viridis"
NO_PREDICTION_RGB = (255, 255, 255)
STIL_LABEL = "sTIL% (0–100)"
REVIEW_MPP = 0.5
TIFF_TILE_PX = 256
OVERLAY_LEVEL_FACTOR = 4
OVERLAY_SMALLEST_PX = 1024  # the TIFF's last level has its larger side ≤ this
OVERLAY_THUMB_PX = 768
PNG_MAX_PX = 1024  # heatmap.png: the thumbnail (one panel) fits in this square
FILENAMES = {
    "csv": "tiles.csv",
    "png": "heatmap.png",
    "tif": "heatmap.tif",
    "geojson": "tiles.geojson",
    "top": "top_tiles.png",
}
TILE_COLUMNS = ("x", "y", "width", "height", "prediction", "attention", "contribution")
STIL_MEASUREMENT = "sTIL %"  # QuPath measurement names in tiles.geojson
_UUID_NAMESPACE = uuid.UUID("5a0c8f8e-2b44-4b8e-9a51-7e1c3f0d9a77")
_PAD, _LABEL, _HEAD = 8, 20, 36  # top_tiles.png: gap, label band above a tile, title band (px)


# --- inputs, colour ---------------------------------------------------------------------------
def check_tiles(coords_l0, size_l0, prediction, **extra) -> tuple[np.ndarray, float, np.ndarray, dict]:
    """Validate per-tile arrays; return (coords int64 (N,2), size float, prediction float64 (N,), extra).

    ``extra`` arrays (attention, contribution; None allowed) must have N entries too.
    """
    coords = np.asarray(coords_l0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise HeatmapInputError(f"coords_l0 must have shape (N, 2), got {coords.shape}")
    if coords.size and not np.issubdtype(coords.dtype, np.number):
        raise HeatmapInputError(f"coords_l0 must be numeric, got dtype {coords.dtype}")
    if not np.isfinite(coords).all():
        raise HeatmapInputError("coords_l0 holds NaN or infinite values")
    coords = np.rint(coords).astype(np.int64)
    size = float(size_l0)
    if not math.isfinite(size) or size <= 0:
        raise HeatmapInputError(f"size_l0 must be a positive number of level-0 pixels, got {size_l0!r}")
    pred = np.asarray(prediction, dtype=np.float64).reshape(-1)
    n = len(coords)
    if len(pred) != n:
        raise HeatmapInputError(f"prediction has {len(pred)} values for {n} tiles")
    finite = pred[np.isfinite(pred)]
    if np.isinf(pred).any() or (finite.size and (finite.min() < -1e-6 or finite.max() > 100 + 1e-6)):
        raise HeatmapInputError(
            f"prediction must be sTIL% in 0-100 (NaN for none), got range "
            f"[{np.nanmin(pred):g}, {np.nanmax(pred):g}]"
        )
    out = {}
    for name, values in extra.items():
        if values is None:
            out[name] = None
            continue
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(arr) != n:
            raise HeatmapInputError(f"{name} has {len(arr)} values for {n} tiles")
        out[name] = arr
    return coords, size, np.clip(pred, 0.0, 100.0), out


@lru_cache(maxsize=16)
def colormap_lut(cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """(256, 3) uint8 lookup table of a matplotlib colormap; entry i is sTIL% = i * 100 / 255."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise ConfigError(f"unknown colormap {cmap!r}",
                          fix="use a matplotlib colormap name such as viridis, cividis, inferno") from exc
    lut = colormap(np.linspace(0.0, 1.0, 256))[:, :3]
    lut = np.rint(lut * 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def stil_rgb(prediction, cmap: str = DEFAULT_CMAP, *, nan_rgb=NO_PREDICTION_RGB) -> np.ndarray:
    """(N, 3) uint8 colours of sTIL% values on the fixed 0–100 scale (values outside are clipped)."""
    pred = np.asarray(prediction, dtype=np.float64).reshape(-1)
    index = np.rint(np.clip(np.nan_to_num(pred, nan=0.0), 0.0, 100.0) * 255 / 100).astype(np.intp)
    rgb = colormap_lut(cmap)[index].copy()
    rgb[np.isnan(pred)] = nan_rgb
    return rgb


@dataclass(frozen=True)
class LayerScale:
    """The fixed colour scale of one per-tile layer (a tiles.csv column); see the module docstring.

    ``shown(values)`` is what the legend is in (N × value for attention and contribution, N = the
    number of tiles with a value); ``rgb(values)`` their colours.
    """

    name: str
    title: str
    label: str
    cmap: str
    vmin: float
    vmax: float
    log: bool
    ticks: tuple[float, ...]
    tick_labels: tuple[str, ...]
    times_n: bool  # shown value = N × stored value

    def shown(self, values, n_tiles: int | None = None) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.times_n:
            v = v * (int(np.isfinite(v).sum()) if n_tiles is None else n_tiles)
        return v

    def position(self, shown) -> np.ndarray:
        """Where shown values sit on the colour bar, 0 (bottom) … 1 (top), clipped; NaN stays NaN."""
        v = np.asarray(shown, dtype=np.float64)
        if self.log:
            lo, hi = math.log(self.vmin), math.log(self.vmax)
            with np.errstate(invalid="ignore"):
                t = (np.log(np.maximum(v, self.vmin * 1e-6)) - lo) / (hi - lo)
        else:
            t = (v - self.vmin) / (self.vmax - self.vmin)
        return np.clip(t, 0.0, 1.0)

    def rgb(self, values, n_tiles: int | None = None, *, nan_rgb=NO_PREDICTION_RGB) -> np.ndarray:
        """(N, 3) uint8 colours of stored values (NaN → ``nan_rgb``)."""
        if self.name == "prediction":
            return stil_rgb(values, self.cmap, nan_rgb=nan_rgb)
        t = self.position(self.shown(values, n_tiles))
        rgb = colormap_lut(self.cmap)[np.rint(np.nan_to_num(t, nan=0.0) * 255).astype(np.intp)].copy()
        rgb[np.isnan(t)] = nan_rgb
        return rgb

    def norm(self):
        """The matplotlib norm of the colour bar."""
        from matplotlib.colors import LogNorm, Normalize

        return (LogNorm if self.log else Normalize)(vmin=self.vmin, vmax=self.vmax)


LAYERS = {
    "prediction": LayerScale("prediction", "tile sTIL%", STIL_LABEL, DEFAULT_CMAP, 0.0, 100.0, False,
                             tuple(range(0, 101, 10)), tuple(str(v) for v in range(0, 101, 10)), False),
    "attention": LayerScale("attention", "attention", "attention × N (1× = uniform 1/N)", "RdYlBu_r",
                            1 / 16, 16.0, True, (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16),
                            ("1/16×", "1/8×", "1/4×", "1/2×", "1×", "2×", "4×", "8×", "16×"), True),
    "contribution": LayerScale("contribution", "contribution", "contribution × N (sTIL% points)",
                               "plasma", 1.0, 1000.0, True, (1, 3, 10, 30, 100, 300, 1000),
                               ("1", "3", "10", "30", "100", "300", "1000"), True),
}


def layer_scale(name: str, cmap: str | None = None) -> LayerScale:
    """The fixed scale of layer ``name`` (``LAYERS``), optionally with another colormap."""
    try:
        scale = LAYERS[name]
    except KeyError as exc:
        raise ConfigError(f"unknown heatmap layer {name!r}", fix=f"choose from {sorted(LAYERS)}") from exc
    return replace(scale, cmap=cmap) if cmap else scale


def _cell_bounds(coords_l0, size_l0: float, ds_x: float, ds_y: float) -> tuple[np.ndarray, ...]:
    """Tile boxes in raster pixels at downsample (ds_x, ds_y): (x0, y0, x1, y1) int64, unclipped.

    Edges round to the nearest raster pixel edge; every tile covers at least one pixel.
    """
    coords = np.asarray(coords_l0, dtype=np.float64).reshape(-1, 2)
    x0 = np.floor(coords[:, 0] / ds_x + 0.5).astype(np.int64)
    y0 = np.floor(coords[:, 1] / ds_y + 0.5).astype(np.int64)
    x1 = np.maximum(np.floor((coords[:, 0] + size_l0) / ds_x + 0.5).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.floor((coords[:, 1] + size_l0) / ds_y + 0.5).astype(np.int64), y0 + 1)
    return x0, y0, x1, y1


def paint_tiles(canvas: np.ndarray, coords_l0, size_l0: float, rgb: np.ndarray, *,
                downsample_xy: tuple[float, float], mask: np.ndarray | None = None) -> np.ndarray:
    """Paint each tile's colour as a filled square into ``canvas`` (a raster at ``downsample_xy``).

    Edges round to the nearest raster pixel, every tile covers at least one pixel; where tiles overlap
    the later one wins. ``mask`` (same h, w), if given, is set True under painted tiles.
    """
    h, w = canvas.shape[:2]
    x0, y0, x1, y1 = _cell_bounds(coords_l0, size_l0, *downsample_xy)
    np.clip(x0, 0, w, out=x0), np.clip(x1, 0, w, out=x1)
    np.clip(y0, 0, h, out=y0), np.clip(y1, 0, h, out=y1)
    for i in range(len(x0)):
        canvas[y0[i]:y1[i], x0[i]:x1[i]] = rgb[i]
        if mask is not None:
            mask[y0[i]:y1[i], x0[i]:x1[i]] = True
    return canvas


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it into place on success, remove it on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- tiles.csv --------------------------------------------------------------------------------
def tiles_frame(coords_l0, size_l0, prediction, attention=None, contribution=None):
    """tiles.csv as a DataFrame: x, y, width, height (level-0 px, int), prediction (0–100), attention,
    contribution (NaN where not given)."""
    import pandas as pd

    coords, size, pred, extra = check_tiles(
        coords_l0, size_l0, prediction, attention=attention, contribution=contribution
    )
    n = len(coords)
    width = np.full(n, int(round(size)), dtype=np.int64)
    nan = np.full(n, np.nan)
    return pd.DataFrame({
        "x": coords[:, 0], "y": coords[:, 1], "width": width, "height": width.copy(),
        "prediction": pred,
        "attention": extra["attention"] if extra["attention"] is not None else nan,
        "contribution": extra["contribution"] if extra["contribution"] is not None else nan.copy(),
    }, columns=list(TILE_COLUMNS))


def write_tiles_csv(path, coords_l0, size_l0, prediction, attention=None, contribution=None) -> Path:
    """Write tiles.csv atomically (floats with 6 significant digits, NaN as an empty field)."""
    frame = tiles_frame(coords_l0, size_l0, prediction, attention, contribution)
    path = Path(path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return path


# --- heatmap.png ------------------------------------------------------------------------------
def blend_tiles(thumb: np.ndarray, slide_dims, coords_l0, size_l0: float, rgb: np.ndarray, *,
                alpha: float = 0.55) -> np.ndarray:
    """Thumbnail with each tile's colour ``rgb[i]`` blended in at ``alpha``; elsewhere the plain
    thumbnail (background stays uncoloured)."""
    thumb = np.asarray(thumb)[..., :3]
    th, tw = thumb.shape[:2]
    colour = np.zeros((th, tw, 3), np.uint8)
    mask = np.zeros((th, tw), bool)
    paint_tiles(colour, coords_l0, size_l0, rgb, downsample_xy=(slide_dims[0] / tw, slide_dims[1] / th),
                mask=mask)
    blended = np.rint((1 - alpha) * thumb + alpha * colour.astype(np.float32)).astype(np.uint8)
    return np.where(mask[..., None], blended, thumb)


def overlay_rgb(thumb: np.ndarray, slide_dims, coords_l0, size_l0, prediction, *,
                alpha: float = 0.55, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Thumbnail with predicted tiles blended in at ``alpha``; tiles without a prediction stay plain."""
    pred = np.asarray(prediction, dtype=np.float64)
    has = np.isfinite(pred)
    return blend_tiles(thumb, slide_dims, np.asarray(coords_l0)[has], size_l0, stil_rgb(pred[has], cmap),
                       alpha=alpha)


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel geometry of heatmap.png: size, dpi, each panel's top-left corner and colour bar box.

    ``panels`` names what each panel shows: ``"he"`` (the plain thumbnail) or a layer of ``LAYERS``.
    """

    width: int
    height: int
    dpi: int
    panel_px: tuple[int, int]                  # (w, h) of each panel = the thumbnail
    panels: tuple[str, ...]
    panels_xy: tuple[tuple[int, int], ...]     # top-left of each panel
    colorbars_xywh: tuple[tuple[int, int, int, int] | None, ...]  # per panel (None: the H&E panel)
    title_h: int

    def panel_xy(self, panel: str = "prediction") -> tuple[int, int]:
        return self.panels_xy[self.panels.index(panel)]

    @property
    def colorbar_xywh(self) -> tuple[int, int, int, int]:
        """The sTIL% colour bar's box."""
        return self.colorbars_xywh[self.panels.index("prediction")]

    def png_xy_from_l0(self, xy_l0, slide_dims, panel: str = "prediction") -> tuple[int, int]:
        """Pixel (x, y) in heatmap.png of a level-0 point, in the given panel."""
        x0, y0 = self.panel_xy(panel)
        tw, th = self.panel_px
        return (x0 + int(xy_l0[0] * tw / slide_dims[0]), y0 + int(xy_l0[1] * th / slide_dims[1]))


def heatmap_layout(thumb_w: int, thumb_h: int,
                   panels: tuple[str, ...] = ("he", "prediction", "attention", "contribution")) -> HeatmapLayout:
    """Panels in a grid (one row for ≤ 2 panels or a portrait thumbnail, else two columns), each
    with its title above and its colour bar to the right; the dpi grows with the thumbnail so the
    text keeps its size relative to the pictures."""
    n = len(panels)
    ncols = n if n <= 2 or thumb_h > 1.3 * thumb_w else 2
    nrows = math.ceil(n / ncols)
    barred = [any(p != "he" for p in panels[col::ncols]) for col in range(ncols)]  # columns with bars
    dpi = max(72, round(max(thumb_h, 0.75 * thumb_w) / 7))
    left, right, title_h, panel_title, bottom, bar_gap, bar_w, bar_text, col_gap, row_gap = (
        round(v * dpi / 100) for v in (16, 8, 62, 26, 12, 10, 20, 84, 16, 12))
    cell_w = [thumb_w + (bar_gap + bar_w + bar_text if has_bar else 0) for has_bar in barred]
    cell_h = panel_title + thumb_h
    xy, bars = [], []
    for i, panel in enumerate(panels):
        row, col = divmod(i, ncols)
        x = left + sum(cell_w[:col]) + col * col_gap
        y = title_h + row * (cell_h + row_gap) + panel_title
        xy.append((x, y))
        bars.append(None if panel == "he" else (x + thumb_w + bar_gap, y, bar_w, thumb_h))
    return HeatmapLayout(width=left + sum(cell_w) + (ncols - 1) * col_gap + right,
                         height=title_h + nrows * cell_h + (nrows - 1) * row_gap + bottom, dpi=dpi,
                         panel_px=(thumb_w, thumb_h), panels=tuple(panels), panels_xy=tuple(xy),
                         colorbars_xywh=tuple(bars), title_h=title_h)


def _scale_bar_um(panel_w: int, um_per_px: float) -> float:
    """A round length (µm) about a fifth of the panel's width."""
    target = panel_w * um_per_px / 5
    for um in (10_000, 5_000, 2_000, 1_000, 500, 200, 100, 50, 20, 10):
        if um <= target:
            return float(um)
    return 10.0


def heatmap_image(slide, coords_l0, size_l0, prediction, *, attention=None, contribution=None,
                  score=None, max_px: int = PNG_MAX_PX, alpha: float = 0.7,
                  cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The heatmap picture as (h, w, 3) uint8 RGB; geometry in ``heatmap_layout`` of the thumbnail size.

    Panels: the H&E thumbnail, then tile sTIL% and, when given (any finite value), attention and
    contribution, each blended over the thumbnail on its fixed scale (``LAYERS``) with its own colour
    bar. Matplotlib (Agg, object-oriented, no pyplot) draws the text and colour bars; the pictures are
    placed 1:1 (``figimage``: no resampling).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction, attention=attention,
                                            contribution=contribution)
    thumb = np.ascontiguousarray(np.asarray(slide.get_thumbnail(max_px))[..., :3])
    th, tw = thumb.shape[:2]
    dims = tuple(slide.dimensions)
    values = {"prediction": pred, **extra}
    layers = ["prediction"] + [name for name in ("attention", "contribution")
                               if values[name] is not None and np.isfinite(values[name]).any()]
    lay = heatmap_layout(tw, th, ("he", *layers))
    fig = Figure(figsize=(lay.width / lay.dpi, lay.height / lay.dpi), dpi=lay.dpi)
    FigureCanvasAgg(fig)
    W, H = lay.width, lay.height

    def frac(x, y, w, h):  # top-left pixel box -> matplotlib figure fraction (origin bottom-left)
        return (x / W, 1 - (y + h) / H, w / W, h / H)

    text_gap = 5 * lay.dpi / 100
    for panel, (x, y), bar_box in zip(lay.panels, lay.panels_xy, lay.colorbars_xywh):
        if panel == "he":
            picture, title = thumb, "H&E"
        else:
            scale = layer_scale(panel, cmap if panel == "prediction" else None)
            has = np.isfinite(values[panel])
            rgb = scale.rgb(values[panel][has], int(has.sum()))
            picture = blend_tiles(thumb, dims, coords[has], size, rgb, alpha=alpha)
            title = scale.title
            if panel == "attention" and np.allclose(scale.shown(values[panel][has]), 1.0, rtol=1e-3):
                title += " (uniform: mean pooling)"
        fig.figimage(picture, xo=x, yo=H - y - th, origin="upper", zorder=-1)  # under the axes
        fig.text(x / W, 1 - (y - text_gap) / H, title, ha="left", va="bottom", fontsize=11,
                 fontweight="bold")
        if bar_box is None:
            continue
        cax = fig.add_axes(frac(*bar_box))
        bar = fig.colorbar(ScalarMappable(norm=scale.norm(), cmap=scale.cmap), cax=cax,
                           extend="both" if scale.log else "neither")
        cax.minorticks_off()
        bar.set_ticks(list(scale.ticks), labels=list(scale.tick_labels))
        bar.ax.tick_params(labelsize=8)
        bar.set_label(scale.label, fontsize=9)
        if panel == "prediction" and score is not None and math.isfinite(score):
            cax.axhline(float(np.clip(score, 0, 100)), color="red", linewidth=2.5)

    # scale bar on the H&E panel
    mpp = getattr(slide, "mpp", None)
    if mpp:
        x, y = lay.panel_xy("he")
        um_per_px = mpp * dims[0] / tw
        um = _scale_bar_um(tw, um_per_px)
        ax = fig.add_axes(frac(x, y, tw, th))
        ax.set_xlim(0, tw), ax.set_ylim(th, 0), ax.set_axis_off()
        bar_px, pad = um / um_per_px, max(6, 0.03 * min(tw, th))
        ax.plot([pad, pad + bar_px], [th - pad, th - pad], color="black", linewidth=3, solid_capstyle="butt")
        ax.text(pad + bar_px / 2, th - pad - 4, f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm",
                ha="center", va="bottom", fontsize=9,
                bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})

    n_pred = int(np.isfinite(pred).sum())
    score_text = (f"slide sTIL% {score:.1f}" if score is not None and math.isfinite(score)
                  else "slide sTIL% not given")
    left = lay.panels_xy[0][0] / W
    fig.text(left, 1 - 10 * lay.dpi / 100 / H, f"{slide.slide_id} — {score_text}", ha="left", va="top",
             fontsize=15, fontweight="bold")
    tile_um = f" of {size * mpp:.0f} µm" if mpp else ""
    notes = [f"{n_pred} tiles{tile_um}", "tile sTIL% on the fixed 0–100 scale (red line: slide score)"]
    if len(layers) > 1:
        notes.append("attention and contribution × N (N tiles), fixed log scales")
    fig.text(left, 1 - 38 * lay.dpi / 100 / H, " · ".join(notes), ha="left", va="top", fontsize=9,
             color="#444444")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def heatmap_png(slide, coords_l0, size_l0, prediction, path, *, attention=None, contribution=None,
                score=None, max_px: int = PNG_MAX_PX, alpha: float = 0.7, cmap: str = DEFAULT_CMAP) -> Path:
    """Write heatmap.png (see ``heatmap_image``)."""
    from PIL import Image

    image = heatmap_image(slide, coords_l0, size_l0, prediction, attention=attention,
                          contribution=contribution, score=score, max_px=max_px, alpha=alpha, cmap=cmap)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=3)
    return path


# --- heatmap.tif ------------------------------------------------------------------------------
def overlay_level_sizes(width: int, height: int, *, factor: int = OVERLAY_LEVEL_FACTOR,
                        smallest_px: int = OVERLAY_SMALLEST_PX) -> list[tuple[int, int]]:
    """(w, h) of the overlay's levels: the slide's level 0, then ÷``factor`` (rounded up) until the
    larger side is ≤ ``smallest_px``. Level k has the nominal downsample ``factor ** k``."""
    sizes = [(int(width), int(height))]
    while max(sizes[-1]) > smallest_px:
        w, h = sizes[-1]
        sizes.append((-(-w // factor), -(-h // factor)))
    return sizes


def _deflate_encoder():
    """bytes-like → zlib (deflate) stream: zlib-ng through imagecodecs when present (≈3× faster)."""
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        imagecodecs = None
    if imagecodecs is not None:
        ng = getattr(imagecodecs, "ZLIBNG", None)
        if ng is not None and getattr(ng, "available", False):
            return lambda data: imagecodecs.zlibng_encode(data, level=3)
        return lambda data: imagecodecs.zlib_encode(data, level=6)
    import zlib

    return lambda data: zlib.compress(np.ascontiguousarray(data).tobytes(), 6)


def _encoder_threads(workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _page_chunks(boxes, rgb: np.ndarray, level_wh: tuple[int, int], *, encode, pool, pool_size: int,
                 shared: list[tuple[int, int]]) -> Iterator[bytes]:
    """The encoded 256-px tiles of one overlay page, row by row (see the module docstring).

    ``boxes`` = (x0, y0, x1, y1): the tiles in this level's pixels. A 256-row band is held as its
    distinct pixel rows (``rows``, one per run of rows between tile edges, ``heights`` rows each).
    Flat tiles are encoded once per colour; each repeat yields ``b""`` and is appended to ``shared``
    as (tile index, index of the tile whose bytes it reuses), to be pointed there afterwards.
    """
    T = TIFF_TILE_PX
    w, h = level_wh
    ncols, nrows = -(-w // T), -(-h // T)
    row_w = ncols * T
    x0, y0, x1, y1 = (np.asarray(b, np.int64) for b in boxes)
    x0, x1 = np.clip(x0, 0, row_w), np.clip(x1, 0, row_w)
    order = np.argsort(y0, kind="stable")
    y0_sorted = y0[order]
    span = int((y1 - y0).max()) if len(y0) else 0
    flat: dict[bytes, int] = {}  # colour -> index of the first tile of that flat colour
    white = np.array(NO_PREDICTION_RGB, np.uint8)
    for band in range(nrows):
        top, bottom = band * T, band * T + T
        lo = np.searchsorted(y0_sorted, top - span, "right")
        hi = np.searchsorted(y0_sorted, bottom, "left")
        idx = np.sort(order[lo:hi])  # original order: later tiles win where they overlap
        idx = idx[y1[idx] > top]
        cuts = np.unique(np.concatenate([[top, bottom], np.clip(y0[idx], top, bottom),
                                         np.clip(y1[idx], top, bottom)]))
        heights = np.diff(cuts)
        rows = np.empty((len(heights), row_w, 3), np.uint8)
        rows[:] = white
        ka = np.searchsorted(cuts, np.maximum(y0[idx], top)).tolist()
        kb = np.searchsorted(cuts, np.minimum(y1[idx], bottom)).tolist()
        for i, a, b, xa, xb in zip(idx.tolist(), ka, kb, x0[idx].tolist(), x1[idx].tolist()):
            rows[a:b, xa:xb] = rgb[i]
        blocks = rows.reshape(len(heights), ncols, T, 3)
        first = blocks[:1, :, :1, :]
        is_flat = (blocks == first).all(axis=(0, 2, 3))
        delta = blocks.copy()  # the TIFF horizontal predictor, per row of each tile
        np.subtract(blocks[:, :, 1:], blocks[:, :, :-1], out=delta[:, :, 1:])

        def encode_tiles(cols, delta=delta, heights=heights):
            return [encode(np.repeat(delta[:, col], heights, axis=0)) for col in cols]

        out: list[bytes | None] = [None] * ncols
        todo = []
        base = band * ncols
        for col in range(ncols):
            if not is_flat[col]:
                todo.append(col)
                continue
            key = first[0, col, 0].tobytes()
            ref = flat.get(key)
            if ref is None:
                flat[key] = base + col
                todo.append(col)
            else:
                shared.append((base + col, ref))
                out[col] = b""
        n_jobs = min(pool_size, len(todo))  # one job per thread and band: few hand-offs
        parts = [todo[k * len(todo) // n_jobs:(k + 1) * len(todo) // n_jobs] for k in range(n_jobs)]
        encoded = pool.map(encode_tiles, parts) if n_jobs > 1 else map(encode_tiles, parts)
        for col, data in zip((c for part in parts for c in part), (d for part in encoded for d in part)):
            out[col] = data
        yield from out


def _point_shared_tiles(path: Path, shared_by_page: dict[int, list[tuple[int, int]]]) -> None:
    """Point every repeated flat tile at the bytes of its first occurrence (offsets and byte counts)."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page_index, shared in shared_by_page.items():
            if not shared:
                continue
            page = tif.pages[page_index]
            offsets = np.array(page.dataoffsets, dtype=np.int64)
            counts = np.array(page.databytecounts, dtype=np.int64)
            pairs = np.asarray(shared, dtype=np.int64)
            offsets[pairs[:, 0]] = offsets[pairs[:, 1]]
            counts[pairs[:, 0]] = counts[pairs[:, 1]]
            page.tags["TileOffsets"].overwrite(offsets.tolist())
            page.tags["TileByteCounts"].overwrite(counts.tolist())


def heatmap_tiff(slide, coords_l0, size_l0, prediction, path, *, cmap: str = DEFAULT_CMAP,
                 workers: int | None = None) -> Path:
    """Write the pyramidal TIFF overlay at the slide's geometry (Aperio-like; see the module docstring).

    Level 0 is the slide's level-0 width × height with its mpp; predicted tiles are filled with their
    exact sTIL% colour (``stil_rgb``), everything else is white. ``workers`` deflate threads (default:
    up to 4 of the CPUs this process may use). The description carries ``MPP``, ``Overlay``,
    ``SlideID``, ``SlideWidth`` and ``SlideHeight``.
    """
    import tifffile

    from weakstil.wsi.writer import APERIO_HEADER

    coords, size, pred, _ = check_tiles(coords_l0, size_l0, prediction)
    has = np.isfinite(pred)
    coords, rgb = coords[has], stil_rgb(pred[has], cmap)
    width, height = (int(v) for v in slide.dimensions)
    if width < 1 or height < 1:
        raise HeatmapInputError(f"the slide has no pixels ({width}x{height})")
    sizes = overlay_level_sizes(width, height)
    mpp = getattr(slide, "mpp", None)
    meta = f"|MPP = {mpp:.6g}" if mpp else ""
    meta += (f"|Overlay = sTIL% 0-100 {cmap}|SlideID = {str(slide.slide_id).replace('|', '_')}"
             f"|SlideWidth = {width}|SlideHeight = {height}")
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    scale = min(1.0, OVERLAY_THUMB_PX / max(width, height))
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    thumb = np.empty((th, tw, 3), np.uint8)
    thumb[:] = NO_PREDICTION_RGB
    paint_tiles(thumb, coords, size, rgb, downsample_xy=(width / tw, height / th))
    common = {"photometric": "rgb", "metadata": None, "compression": "zlib", "predictor": True,
              "subfiletype": 0, "dtype": np.uint8}
    T = TIFF_TILE_PX
    head = f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] ({T}x{T})"
    # flat tiles are shared, so the file holds ~1 KB per tile that crosses a tile edge at most
    n_segments = sum(-(-w // T) * -(-h // T) for w, h in sizes)
    bigtiff = n_segments * 4096 > 2**31
    encode = _deflate_encoder()
    threads = _encoder_threads(workers)
    shared_by_page: dict[int, list[tuple[int, int]]] = {}
    path = Path(path)
    with atomic_path(path) as tmp:
        with ThreadPoolExecutor(threads) as pool, \
                tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level, (lw, lh) in enumerate(sizes):
                ds = float(OVERLAY_LEVEL_FACTOR ** level)
                page_index = 0 if level == 0 else level + 1  # page 1 is the thumbnail
                shared_by_page[page_index] = []
                chunks = _page_chunks(_cell_bounds(coords, size, ds, ds), rgb, (lw, lh), encode=encode,
                                      pool=pool, pool_size=threads, shared=shared_by_page[page_index])
                if level == 0:
                    tif.write(chunks, shape=(lh, lw, 3), tile=(T, T), description=f"{head} RGB{meta}",
                              **res, **common)
                    # page 1: the stripped thumbnail that Aperio readers expect before the reduced levels
                    tif.write(thumb, description=f"{APERIO_HEADER}{width}x{height} -> {tw}x{th} - {meta}",
                              **common)
                else:
                    tif.write(chunks, shape=(lh, lw, 3), tile=(T, T), description=f"{head} -> {lw}x{lh} RGB",
                              **common)
        _point_shared_tiles(tmp, shared_by_page)
    return path


# --- tiles.geojson ----------------------------------------------------------------------------
def tiles_feature_collection(coords_l0, size_l0, prediction, attention=None, *, slide_id: str,
                             cutoff: float = 30.0, contribution=None, cmap: str = DEFAULT_CMAP) -> dict:
    """QuPath (≥ 0.4) GeoJSON FeatureCollection of tile objects, level-0 px.

    Each feature: a closed square ring [x, x + size_l0] × [y, y + size_l0]; ``objectType: "tile"``
    (QuPath's tile object, a kind of detection); ``classification`` "sTIL high" (≥ cutoff) or
    "sTIL low" with a fixed class colour; ``color`` = the tile's own heatmap colour (QuPath draws the
    object in it); ``measurements`` as a name → number map (the form QuPath ≥ 0.4 writes and reads):
    ``sTIL %`` (0–100), ``attention`` (raw, sums to 1), ``relative attention`` (N × attention, 1 =
    uniform) and ``contribution`` (sTIL% points, sums to the slide score). Missing values are left out.
    """
    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction,
                                            attention=attention, contribution=contribution)
    tile_rgb = stil_rgb(pred, cmap)
    class_rgb = {name: stil_rgb([value], cmap)[0].tolist() for name, value in (("sTIL high", 100.0),
                                                                                ("sTIL low", 0.0))}
    attention, contribution = extra["attention"], extra["contribution"]
    relative = LAYERS["attention"].shown(attention) if attention is not None else None
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        x1, y1 = round(x + size, 2), round(y + size, 2)
        props: dict = {"objectType": "tile", "isLocked": True}
        measurements = {}
        if np.isfinite(pred[i]):
            name = "sTIL high" if pred[i] >= cutoff else "sTIL low"
            props["classification"] = {"name": name, "color": class_rgb[name]}
            props["color"] = tile_rgb[i].tolist()
            measurements[STIL_MEASUREMENT] = round(float(pred[i]), 4)
        for key, values in (("attention", attention), ("relative attention", relative),
                            ("contribution", contribution)):
            if values is not None and np.isfinite(values[i]):
                measurements[key] = float(values[i])
        props["measurements"] = measurements
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}:{x}:{y}")),
            "geometry": {"type": "Polygon",
                         "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]},
            "properties": props,
        })
    return {"type": "FeatureCollection", "features": features,
            "weakstil": {"slide_id": slide_id, "units": "level-0 px", "stil_scale": "0-100",
                         "cutoff": cutoff, "cmap": cmap}}


def tiles_geojson(path, coords_l0, size_l0, prediction, attention=None, *, slide_id: str,
                  cutoff: float = 30.0, contribution=None, cmap: str = DEFAULT_CMAP) -> Path:
    """Write tiles.geojson atomically (see ``tiles_feature_collection``)."""
    collection = tiles_feature_collection(coords_l0, size_l0, prediction, attention, slide_id=slide_id,
                                          cutoff=cutoff, contribution=contribution, cmap=cmap)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, allow_nan=False, separators=(",", ":")), encoding="utf-8")
    return path


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


def top_tiles_png(slide, coords_l0, size_l0, prediction, path, *, k: int = 8, attention=None,
                  cmap: str = DEFAULT_CMAP, review_mpp: float = REVIEW_MPP, max_tile_px: int = 256) -> Path:
    """Grid of the k highest- (top row) and k lowest-scoring (bottom row) tiles at ~``review_mpp`` µm/px.

    Each tile is labelled with its sTIL% over a swatch of its heatmap colour, and with its attention
    relative to uniform if given ("attn 2.0x": twice the mean). Fewer than 2k predicted tiles are split
    between the rows without repeats. The image is always ``top_tiles_size(k, tile_px)`` pixels.
    """
    from PIL import Image, ImageDraw

    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction, attention=attention)
    valid = np.flatnonzero(np.isfinite(pred))
    if valid.size == 0:
        raise HeatmapInputError("no tile has a prediction; there is nothing to show in top_tiles.png")
    order = valid[np.argsort(-pred[valid], kind="stable")]
    n_top = min(k, math.ceil(len(order) / 2))
    rows = [order[:n_top], order[n_top:][::-1][:k]]
    tile_px = min(review_tile_px(size, getattr(slide, "mpp", None), review_mpp), max_tile_px)
    width, height = top_tiles_size(k, tile_px)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    big, small = _font(18), _font(14)
    draw.text((_PAD, 8), f"{slide.slide_id}: highest (top) and lowest (bottom) tile sTIL%", fill="black",
              font=big)
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


# --- everything for one slide -----------------------------------------------------------------
def slide_results_dir(results_dir: str | Path, slide_id: str) -> Path:
    """``results/slides/<slide_id>``: where ``write_slide_outputs`` is meant to write (DESIGN.md)."""
    return Path(results_dir) / "slides" / slide_id


def write_slide_outputs(slide, out_dir, *, coords_l0, size_l0, prediction, attention, contribution,
                        score, formats=("csv", "png", "tif", "geojson", "top"),
                        cmap: str = DEFAULT_CMAP, cutoff: float = 30.0) -> dict[str, Path]:
    """Write the per-slide review files into ``out_dir`` (the slide's own folder); return {format: path}."""
    unknown = sorted(set(formats) - set(FILENAMES))
    if unknown:
        raise ConfigError(f"unknown output format(s) {unknown}", fix=f"choose from {sorted(FILENAMES)}")
    check_tiles(coords_l0, size_l0, prediction, attention=attention, contribution=contribution)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out_dir / FILENAMES[fmt] for fmt in FILENAMES if fmt in formats}
    if "csv" in paths:
        write_tiles_csv(paths["csv"], coords_l0, size_l0, prediction, attention, contribution)
    if "png" in paths:
        heatmap_png(slide, coords_l0, size_l0, prediction, paths["png"], attention=attention,
                    contribution=contribution, score=score, cmap=cmap)
    if "tif" in paths:
        heatmap_tiff(slide, coords_l0, size_l0, prediction, paths["tif"], cmap=cmap)
    if "geojson" in paths:
        tiles_geojson(paths["geojson"], coords_l0, size_l0, prediction, attention, slide_id=slide.slide_id,
                      cutoff=cutoff, contribution=contribution, cmap=cmap)
    if "top" in paths:
        top_tiles_png(slide, coords_l0, size_l0, prediction, paths["top"], attention=attention, cmap=cmap)
    return paths
