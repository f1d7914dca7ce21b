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
``contribution``. Every file is written to a temp name (:func:`weakstil.fs.atomic_path`) and renamed into place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakstil.errors import ConfigError
from weakstil.fs import atomic_path
from weakstil.outputs.colors import (
    DEFAULT_CMAP,
    blend_tiles,
    check_tiles,
    layer_scale,
)
from weakstil.outputs.geojson import (
    tiles_geojson,
)
from weakstil.outputs.overlay import (
    heatmap_tiff,
)
from weakstil.outputs.tiles import (
    top_tiles_png,
    write_tiles_csv,
)

PNG_MAX_PX = 1024  # heatmap.png: the thumbnail (one panel) fits in this square
FILENAMES = {
    "csv": "tiles.csv",
    "png": "heatmap.png",
    "tif": "heatmap.tif",
    "geojson": "tiles.geojson",
    "top": "top_tiles.png",
}


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


# --- everything for one slide -----------------------------------------------------------------
def slide_results_dir(results_dir: str | Path, slide_id: str) -> Path:
    """``results/slides/<slide_id>``: where ``write_slide_outputs`` is meant to write (DESIGN.md)."""
    return Path(results_dir) / "slides" / slide_id


def write_slide_outputs(slide, out_dir, *, coords_l0, size_l0, prediction, attention, contribution,
                        score, formats=("csv", "png", "tif", "geojson", "top"),
                        cmap: str = DEFAULT_CMAP, cutoff: float = 30.0, stroma=None) -> dict[str, Path]:
    """Write the per-slide review files into ``out_dir`` (the slide's own folder); return {format: path}.

    ``stroma`` (N,), the estimated stroma fraction per tile (:func:`weakstil.embed.encoders.stroma_estimate`),
    goes into tiles.csv and keeps tiles with little stroma out of top_tiles.png."""
    unknown = sorted(set(formats) - set(FILENAMES))
    if unknown:
        raise ConfigError(f"unknown output format(s) {unknown}", fix=f"choose from {sorted(FILENAMES)}")
    check_tiles(coords_l0, size_l0, prediction, attention=attention, contribution=contribution)
    out_dir = Path(out_dir)
    from weakstil.confine import check_write_target

    check_write_target(out_dir)  # never through a link that leads out of the results folder (#13)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out_dir / FILENAMES[fmt] for fmt in FILENAMES if fmt in formats}
    if "csv" in paths:
        write_tiles_csv(paths["csv"], coords_l0, size_l0, prediction, attention, contribution, stroma)
    if "png" in paths:
        heatmap_png(slide, coords_l0, size_l0, prediction, paths["png"], attention=attention,
                    contribution=contribution, score=score, cmap=cmap)
    if "tif" in paths:
        heatmap_tiff(slide, coords_l0, size_l0, prediction, paths["tif"], cmap=cmap)
    if "geojson" in paths:
        tiles_geojson(paths["geojson"], coords_l0, size_l0, prediction, attention, slide_id=slide.slide_id,
                      cutoff=cutoff, contribution=contribution, cmap=cmap)
    if "top" in paths:
        top_tiles_png(slide, coords_l0, size_l0, prediction, paths["top"], attention=attention, stroma=stroma,
                      cmap=cmap)
    return paths
