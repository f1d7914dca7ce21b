"""Deep Zoom (DZI) tiles of a slide and of its heatmap layers, rendered on request.

Geometry is Deep Zoom's, as OpenSeadragon and ``openslide.deepzoom`` compute it: level ``L`` of
``max_level + 1`` has the level-0 size divided by ``2 ** (max_level - L)`` (rounded up); each level
is cut into ``tile_size`` px tiles that overlap their neighbours by ``overlap`` px on every inner edge.
A Deep Zoom pixel ``(x, y)`` of level ``L`` covers level-0 pixels ``[x * ds, (x + 1) * ds)`` with
``ds = 2 ** (max_level - L)``: the downsample is exact, never rounded to a slide level's.

Slide tiles read the coarsest slide level that is at least as fine as ``ds`` through
``SlideHandle.read_region`` (any backend: OpenSlide, TiffSlide or a plain image) and resize the
block once. We do not use ``openslide.deepzoom.DeepZoomGenerator``: it needs an OpenSlide-like
object returning RGBA and ``openslide.*`` properties, which TiffSlide does not give (NOTES.md).

Overlay tiles are painted from ``tiles.csv``: each tile's square in its colour, transparent
elsewhere (RGBA PNG), at the Deep Zoom level's resolution, so they stay crisp at every zoom and line
up with the slide tiles pixel for pixel.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from weakstil.outputs.colors import paint_tiles
from weakstil.viewer.reduced import ReducedLevels, crop_resized

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80


@dataclass(frozen=True)
class DeepZoomGeometry:
    """Deep Zoom pyramid of a ``width`` × ``height`` level-0 image."""

    width: int
    height: int
    tile_size: int = TILE_SIZE
    overlap: int = OVERLAP

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height, 1))))

    def downsample(self, level: int) -> int:
        """Level-0 px per Deep Zoom px at ``level`` (a power of two)."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        ds = self.downsample(level)
        return max(1, -(-self.width // ds)), max(1, -(-self.height // ds))

    def tile_count(self, level: int) -> tuple[int, int]:
        lw, lh = self.level_size(level)
        return -(-lw // self.tile_size), -(-lh // self.tile_size)

    def has_tile(self, level: int, col: int, row: int) -> bool:
        if not 0 <= level <= self.max_level:
            return False
        cols, rows = self.tile_count(level)
        return 0 <= col < cols and 0 <= row < rows

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile in Deep Zoom level px (overlap included, clipped to the level)."""
        lw, lh = self.level_size(level)
        ts, ov = self.tile_size, self.overlap
        x0 = col * ts - (ov if col > 0 else 0)
        y0 = row * ts - (ov if row > 0 else 0)
        return x0, y0, min(lw, (col + 1) * ts + ov), min(lh, (row + 1) * ts + ov)

    def dzi_xml(self, fmt: str) -> str:
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">'
                f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def slide_tile(slide, geometry: DeepZoomGeometry, level: int, col: int, row: int,
               reduced: ReducedLevels | None = None) -> np.ndarray:
    """(h, w, 3) uint8 RGB of one Deep Zoom tile of ``slide`` (a SlideHandle).

    With ``reduced``, a tile that no slide level can give in one bounded read (a coarse view of a
    slide without a pyramid) is cut from a reduced copy of the slide instead (see ``reduced.py``).
    """
    x0, y0, x1, y1 = geometry.tile_box(level, col, row)
    ds = geometry.downsample(level)
    slide_level = slide.best_level_for_downsample(ds)
    level_ds = slide.level_downsamples[slide_level]
    x0_l0, y0_l0 = x0 * ds, y0 * ds
    # clip to the slide: the last tile's level px may reach past level-0's edge (ceil)
    x1_l0, y1_l0 = min(x1 * ds, geometry.width), min(y1 * ds, geometry.height)
    out_size = (x1 - x0, y1 - y0)
    found = reduced.for_downsample(slide, ds, geometry.tile_size + 2 * geometry.overlap) if reduced else None
    if found is not None:
        return crop_resized(*found, (x0_l0, y0_l0, x1_l0, y1_l0), out_size)
    read_w = max(1, math.ceil((x1_l0 - x0_l0) / level_ds))
    read_h = max(1, math.ceil((y1_l0 - y0_l0) / level_ds))
    block = slide.read_region((x0_l0, y0_l0), slide_level, (read_w, read_h))
    if (block.shape[1], block.shape[0]) != out_size:
        block = np.asarray(Image.fromarray(block).resize(out_size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return block


@dataclass(frozen=True)
class TileLayer:
    """Per-tile colours of one heatmap layer: tiles' level-0 boxes and their (N, 3) uint8 colours."""

    x: np.ndarray  # (N,) int64 level-0 left
    y: np.ndarray  # (N,) int64 level-0 top
    size: np.ndarray  # (N,) float64 level-0 edge
    rgb: np.ndarray  # (N, 3) uint8


def overlay_tile(layer: TileLayer, geometry: DeepZoomGeometry, level: int, col: int, row: int) -> np.ndarray:
    """(h, w, 4) uint8 RGBA: the layer's tiles painted over transparency for one Deep Zoom tile."""
    x0, y0, x1, y1 = geometry.tile_box(level, col, row)
    ds = geometry.downsample(level)
    h, w = y1 - y0, x1 - x0
    rgb = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), bool)
    x0_l0, y0_l0, x1_l0, y1_l0 = x0 * ds, y0 * ds, x1 * ds, y1 * ds
    hit = ((layer.x < x1_l0) & (layer.x + layer.size > x0_l0)
           & (layer.y < y1_l0) & (layer.y + layer.size > y0_l0))
    if hit.any():
        xy = np.stack([layer.x[hit] - x0_l0, layer.y[hit] - y0_l0], axis=1)
        sizes, colours = layer.size[hit], layer.rgb[hit]
        for size in np.unique(sizes):
            same = sizes == size
            paint_tiles(rgb, xy[same], float(size), colours[same], downsample_xy=(ds, ds), mask=mask)
    return np.dstack([rgb, mask.astype(np.uint8) * 255])


def encode(image: np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG bytes of an (h, w, 3|4) uint8 array."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image[..., :3]).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
