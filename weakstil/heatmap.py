"""Per-slide review outputs: tiles.csv, heatmap.png, heatmap.tif, tiles.geojson, top_tiles.png.

Everything here takes a slide (the ``SlideHandle`` duck type: ``dimensions``, ``level_dimensions``,
``level_downsamples``, ``mpp``, ``slide_id``, ``read_region``, ``get_thumbnail``) and per-tile arrays:
``coords_l0`` (N, 2) level-0 top-left corners, ``size_l0`` the tile edge in level-0 px, and
``prediction`` (N,) in sTIL% 0–100 (NaN = no prediction for that tile).

Colour is always on the FIXED 0–100 scale (``stil_rgb``), never min–max normalised, so the same
sTIL% has the same colour on every slide and in every output (PNG, TIFF, GeoJSON). The default
colormap is viridis: perceptually uniform, readable with colour-vision deficiency, and neither end is
white or black, so no value looks like slide background or like the TIFF's "no prediction" white.

``heatmap.tif`` is the colour-mapped prediction raster at 1/16 of level 0 (``OVERLAY_DOWNSAMPLE``):
overlay pixel (i, j) covers slide level-0 pixels [16j, 16j+16) × [16i, 16i+16), and its mpp tag is
the slide's × 16, so it spans the slide's physical extent from the same top-left corner. OpenSlide
and TiffSlide read it as an ordinary Aperio-like slide of ceil(W/16) × ceil(H/16) pixels with that
mpp; neither aligns it to the slide by itself (neither has a notion of overlays): a viewer places it
by physical size (OpenSeadragon: the slide's viewport width) or multiplies its pixel coordinates by
16. Tile colours are exact (lossless deflate). For QuPath, import ``tiles.geojson`` onto the slide
itself: tile objects in level-0 px, each drawn in its heatmap colour on the same 0–100 scale.
Measured on a shared 2-core machine: a 100k × 80k slide with 25k tiles takes 0.85 s and 1.1 MB;
the same overlay at full level-0 geometry (JPEG tiles) took 32 s and 226 MB, so that is not done.

Every file is written to ``<name>.<pid>.partial`` and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from weakstil.errors import ConfigError, HeatmapInputError

DEFAULT_CMAP = "viridis"
NO_PREDICTION_RGB = (255, 255, 255)
STIL_LABEL = "sTIL% (0–100)"
REVIEW_MPP = 0.5
OVERLAY_DOWNSAMPLE = 16
_MAX_OVERLAY_PX = 2**28
FILENAMES = {
    "csv": "tiles.csv",
    "png": "heatmap.png",
    "tif": "heatmap.tif",
    "geojson": "tiles.geojson",
    "top": "top_tiles.png",
}
TILE_COLUMNS = ("x", "y", "width", "height", "prediction", "attention", "contribution")
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


def paint_tiles(canvas: np.ndarray, coords_l0, size_l0: float, rgb: np.ndarray, *,
                downsample_xy: tuple[float, float], mask: np.ndarray | None = None) -> np.ndarray:
    """Paint each tile's colour as a filled square into ``canvas`` (a raster at ``downsample_xy``).

    Edges round to the nearest raster pixel, every tile covers at least one pixel; where tiles overlap
    the later one wins. ``mask`` (same h, w), if given, is set True under painted tiles.
    """
    ds_x, ds_y = downsample_xy
    h, w = canvas.shape[:2]
    coords = np.asarray(coords_l0, dtype=np.float64)
    x0 = np.floor(coords[:, 0] / ds_x + 0.5).astype(np.int64)
    y0 = np.floor(coords[:, 1] / ds_y + 0.5).astype(np.int64)
    x1 = np.maximum(np.floor((coords[:, 0] + size_l0) / ds_x + 0.5).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.floor((coords[:, 1] + size_l0) / ds_y + 0.5).astype(np.int64), y0 + 1)
    np.clip(x0, 0, w, out=x0), np.clip(x1, 0, w, out=x1)
    np.clip(y0, 0, h, out=y0), np.clip(y1, 0, h, out=y1)
    for i in range(len(coords)):
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
def overlay_rgb(thumb: np.ndarray, slide_dims, coords_l0, size_l0, prediction, *,
                alpha: float = 0.55, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Thumbnail with predicted tiles blended in at ``alpha``; tiles without a prediction stay plain."""
    thumb = np.asarray(thumb)[..., :3]
    th, tw = thumb.shape[:2]
    pred = np.asarray(prediction, dtype=np.float64)
    has = np.isfinite(pred)
    colour = np.zeros((th, tw, 3), np.uint8)
    mask = np.zeros((th, tw), bool)
    paint_tiles(colour, np.asarray(coords_l0)[has], size_l0, stil_rgb(pred[has], cmap),
                downsample_xy=(slide_dims[0] / tw, slide_dims[1] / th), mask=mask)
    blended = np.rint((1 - alpha) * thumb + alpha * colour.astype(np.float32)).astype(np.uint8)
    return np.where(mask[..., None], blended, thumb)


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel geometry of heatmap.png: size, dpi, and the top-left corner of each picture panel."""

    width: int
    height: int
    dpi: int
    panel_px: tuple[int, int]                  # (w, h) of each panel = the thumbnail
    panels_xy: tuple[tuple[int, int], ...]     # top-left of each panel; the last one is the heatmap
    colorbar_xywh: tuple[int, int, int, int]   # from the top-left of the image

    def png_xy_from_l0(self, xy_l0, slide_dims) -> tuple[int, int]:
        """Pixel (x, y) in heatmap.png of a level-0 point, in the heatmap panel."""
        x0, y0 = self.panels_xy[-1]
        tw, th = self.panel_px
        return (x0 + int(xy_l0[0] * tw / slide_dims[0]), y0 + int(xy_l0[1] * th / slide_dims[1]))


def heatmap_layout(thumb_w: int, thumb_h: int, *, side_by_side: bool = False) -> HeatmapLayout:
    """Layout for a thumbnail size; the dpi grows with the thumbnail so text keeps its relative size."""
    dpi = max(72, round(thumb_h / 7))
    left, gap, right, top, bottom, bar_w = (round(v * dpi / 100) for v in (20, 20, 90, 56, 20, 22))
    n = 2 if side_by_side else 1
    panels = tuple((left + i * (thumb_w + gap), top) for i in range(n))
    bar_x = panels[-1][0] + thumb_w + gap
    return HeatmapLayout(width=bar_x + bar_w + right, height=top + thumb_h + bottom, dpi=dpi,
                         panel_px=(thumb_w, thumb_h), panels_xy=panels,
                         colorbar_xywh=(bar_x, top, bar_w, thumb_h))


def heatmap_image(slide, coords_l0, size_l0, prediction, *, score=None, max_px: int = 1600,
                  alpha: float = 0.55, cmap: str = DEFAULT_CMAP, side_by_side: bool = False) -> np.ndarray:
    """The heatmap picture as (h, w, 3) uint8 RGB; geometry in ``heatmap_layout`` of the thumbnail size.

    Matplotlib (Agg, object-oriented, no pyplot) draws the title and the colour bar; the thumbnail and
    the heatmap are then pasted 1:1 into their panels (no resampling of the pictures).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    coords, size, pred, _ = check_tiles(coords_l0, size_l0, prediction)
    thumb = np.asarray(slide.get_thumbnail(max_px))[..., :3]
    th, tw = thumb.shape[:2]
    heat = overlay_rgb(thumb, slide.dimensions, coords, size, pred, alpha=alpha, cmap=cmap)
    lay = heatmap_layout(tw, th, side_by_side=side_by_side)
    fig = Figure(figsize=(lay.width / lay.dpi, lay.height / lay.dpi), dpi=lay.dpi)
    canvas = FigureCanvasAgg(fig)

    def frac(x, y, w, h):  # top-left pixel box -> matplotlib figure fraction (origin bottom-left)
        return (x / lay.width, 1 - (y + h) / lay.height, w / lay.width, h / lay.height)

    if side_by_side:
        for (x, y), label in zip(lay.panels_xy, ("H&E", "tile sTIL% over H&E")):
            ax = fig.add_axes(frac(x, y, tw, th))
            ax.set_axis_off()
            ax.set_title(label, fontsize=10)
    cax = fig.add_axes(frac(*lay.colorbar_xywh))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(vmin=0.0, vmax=100.0), cmap=cmap), cax=cax,
                       ticks=range(0, 101, 10))
    bar.set_label(STIL_LABEL)
    if score is not None and math.isfinite(score):
        cax.axhline(float(np.clip(score, 0, 100)), color="red", linewidth=2.5)
        score_text = f"slide sTIL% {score:.1f} (red line on the scale)"
    else:
        score_text = "slide sTIL% not given"
    fig.suptitle(f"{slide.slide_id} — {score_text}; {int(np.isfinite(pred).sum())} tiles",
                 x=lay.panels_xy[0][0] / lay.width, y=1 - 0.12 * lay.dpi / lay.height,
                 ha="left", va="top", fontsize=12)
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    for (x, y), panel in zip(lay.panels_xy, [thumb, heat] if side_by_side else [heat]):
        image[y:y + th, x:x + tw] = panel
    return image


def heatmap_png(slide, coords_l0, size_l0, prediction, path, *, score=None, max_px: int = 1600,
                alpha: float = 0.55, cmap: str = DEFAULT_CMAP, side_by_side: bool = False) -> Path:
    """Write heatmap.png: tiles over the thumbnail, fixed 0–100 colour bar, slide id and score on top."""
    from PIL import Image

    image = heatmap_image(slide, coords_l0, size_l0, prediction, score=score, max_px=max_px,
                          alpha=alpha, cmap=cmap, side_by_side=side_by_side)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=3)
    return path


# --- heatmap.tif ------------------------------------------------------------------------------
def overlay_raster(dims_l0, coords_l0, size_l0: float, prediction, *,
                   downsample: int = OVERLAY_DOWNSAMPLE, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The overlay's level 0: (ceil(H/d), ceil(W/d), 3) uint8; pixel (i, j) covers level-0 pixels
    [d*j, d*j+d) × [d*i, d*i+d). Predicted tiles in their heatmap colour (edges within d/2 level-0 px),
    white elsewhere.
    """
    width, height = (int(v) for v in dims_l0)
    d = int(downsample)
    shape = (-(-height // d), -(-width // d), 3)
    if d < 1 or shape[0] * shape[1] > _MAX_OVERLAY_PX:
        raise HeatmapInputError(
            f"overlay downsample {downsample!r} gives a {shape[1]}x{shape[0]} image "
            f"for a {width}x{height} slide",
            fix=f"use an integer downsample ≥ 1 that keeps the overlay under {_MAX_OVERLAY_PX:,} pixels "
            f"(the default is {OVERLAY_DOWNSAMPLE})",
        )
    coords, size, pred, _ = check_tiles(coords_l0, size_l0, prediction)
    raster = np.empty(shape, np.uint8)
    raster[:] = NO_PREDICTION_RGB
    has = np.isfinite(pred)
    return paint_tiles(raster, coords[has], size, stil_rgb(pred[has], cmap), downsample_xy=(d, d))


def overlay_level_sizes(width: int, height: int, *, downsample: int = 4, min_px: int = 512):
    """Level sizes as ``slidewriter.pyramid_levels`` makes them: ÷4 (rounded up) while the smaller side
    stays ≥ ``min_px``."""
    sizes = [(width, height)]
    while min(sizes[-1]) // downsample >= min_px:
        w, h = sizes[-1]
        sizes.append((-(-w // downsample), -(-h // downsample)))
    return sizes


def resample_nearest(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (h, w, c) ``image`` to ``size`` = (w, h), sampling pixel centres."""
    h, w = image.shape[:2]
    ix = np.minimum(((np.arange(size[0]) + 0.5) * (w / size[0])).astype(np.intp), w - 1)
    iy = np.minimum(((np.arange(size[1]) + 0.5) * (h / size[1])).astype(np.intp), h - 1)
    return image.take(iy, axis=0).take(ix, axis=1)


def heatmap_tiff(slide, coords_l0, size_l0, prediction, path, *, downsample: int = OVERLAY_DOWNSAMPLE,
                 cmap: str = DEFAULT_CMAP, tile_px: int = 256) -> Path:
    """Write the pyramidal TIFF overlay (Aperio-like, lossless deflate; see the module docstring).

    Level 0 is ``overlay_raster``: the slide's extent at ``downsample`` level-0 px per pixel, with
    mpp = slide mpp × downsample, so overlay (x, y) = slide level-0 (x, y) / downsample. The
    description also carries ``Downsample``, ``SlideWidth``/``SlideHeight`` and ``SlideID``.
    """
    import tifffile

    from weakstil.slidewriter import APERIO_HEADER

    width, height = (int(v) for v in slide.dimensions)
    level0 = overlay_raster((width, height), coords_l0, size_l0, prediction, downsample=downsample,
                            cmap=cmap)
    ow, oh = level0.shape[1], level0.shape[0]
    mpp = getattr(slide, "mpp", None)
    meta = f"|MPP = {mpp * downsample:.6g}" if mpp else ""
    meta += (f"|Overlay = sTIL% 0-100 {cmap}|Downsample = {downsample}|SlideWidth = {width}"
             f"|SlideHeight = {height}|SlideID = {str(slide.slide_id).replace('|', '_')}")
    res = {"resolution": (1e4 / (mpp * downsample),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
    scale = min(1.0, 768 / max(ow, oh))
    thumb = resample_nearest(level0, (max(1, round(ow * scale)), max(1, round(oh * scale))))
    common = {"photometric": "rgb", "metadata": None, "compression": "zlib", "predictor": True,
              "subfiletype": 0}
    head = f"{APERIO_HEADER}{ow}x{oh} [0,0 {ow}x{oh}] ({tile_px}x{tile_px})"
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
        tw.write(level0, tile=(tile_px, tile_px), description=f"{head} RGB{meta}", **res, **common)
        # page 1: the stripped thumbnail that Aperio readers expect before the reduced levels
        thumb_desc = f"{APERIO_HEADER}{ow}x{oh} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}"
        tw.write(thumb, description=thumb_desc, **common)
        for lw, lh in overlay_level_sizes(ow, oh)[1:]:
            tw.write(resample_nearest(level0, (lw, lh)), tile=(tile_px, tile_px),
                     description=f"{head} -> {lw}x{lh} RGB", **common)
    return path


# --- tiles.geojson ----------------------------------------------------------------------------
def tiles_feature_collection(coords_l0, size_l0, prediction, attention=None, *, slide_id: str,
                             cutoff: float = 30.0, contribution=None, cmap: str = DEFAULT_CMAP) -> dict:
    """QuPath (≥ 0.4) GeoJSON FeatureCollection of tile objects, level-0 px.

    Each feature: closed square ring; ``objectType: "tile"``; ``classification`` "sTIL high" (≥ cutoff)
    or "sTIL low" with a fixed class colour; ``color`` = the tile's own heatmap colour (QuPath draws an
    object in it); ``measurements`` as a name → number map (QuPath ≥ 0.4 writes and reads this form;
    the older list of {name, value} is only read for compatibility). Missing values are left out.
    """
    coords, size, pred, extra = check_tiles(coords_l0, size_l0, prediction,
                                            attention=attention, contribution=contribution)
    tile_rgb = stil_rgb(pred, cmap)
    class_rgb = {name: stil_rgb([value], cmap)[0].tolist() for name, value in (("sTIL high", 100.0),
                                                                                ("sTIL low", 0.0))}
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        x1, y1 = round(x + size, 2), round(y + size, 2)
        props: dict = {"objectType": "tile", "isLocked": True}
        measurements = {}
        if np.isfinite(pred[i]):
            name = "sTIL high" if pred[i] >= cutoff else "sTIL low"
            props["classification"] = {"name": name, "color": class_rgb[name]}
            props["color"] = tile_rgb[i].tolist()
            measurements["sTIL%"] = round(float(pred[i]), 4)
        for key, values in (("attention", extra["attention"]), ("contribution", extra["contribution"])):
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
        heatmap_png(slide, coords_l0, size_l0, prediction, paths["png"], score=score, cmap=cmap,
                    side_by_side=True)
    if "tif" in paths:
        heatmap_tiff(slide, coords_l0, size_l0, prediction, paths["tif"], cmap=cmap)
    if "geojson" in paths:
        tiles_geojson(paths["geojson"], coords_l0, size_l0, prediction, attention, slide_id=slide.slide_id,
                      cutoff=cutoff, contribution=contribution, cmap=cmap)
    if "top" in paths:
        top_tiles_png(slide, coords_l0, size_l0, prediction, paths["top"], attention=attention, cmap=cmap)
    return paths
