"""Tissue detection on a thumbnail, ROI polygons, and the QC picture (pure functions on arrays).

The mask is Otsu on HSV saturation (clamped between a floor, so a blank slide has no tissue, and a
ceiling, so faint stroma survives on slides that are nearly all tissue), then closing, opening,
removal of small objects and filling of small holes. Every size is in µm or µm² and converted with
the thumbnail's µm per pixel, so the result does not depend on the thumbnail's scale.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from weakstil.errors import ConfigError, RoiError

QC_TISSUE_RGB = (0, 170, 0)
QC_ROI_RGB = (0, 90, 255)
QC_TILE_RGB = (255, 190, 0)  # amber: the tile grid
QC_HALO_RGB = (20, 20, 20)  # a dark line either side of an outline, so it shows on pink and on white
QC_MIN_PX = 512  # small thumbnails are enlarged (nearest) to at least this for the QC picture


@dataclass(frozen=True)
class TissueParams:
    """How tissue is found; part of the tiling fingerprint (see :meth:`as_dict`)."""

    thumb_mpp: float = 8.0  # µm per thumbnail pixel the mask is computed at ...
    thumb_max_px: int = 4096  # ... unless that makes the thumbnail's longer side exceed this
    smooth_um: float = 16.0  # median filter width on saturation (0: none)
    saturation_floor: float = 0.05  # the threshold never goes below this (0-1 saturation) ...
    saturation_ceiling: float = 0.15  # ... nor above this
    value_floor: float = 0.1  # pixels darker than this (0-1, max channel) are not tissue (black borders)
    closing_um: float = 16.0  # radius
    opening_um: float = 16.0  # radius
    min_object_um2: float = 10_000.0  # tissue pieces smaller than this are dropped
    max_hole_um2: float = 10_000.0  # holes smaller than this are filled

    def __post_init__(self) -> None:
        bad = [f.name for f in dataclasses.fields(self) if not _finite_nonneg(getattr(self, f.name))]
        if bad:
            raise ConfigError(f"tissue parameters must be finite and ≥ 0: {', '.join(bad)}")
        if self.thumb_mpp <= 0 or self.thumb_max_px < 16:
            raise ConfigError("thumb_mpp must be > 0 and thumb_max_px ≥ 16")
        if not 0 <= self.saturation_floor <= self.saturation_ceiling <= 1 or self.value_floor > 1:
            raise ConfigError("need 0 ≤ saturation_floor ≤ saturation_ceiling ≤ 1 and value_floor ≤ 1")

    def as_dict(self) -> dict[str, float]:
        """Plain dict of the parameters (JSON-able; used in the tiling fingerprint)."""
        return {k: (int(v) if isinstance(v, int) else float(v)) for k, v in dataclasses.asdict(self).items()}


def _finite_nonneg(value: Any) -> bool:
    return isinstance(value, (int, float)) and np.isfinite(value) and value >= 0


# --- the mask ---------------------------------------------------------------------------------
def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (both float32 in 0-1) of an (h, w, 3) uint8 image."""
    rgb = np.asarray(rgb)
    high = rgb.max(axis=2).astype(np.float32)
    low = rgb.min(axis=2).astype(np.float32)
    sat = np.where(high > 0, (high - low) / np.maximum(high, 1), 0).astype(np.float32)
    return sat, high / 255.0


PEN_HUES = (75.0, 235.0)  # degrees: green to blue, no stain of H&E; pen marks and marker ink
PEN_MIN_SATURATION = 0.3


def pen_marks(rgb: np.ndarray, sat: np.ndarray | None = None) -> np.ndarray:
    """Pixels of strongly coloured green or blue ink (marker pens on the glass), not H&E.

    Hematoxylin is purple (hue ~260-300°) and eosin pink (~320-360°); even a very blue hematoxylin
    stays above PEN_HUES' upper end, and faded ink is not saturated enough to count.
    """
    rgb = np.asarray(rgb, np.float32)
    if sat is None:
        sat = saturation_value(rgb.astype(np.uint8))[0]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0
    return (sat > PEN_MIN_SATURATION) & (hue >= PEN_HUES[0]) & (hue <= PEN_HUES[1])


def saturation_threshold(sat: np.ndarray, params: TissueParams) -> float:
    """Otsu's threshold on saturation, clamped to [saturation_floor, saturation_ceiling]."""
    from skimage.filters import threshold_otsu

    if sat.size == 0 or float(np.ptp(sat)) < 1e-6:
        return params.saturation_floor
    return float(np.clip(threshold_otsu(sat), params.saturation_floor, params.saturation_ceiling))


def tissue_mask(thumb_rgb: np.ndarray, *, mpp_thumb: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean tissue mask, same height and width as ``thumb_rgb`` ((h, w, 3) uint8)."""
    thumb_rgb = np.asarray(thumb_rgb)
    if thumb_rgb.ndim != 3 or thumb_rgb.shape[2] < 3:
        raise ValueError(f"expected an (h, w, 3) RGB image, got shape {thumb_rgb.shape}")
    if not mpp_thumb > 0:
        raise ValueError(f"mpp_thumb must be > 0, got {mpp_thumb}")
    sat, value = saturation_value(thumb_rgb[..., :3])
    pen = pen_marks(thumb_rgb[..., :3], sat)
    smooth_px = _odd(params.smooth_um / mpp_thumb)
    if smooth_px >= 3:
        sat = ndimage.median_filter(sat, size=smooth_px, mode="nearest")
        pen = ndimage.binary_dilation(pen, iterations=smooth_px // 2) if pen.any() else pen
    # ink is neither tissue nor background: left out of the threshold (a saturated pen mark would
    # otherwise pull Otsu above faint tissue) and out of the mask
    threshold = saturation_threshold(sat[~pen], params) if pen.any() else saturation_threshold(sat, params)
    mask = (sat > threshold) & (value >= params.value_floor) & ~pen
    mask = _close_open(mask, round(params.closing_um / mpp_thumb), round(params.opening_um / mpp_thumb))
    px_area_um2 = mpp_thumb * mpp_thumb
    mask = remove_small_objects(mask, params.min_object_um2 / px_area_um2)
    return fill_small_holes(mask, params.max_hole_um2 / px_area_um2)


def _odd(width: float) -> int:
    n = int(round(width))
    return n if n % 2 else n + 1 if n > 0 else 0


def disk(radius: int) -> np.ndarray:
    """Boolean disk footprint of the given radius in pixels."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _close_open(mask: np.ndarray, close_px: int, open_px: int) -> np.ndarray:
    """Closing then opening with disks; padded by edge values so tissue at the border is not eroded."""
    pad = max(close_px, 0) + max(open_px, 0)  # the closing's erosion eats close_px of the padding
    if pad == 0:
        return mask
    work = np.pad(mask, pad, mode="edge")
    if close_px > 0:
        work = ndimage.binary_closing(work, structure=disk(close_px))
    if open_px > 0:
        work = ndimage.binary_opening(work, structure=disk(open_px))
    return work[pad:-pad, pad:-pad]


def remove_small_objects(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected foreground components with fewer than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill 4-connected background components smaller than ``max_px`` that do not touch the border."""
    if max_px <= 0 or mask.all():
        return mask.copy()
    labels, n = ndimage.label(~mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


# --- ROI --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RoiPolygon:
    """One polygon in level-0 px: an exterior ring (N, 2) of (x, y) and its holes."""

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


def load_roi(path: str | Path) -> list[RoiPolygon]:
    """Polygons of a QuPath GeoJSON export (FeatureCollection, list of features, Feature or geometry).

    Polygon and MultiPolygon geometries (also inside GeometryCollections) are kept, holes included;
    points and lines are ignored. Coordinates are level-0 pixels. Bad input raises RoiError.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RoiError("the ROI file does not exist", path=path) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RoiError(f"the ROI file is not valid JSON ({exc})", path=path) from exc
    polygons: list[RoiPolygon] = []
    skipped: list[str] = []
    for i, feature in enumerate(_features(data, path)):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        try:
            polygons += _polygons(geometry, skipped)
        except (TypeError, ValueError, KeyError) as exc:
            raise RoiError(f"feature {i}: bad geometry ({exc})", path=path) from exc
    if not polygons:
        found = f" (found only: {', '.join(sorted(set(skipped)))})" if skipped else ""
        raise RoiError(f"no Polygon or MultiPolygon in the ROI file{found}", path=path)
    return polygons


def _features(data: Any, path: Path) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        kind = data.get("type")
        if kind == "FeatureCollection" and isinstance(data.get("features"), list):
            return data["features"]
        if kind == "Feature":
            return [data]
        if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"geometry": data}]
    raise RoiError("expected a GeoJSON FeatureCollection, Feature, geometry or list of features", path=path)


def _polygons(geometry: Any, skipped: list[str]) -> list[RoiPolygon]:
    if not isinstance(geometry, dict):
        skipped.append("feature without geometry")
        return []
    kind = geometry.get("type")
    if kind == "Polygon":
        return [_polygon(geometry["coordinates"])]
    if kind == "MultiPolygon":
        return [_polygon(rings) for rings in geometry["coordinates"]]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _polygons(g, skipped)]
    skipped.append(str(kind))
    return []


def _polygon(rings: Sequence) -> RoiPolygon:
    if not isinstance(rings, list) or not rings:
        raise ValueError("a polygon needs at least an exterior ring")
    arrays = []
    for ring in rings:
        arr = np.asarray(ring, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3:
            raise ValueError(f"a ring needs ≥ 3 points of (x, y), got shape {arr.shape}")
        if not np.isfinite(arr[:, :2]).all():
            raise ValueError("ring coordinates must be finite numbers")
        arrays.append(arr[:, :2])
    return RoiPolygon(exterior=arrays[0], holes=tuple(arrays[1:]))


def roi_mask(polygons: Sequence[RoiPolygon], shape: tuple[int, int],
             downsample: float | tuple[float, float]) -> np.ndarray:
    """Rasterise level-0 polygons onto a (h, w) grid of ``downsample`` level-0 px per pixel.

    A pixel is inside when its centre is; holes are cut from their own polygon only, then all
    polygons are united. ``downsample`` may be one number or (x, y).
    """
    from skimage.draw import polygon as draw_polygon

    ds_x, ds_y = (downsample, downsample) if np.isscalar(downsample) else downsample
    height, width = int(shape[0]), int(shape[1])
    out = np.zeros((height, width), dtype=bool)

    def pixels(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return draw_polygon(ring[:, 1] / ds_y - 0.5, ring[:, 0] / ds_x - 0.5, shape=(height, width))

    for poly in polygons:
        rr, cc = pixels(poly.exterior)
        if rr.size == 0:
            continue
        if not poly.holes:
            out[rr, cc] = True
            continue
        r0, c0 = rr.min(), cc.min()
        local = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), dtype=bool)
        local[rr - r0, cc - c0] = True
        for hole in poly.holes:
            hr, hc = pixels(hole)
            inside = (hr >= r0) & (hr < r0 + local.shape[0]) & (hc >= c0) & (hc < c0 + local.shape[1])
            local[hr[inside] - r0, hc[inside] - c0] = False
        out[r0 : r0 + local.shape[0], c0 : c0 + local.shape[1]] |= local
    return out


# --- QC picture -------------------------------------------------------------------------------
def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` on its boundary (the image edge counts as boundary), ``width`` px thick."""
    mask = np.asarray(mask, dtype=bool)
    inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=width, border_value=0)
    return mask & ~inner


def mask_qc_image(thumb: np.ndarray, mask: np.ndarray, roi: np.ndarray | None = None, *,
                  tiles_thumb: np.ndarray | None = None) -> np.ndarray:
    """(h, w, 3) uint8: the thumbnail, non-tissue dimmed, the tissue outline green with a dark halo
    (visible on pink tissue and on white glass alike), the ROI outline blue, and the tile grid in
    amber when ``tiles_thumb`` (N, 4: x0, y0, x1, y1 in thumbnail pixels) is given.

    Thumbnails whose longer side is under QC_MIN_PX are enlarged (nearest) so outlines stay visible.
    """
    from PIL import Image, ImageDraw

    thumb = np.asarray(thumb)[..., :3]
    if thumb.shape[:2] != np.shape(mask) or (roi is not None and np.shape(roi) != np.shape(mask)):
        raise ValueError(f"thumbnail {thumb.shape[:2]}, mask {np.shape(mask)} and ROI must have the same size")
    scale = qc_scale(thumb.shape[:2])
    grow = (lambda a: np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)) if scale > 1 else (lambda a: a)
    image, mask = grow(thumb).astype(np.float32), grow(np.asarray(mask, bool))
    image[~mask] = image[~mask] * 0.6 + 255 * 0.4
    if tiles_thumb is not None and len(tiles_thumb):
        canvas = Image.fromarray(image.astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for x0, y0, x1, y1 in np.asarray(tiles_thumb, dtype=np.float64) * scale:
            draw.rectangle((round(x0), round(y0), round(x1) - 1, round(y1) - 1), outline=QC_TILE_RGB)
        image = np.asarray(canvas).astype(np.float32)
    width = max(2, max(mask.shape) // 400)
    for region, rgb in ((mask, QC_TISSUE_RGB), (None if roi is None else grow(np.asarray(roi, bool)), QC_ROI_RGB)):
        if region is None:
            continue
        edge = outline(region, width)
        image[ndimage.binary_dilation(edge, iterations=1) & ~edge] = QC_HALO_RGB
        image[edge] = rgb
    return image.astype(np.uint8)


def qc_scale(shape: Sequence[int]) -> int:
    """The whole-number enlargement of a thumbnail of ``shape`` in the QC picture."""
    return max(1, -(-QC_MIN_PX // max(1, max(shape[:2]))))


def _nice_length_um(um_per_px: float, target_px: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) close to ``target_px`` pixels."""
    raw = um_per_px * target_px
    base = 10 ** np.floor(np.log10(raw))
    return float(max((m * base for m in (1, 2, 5, 10) if m * base <= raw), default=base))


def _qc_font(size: int):
    """DejaVu Sans from matplotlib (it has µ and ×), else Pillow's default font."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def qc_annotate(image: np.ndarray, *, slide_id: str, um_per_px: float | None = None, n_tiles: int | None = None,
                tissue_fraction: float | None = None, has_roi: bool = False) -> np.ndarray:
    """The QC picture with a header (slide id, tissue %, tiles; a legend of the lines) and a scale bar."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    size = max(13, min(22, w // 45))
    font, small = _qc_font(size), _qc_font(size - 2)
    band = int(size * 3.4)
    out = Image.new("RGB", (w, h + band), "white")
    out.paste(Image.fromarray(image), (0, band))
    draw = ImageDraw.Draw(out)
    facts = [slide_id]
    if tissue_fraction is not None:
        facts.append(f"tissue {tissue_fraction:.0%}")
    if n_tiles is not None:
        facts.append(f"{n_tiles:,} tiles")
    draw.text((8, 4), "  ·  ".join(facts), fill=(0, 0, 0), font=font)
    x, y = 8, 4 + int(size * 1.6)
    legend = [(QC_TISSUE_RGB, "tissue outline"), ((200, 200, 200), "dimmed: not tissue")]
    if n_tiles is not None:
        legend.insert(1, (QC_TILE_RGB, "tiles kept"))
    if has_roi:
        legend.insert(1, (QC_ROI_RGB, "ROI"))
    for rgb, text in legend:
        draw.rectangle((x, y + 2, x + size, y + size - 2), fill=rgb, outline=QC_HALO_RGB)
        draw.text((x + size + 5, y), text, fill=(40, 40, 40), font=small)
        x += size + 5 + int(draw.textlength(text, font=small)) + 18
    if um_per_px:
        length_um = _nice_length_um(um_per_px, w / 5)
        bar_px = int(round(length_um / um_per_px))
        label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
        x0, y0 = 10, h + band - 14
        draw.rectangle((x0 - 4, y0 - size - 8, x0 + max(bar_px, int(draw.textlength(label, font=small))) + 4, y0 + 8),
                       fill=(255, 255, 255))
        draw.rectangle((x0, y0, x0 + bar_px, y0 + 4), fill=(0, 0, 0))
        draw.text((x0, y0 - size - 4), label, fill=(0, 0, 0), font=small)
    return np.asarray(out)


def save_mask_qc(thumb: np.ndarray, mask: np.ndarray, path: str | Path, roi: np.ndarray | None = None, *,
                 slide_id: str | None = None, mpp_thumb: float | None = None, grid: Any = None) -> Path:
    """Write the QC picture (:func:`mask_qc_image` + :func:`qc_annotate`) as a PNG, written to a
    temporary name and renamed into place.

    ``slide_id`` defaults to the file name's stem; ``mpp_thumb`` (µm per thumbnail pixel) adds a
    scale bar; ``grid`` (a :class:`weakstil.wsi.tiling.TileGrid`) adds the tile grid and the count.
    """
    from PIL import Image

    from weakstil.fs import atomic_path

    path = Path(path)
    tiles_thumb = None
    if grid is not None:
        ds_x, ds_y = grid.mask_downsample_xy
        xy = np.asarray(grid.coords_l0, dtype=np.float64).reshape(-1, 2)
        tiles_thumb = np.column_stack([xy[:, 0] / ds_x, xy[:, 1] / ds_y, (xy[:, 0] + grid.size_l0) / ds_x,
                                       (xy[:, 1] + grid.size_l0) / ds_y])
    image = mask_qc_image(thumb, mask, roi, tiles_thumb=tiles_thumb)
    scale = qc_scale(np.shape(mask))
    image = qc_annotate(image, slide_id=slide_id or path.stem, um_per_px=mpp_thumb / scale if mpp_thumb else None,
                        n_tiles=None if grid is None else len(tiles_thumb),
                        tissue_fraction=float(np.mean(mask)) if np.size(mask) else None, has_roi=roi is not None)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path
