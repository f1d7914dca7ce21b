"""Tile grids at a physical resolution, and the tissue filter (geometry is pure; plan_tiles reads).

A :class:`TileSpec` says ``tile_px`` pixels at ``mpp`` µm/px. On a slide of ``slide_mpp`` a tile
covers ``tile_px * mpp / slide_mpp`` level-0 pixels: a float (kept as one; only corners are int).
Grids start at (0, 0), run row by row, and never reach past the slide: every tile satisfies
``x + ceil(size_l0) <= width``, so a reader taking ``ceil(size_l0)`` pixels stays inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from weakstil.errors import ConfigError, NoTissueError
from weakstil.wsi.tissue import (
    RoiPolygon,
    TissueParams,
    load_roi,
    roi_mask,
    tissue_mask,
)

STAIN_METHODS = ("macenko", "none")  # weakstil.embed.stain implements them

TILING_VERSION = 1  # bump when the grid or the tissue filter changes meaning (part of the fingerprint)
STAIN_VERSION = 3  # bump when weakstil.embed.stain's estimate changes (2: pen ink and folds left out;
# 3: green/blue ink left out by hue too)


@dataclass(frozen=True)
class TileSpec:
    """``tile_px`` pixels at ``mpp`` µm/px; ``overlap`` px (at ``mpp``) shared by neighbours; tiles
    are kept when at least ``min_tissue`` of their area is tissue. ``stain``: how tile colours are
    normalised before the encoder ('macenko', the default: each slide's stains mapped onto a
    reference H&E, see :mod:`weakstil.embed.stain`; or 'none')."""

    tile_px: int = 224
    mpp: float = 0.5
    overlap: int = 0
    min_tissue: float = 0.5
    stain: str = "macenko"

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.tile_px, (int, np.integer)) and self.tile_px > 0):
            problems.append(f"tile_px must be a positive integer (got {self.tile_px!r})")
        if not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp) and self.mpp > 0):
            problems.append(f"mpp must be > 0 µm per pixel (got {self.mpp!r})")
        if not (isinstance(self.overlap, (int, np.integer)) and 0 <= self.overlap < self.tile_px):
            problems.append(f"overlap must be an integer in 0..tile_px-1 (got {self.overlap!r})")
        if not (isinstance(self.min_tissue, (int, float)) and 0 <= self.min_tissue <= 1):
            problems.append(f"min_tissue must be a fraction in 0..1 (got {self.min_tissue!r})")
        if self.stain not in STAIN_METHODS:
            problems.append(f"stain must be 'none' or 'macenko' (got {self.stain!r})")
        if problems:
            raise ConfigError("bad tiling: " + "; ".join(problems),
                              fix="e.g. --tile-px 224 --tile-mpp 0.5 --overlap 0 --min-tissue 0.5 --stain-norm macenko")

    def size_l0(self, slide_mpp: float) -> float:
        """Edge of one tile in level-0 pixels on a slide of ``slide_mpp`` µm/px (a float)."""
        return self.tile_px * self.mpp / float(slide_mpp)

    def stride_l0(self, slide_mpp: float) -> float:
        """Distance between neighbouring tiles in level-0 pixels."""
        return (self.tile_px - self.overlap) * self.mpp / float(slide_mpp)

    def fingerprint(self, tissue: TissueParams) -> dict:
        """What decides which tiles exist and what they show (the cache key's tiling part)."""
        fp = {
            "tile_px": int(self.tile_px),
            "mpp": float(self.mpp),
            "overlap": int(self.overlap),
            "min_tissue": float(self.min_tissue),
            "tissue": tissue.as_dict(),
            "tiling_version": TILING_VERSION,
        }
        if self.stain != "none":  # absent when off: caches made before the option keep their key
            fp["stain"] = self.stain
            fp["stain_version"] = STAIN_VERSION  # absent (1) in caches made before artefact-free estimates
        return fp


@dataclass
class TileGrid:
    """The tiles of one slide and the mask they were chosen with.

    ``coords_l0`` (N, 2) int32 top-left (x, y); ``size_l0`` tile edge in level-0 px;
    ``tissue_fraction`` (N,) float32; ``mask`` bool (h, w) on the thumbnail grid;
    ``mask_downsample`` level-0 px per mask px (mean of x and y; ``mask_downsample_xy`` has both);
    ``thumb`` the RGB thumbnail the mask was made from; ``roi`` the ROI mask, if any.
    """

    coords_l0: np.ndarray
    size_l0: float
    tissue_fraction: np.ndarray
    mask: np.ndarray
    mask_downsample: float
    thumb: np.ndarray
    mask_downsample_xy: tuple[float, float] = (1.0, 1.0)
    roi: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.coords_l0)


# --- pure geometry ----------------------------------------------------------------------------
def grid_starts(length_l0: int, size_l0: float, stride_l0: float) -> np.ndarray:
    """Start positions ``floor(k * stride)`` along one axis with ``start + ceil(size) <= length``."""
    if not (size_l0 > 0 and stride_l0 > 0):
        raise ValueError(f"size and stride must be > 0, got {size_l0}, {stride_l0}")
    span = math.ceil(size_l0 - 1e-9)
    if length_l0 < span:
        return np.zeros(0, dtype=np.int64)
    count = int((length_l0 - span) / stride_l0 + 1e-9) + 1
    starts = np.floor(np.arange(count + 1) * stride_l0 + 1e-9).astype(np.int64)
    return starts[starts + span <= length_l0]


def tile_grid(dims_l0: tuple[int, int], size_l0: float, stride_l0: float) -> np.ndarray:
    """(N, 2) int32 top-left (x, y) of every tile inside a ``dims_l0`` = (width, height) slide,
    row by row (y outer, x inner)."""
    xs = grid_starts(int(dims_l0[0]), size_l0, stride_l0)
    ys = grid_starts(int(dims_l0[1]), size_l0, stride_l0)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int32)


def _pair(value: float | Sequence[float]) -> tuple[float, float]:
    if np.isscalar(value):
        return float(value), float(value)
    x, y = value
    return float(x), float(y)


def tissue_fraction(coords_l0: np.ndarray, size_l0: float, mask: np.ndarray,
                    mask_downsample: float | tuple[float, float]) -> np.ndarray:
    """Fraction (N,) float32 of each tile's area covered by ``mask``.

    The mask pixel (i, j) covers level-0 [j*ds_x, (j+1)*ds_x) × [i*ds_y, (i+1)*ds_y); partial pixels
    count by area (bilinear lookup in an integral image, exact for a piecewise-constant mask). Area
    outside the mask counts as no tissue. ``mask_downsample`` may be one number or (x, y).
    """
    ds_x, ds_y = _pair(mask_downsample)
    coords = np.asarray(coords_l0, dtype=np.float64).reshape(-1, 2)
    mask = np.asarray(mask, dtype=bool)
    if coords.size == 0:
        return np.zeros(0, dtype=np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    x0, y0 = coords[:, 0] / ds_x, coords[:, 1] / ds_y
    x1, y1 = (coords[:, 0] + size_l0) / ds_x, (coords[:, 1] + size_l0) / ds_y
    covered = (_lookup(integral, x1, y1) - _lookup(integral, x0, y1)
               - _lookup(integral, x1, y0) + _lookup(integral, x0, y0))
    area = (size_l0 / ds_x) * (size_l0 / ds_y)
    return np.clip(covered / area, 0.0, 1.0).astype(np.float32)


def _lookup(integral: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of an integral image at continuous (x, y), clamped to its extent."""
    height, width = integral.shape[0] - 1, integral.shape[1] - 1
    x = np.clip(x, 0, width)
    y = np.clip(y, 0, height)
    j = np.minimum(np.floor(x).astype(np.int64), max(width - 1, 0))
    i = np.minimum(np.floor(y).astype(np.int64), max(height - 1, 0))
    fx, fy = x - j, y - i
    j1, i1 = np.minimum(j + 1, width), np.minimum(i + 1, height)
    return ((1 - fx) * (1 - fy) * integral[i, j] + fx * (1 - fy) * integral[i, j1]
            + (1 - fx) * fy * integral[i1, j] + fx * fy * integral[i1, j1])


def downsample_xy(dims_l0: tuple[int, int], shape: tuple[int, ...]) -> tuple[float, float]:
    """Level-0 px per pixel, (x, y), of an image of ``shape`` (h, w, ...) covering the whole slide."""
    return dims_l0[0] / shape[1], dims_l0[1] / shape[0]


# --- reading a slide --------------------------------------------------------------------------
def tissue_thumbnail(slide, tissue: TissueParams = TissueParams()) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide's thumbnail at about ``tissue.thumb_mpp`` µm/px (longer side ≤ ``thumb_max_px``) and
    its (x, y) downsample from level 0."""
    width, height = slide.dimensions
    target_ds = max(tissue.thumb_mpp / slide.mpp, max(width, height) / tissue.thumb_max_px, 1.0)
    thumb = slide.get_thumbnail(max(1, math.ceil(max(width, height) / target_ds)))
    return thumb, downsample_xy((width, height), thumb.shape)


def plan_tiles(slide, spec: TileSpec, *, tissue: TissueParams = TissueParams(),
               roi: str | Path | Sequence[RoiPolygon] | None = None) -> TileGrid:
    """Tissue mask (∩ ROI) → grid at ``spec`` → tiles with tissue fraction ≥ ``spec.min_tissue``.

    ``roi``: a QuPath GeoJSON path or polygons from :func:`weakstil.wsi.tissue.load_roi`.
    Raises NoTissueError when no tile is kept; the error's ``grid`` attribute holds the (empty)
    grid with its mask and thumbnail, for a QC picture.
    """
    thumb, ds_xy = tissue_thumbnail(slide, tissue)
    mpp_thumb = slide.mpp * (ds_xy[0] + ds_xy[1]) / 2.0
    mask = tissue_mask(thumb, mpp_thumb=mpp_thumb, params=tissue)
    roi_grid = None
    if roi is not None:
        polygons = load_roi(roi) if isinstance(roi, (str, Path)) else list(roi)
        roi_grid = roi_mask(polygons, mask.shape, ds_xy)
        mask = mask & roi_grid
    size_l0 = spec.size_l0(slide.mpp)
    coords = tile_grid(slide.dimensions, size_l0, spec.stride_l0(slide.mpp))
    fraction = tissue_fraction(coords, size_l0, mask, ds_xy)
    keep = fraction >= spec.min_tissue
    grid = TileGrid(coords_l0=coords[keep].astype(np.int32), size_l0=size_l0, tissue_fraction=fraction[keep],
                    mask=mask, mask_downsample=(ds_xy[0] + ds_xy[1]) / 2.0, thumb=thumb,
                    mask_downsample_xy=ds_xy, roi=roi_grid)
    if len(grid) == 0:
        err = NoTissueError(
            f"no tile has ≥ {spec.min_tissue:.0%} tissue ({len(coords)} grid tiles of {size_l0:.1f} px, "
            f"tissue covers {mask.mean():.1%} of the thumbnail{', within the ROI' if roi is not None else ''})",
            path=getattr(slide, "path", None))
        err.grid = grid
        raise err
    return grid
