"""Fixed colour scales of the review outputs and painting tiles onto pictures.

Scales are FIXED, never stretched to a slide's own range, so a colour means the same on every slide
(:mod:`weakstil.outputs.heatmap` says what each layer shows and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from weakstil.errors import ConfigError, HeatmapInputError

DEFAULT_CMAP = "viridis"


NO_PREDICTION_RGB = (255, 255, 255)


STIL_LABEL = "sTIL% (0–100)"


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
    "attention": LayerScale("attention", "attention", "attention × N (1× = uniform 1/N)", "magma",
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
