"""Tissue mask, ROI loading and rasterising, the QC picture (all on arrays, no slides needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_MPP, TINY_SIZE, tissue_ellipse_mask, tissue_like_image
from PIL import Image

from weakstil.errors import ConfigError, RoiError
from weakstil.wsi.tissue import (
    QC_ROI_RGB,
    QC_TISSUE_RGB,
    RoiPolygon,
    TissueParams,
    fill_small_holes,
    load_roi,
    mask_qc_image,
    pen_marks,
    remove_small_objects,
    roi_mask,
    saturation_threshold,
    save_mask_qc,
    tissue_mask,
)

WHITE = (246, 246, 246)
PINK = (232, 150, 190)


def thumbnail_of(image: np.ndarray, downsample: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(w / downsample), round(h / downsample)),
                                                    Image.Resampling.LANCZOS))


def canvas(shape=(100, 100), colour=WHITE) -> np.ndarray:
    return np.full((*shape, 3), colour, dtype=np.uint8)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max(1, (a | b).sum())


# --- params -------------------------------------------------------------------------------------
def test_params_are_frozen_and_fingerprintable():
    params = TissueParams()
    with pytest.raises(AttributeError):
        params.thumb_mpp = 1.0
    assert json.loads(json.dumps(params.as_dict())) == params.as_dict()
    assert TissueParams(min_object_um2=5.0).as_dict() != params.as_dict()
    assert TissueParams().as_dict() == params.as_dict()


@pytest.mark.parametrize("kwargs", [
    {"thumb_mpp": 0}, {"min_object_um2": -1}, {"smooth_um": float("nan")},
    {"saturation_floor": 0.3, "saturation_ceiling": 0.2}, {"saturation_ceiling": 1.5}, {"thumb_max_px": 4},
])
def test_bad_params(kwargs):
    with pytest.raises(ConfigError):
        TissueParams(**kwargs)


# --- the mask -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp_thumb", [2.0, 4.0, 8.0, 16.0])
def test_mask_matches_the_tissue_at_any_scale(mpp_thumb):
    thumb = thumbnail_of(tissue_like_image(*TINY_SIZE), mpp_thumb / TINY_MPP)
    mask = tissue_mask(thumb, mpp_thumb=mpp_thumb)
    assert mask.dtype == bool and mask.shape == thumb.shape[:2]
    assert iou(mask, tissue_ellipse_mask(thumb.shape[1], thumb.shape[0])) > 0.95


@pytest.mark.parametrize("noise", [0, 3, 8])
def test_blank_slide_has_no_tissue(noise):
    rng = np.random.default_rng(0)
    image = canvas((80, 120)).astype(int) + rng.integers(-noise, noise + 1, size=(80, 120, 3))
    assert not tissue_mask(np.clip(image, 0, 255).astype(np.uint8), mpp_thumb=8.0).any()


def test_black_border_is_not_tissue():
    image = canvas((100, 100))
    image[:, :20] = (3, 0, 1)  # scanner padding: near black, high HSV saturation
    image[30:70, 40:90] = PINK
    mask = tissue_mask(image, mpp_thumb=8.0)
    assert not mask[:, :20].any() and mask[40:60, 50:80].all()


def test_faint_stroma_survives_on_a_full_slide():
    """Nearly all tissue: Otsu would split light from dark stain; the ceiling keeps the light."""
    image = canvas((100, 100), (230, 185, 210))  # light stroma, saturation 0.20
    image[:, 50:] = (110, 60, 150)  # dense purple
    assert tissue_mask(image, mpp_thumb=8.0).mean() > 0.98


def test_faded_tissue_beside_a_pen_mark_is_found_and_the_ink_left_out():
    """A saturated blue pen stroke pulled Otsu above faded tissue (cells-hard CEL-005: 0 % tissue)."""
    image = canvas((120, 160), WHITE)
    image[20:100, 10:100] = (236, 222, 232)  # faded pink tissue, saturation ~0.06
    image[30:50, 120:155] = (40, 90, 200)  # blue marker ink
    mask = tissue_mask(image, mpp_thumb=8.0)
    assert mask[30:90, 20:90].mean() > 0.95
    assert not mask[30:50, 120:155].any() and not mask[:, 105:].any()
    assert pen_marks(image)[30:50, 120:155].all() and not pen_marks(image)[20:100, 10:100].any()


@pytest.mark.parametrize("rgb", [(110, 60, 150), (232, 150, 190), (70, 60, 160), (150, 60, 110)])
def test_h_and_e_colours_are_never_ink(rgb):
    """Hematoxylin (also a very blue one), eosin and their mixes are not pen marks."""
    assert not pen_marks(canvas((4, 4), rgb)).any()


def test_small_specks_dropped_and_small_holes_filled():
    image = canvas((100, 100))
    image[10:60, 10:60] = PINK  # 50×50 px × 64 µm² = 160,000 µm²
    image[30:34, 30:34] = WHITE  # 16 px hole = 1,024 µm²: filled
    image[80:83, 80:83] = PINK  # 9 px speck = 576 µm²: dropped
    mask = tissue_mask(image, mpp_thumb=8.0)
    assert mask[12:58, 12:58].all()
    assert not mask[75:90, 75:90].any()


def test_large_hole_is_kept():
    image = canvas((120, 120))
    image[10:110, 10:110] = PINK
    image[30:90, 30:90] = WHITE  # 3,600 px × 64 µm² = 230,400 µm² > max_hole
    mask = tissue_mask(image, mpp_thumb=8.0)
    assert not mask[40:80, 40:80].any() and mask[12:25, 12:108].all()


def test_tissue_touching_the_border_is_not_eroded():
    image = canvas((60, 60))
    image[:, :30] = PINK
    mask = tissue_mask(image, mpp_thumb=8.0)
    assert mask[:, :28].all() and not mask[:, 33:].any()


@pytest.mark.parametrize("sat, expected", [
    (np.zeros((10, 10)), 0.05),  # constant: the floor
    (np.r_[np.linspace(0.2, 0.4, 50), np.linspace(0.6, 0.8, 50)].reshape(10, 10), 0.15),  # Otsu ~0.5
    (np.r_[np.zeros(50), np.full(50, 0.08)].reshape(10, 10), None),  # Otsu between 0.05 and 0.15
])
def test_saturation_threshold_is_clamped(sat, expected):
    threshold = saturation_threshold(sat.astype(np.float32), TissueParams())
    if expected is None:
        assert 0.05 <= threshold <= 0.15
    else:
        assert threshold == pytest.approx(expected)


@pytest.mark.parametrize("min_px, kept", [(0, 2), (4, 2), (5, 1), (10, 1), (11, 0)])
def test_remove_small_objects(min_px, kept):
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True  # 4 px
    mask[5:7, 5:10] = True  # 10 px
    from scipy import ndimage

    assert ndimage.label(remove_small_objects(mask, min_px))[1] == kept


def test_fill_small_holes_ignores_border_background():
    mask = np.ones((10, 10), bool)
    mask[4:6, 4:6] = False  # 4-px hole
    mask[0, :] = False  # background touching the border: not a hole
    out = fill_small_holes(mask, 5)
    assert out[4:6, 4:6].all() and not out[0].any()
    assert not fill_small_holes(mask, 4)[4:6, 4:6].any()


@pytest.mark.parametrize("bad", [np.zeros((10, 10)), np.zeros((10, 10, 1), np.uint8)])
def test_mask_rejects_non_rgb(bad):
    with pytest.raises(ValueError):
        tissue_mask(bad, mpp_thumb=8.0)


# --- ROI ----------------------------------------------------------------------------------------
SQUARE = [[40, 40], [80, 40], [80, 80], [40, 80], [40, 40]]
HOLE = [[50, 50], [70, 50], [70, 70], [50, 70], [50, 50]]
FAR = [[0, 0], [8, 0], [8, 8], [0, 8], [0, 0]]


def feature(geometry: dict, **props) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation", **props}}


@pytest.mark.parametrize("document", [
    {"type": "FeatureCollection", "features": [feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]})]},
    [feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]})],
    feature({"type": "Polygon", "coordinates": [SQUARE, HOLE]}),
    {"type": "Polygon", "coordinates": [SQUARE, HOLE]},
    [feature({"type": "Point", "coordinates": [1, 2]}),
     feature({"type": "GeometryCollection", "geometries": [{"type": "Polygon", "coordinates": [SQUARE, HOLE]}]})],
])
def test_load_roi_shapes(tmp_path, document):
    path = tmp_path / "roi.geojson"
    path.write_text(json.dumps(document))
    polygons = load_roi(path)
    assert len(polygons) == 1
    np.testing.assert_array_equal(polygons[0].exterior, np.asarray(SQUARE, float))
    assert len(polygons[0].holes) == 1


def test_load_roi_multipolygon_with_z(tmp_path):
    path = tmp_path / "roi.geojson"
    rings = [[[x, y, 0] for x, y in SQUARE]], [FAR]
    path.write_text(json.dumps(feature({"type": "MultiPolygon", "coordinates": list(rings)})))
    polygons = load_roi(path)
    assert len(polygons) == 2 and polygons[0].exterior.shape == (5, 2)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"type": "Topology"}), "expected a GeoJSON"),
    (json.dumps([feature({"type": "Point", "coordinates": [1, 2]})]), "only: Point"),
    (json.dumps([feature({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]})]), "feature 0"),
    (json.dumps([feature({"type": "Polygon", "coordinates": [[[0, 0], ["a", 1], [2, 2]]]})]), "feature 0"),
    (json.dumps([feature({"type": "Polygon", "coordinates": []})]), "feature 0"),
    (json.dumps([feature({"type": "Polygon"})]), "feature 0"),
])
def test_load_roi_errors(tmp_path, text, needle):
    path = tmp_path / "roi.geojson"
    path.write_text(text)
    with pytest.raises(RoiError, match=needle) as info:
        load_roi(path)
    assert isinstance(info.value, ValueError) and "QuPath" in str(info.value)


def test_load_roi_missing(tmp_path):
    with pytest.raises(RoiError, match="does not exist"):
        load_roi(tmp_path / "none.geojson")


def ring(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


@pytest.mark.parametrize("downsample", [1.0, 4.0, 10.0])
def test_roi_mask_square(downsample):
    """A pixel is inside when its centre is: level-0 [40, 80) covers pixels 40/ds-0.5 .. 80/ds-0.5."""
    mask = roi_mask([RoiPolygon(ring(40, 40, 80, 80))], (100, 100), downsample)
    centres = (np.arange(100) + 0.5) * downsample
    inside = (centres >= 40) & (centres <= 80)
    np.testing.assert_array_equal(mask[0, :], np.zeros(100, bool))
    np.testing.assert_array_equal(mask.any(axis=0), inside)


def test_roi_mask_hole_cuts_only_its_own_polygon():
    outer = RoiPolygon(ring(0, 0, 40, 40), holes=(ring(10, 10, 30, 30),))
    other = RoiPolygon(ring(15, 15, 25, 25))
    only_outer = roi_mask([outer], (40, 40), 1.0)
    assert only_outer[5, 5] and not only_outer[20, 20]
    assert roi_mask([outer, other], (40, 40), 1.0)[20, 20]


def test_roi_mask_per_axis_downsample_and_clipping():
    mask = roi_mask([RoiPolygon(ring(-100, 0, 40, 20))], (10, 10), (4.0, 2.0))
    assert mask[:, :10].any() and mask[:10, :10].sum() == 10 * 10
    assert roi_mask([RoiPolygon(ring(500, 500, 600, 600))], (10, 10), 1.0).sum() == 0


# --- QC picture ---------------------------------------------------------------------------------
def test_save_mask_qc(tmp_path):
    thumb = thumbnail_of(tissue_like_image(*TINY_SIZE), 16)
    mask = tissue_mask(thumb, mpp_thumb=16 * TINY_MPP)
    roi = np.zeros_like(mask)
    roi[5:40, 5:50] = True
    path = save_mask_qc(thumb, mask, tmp_path / "qc" / "tiny.png", roi=roi)
    picture = np.asarray(Image.open(path))
    assert max(picture.shape[:2]) >= 512  # small thumbnails are enlarged
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert QC_TISSUE_RGB in colours and QC_ROI_RGB in colours
    assert [p.name for p in path.parent.iterdir()] == ["tiny.png"]


def test_mask_qc_image_size_mismatch():
    with pytest.raises(ValueError):
        mask_qc_image(canvas((10, 10)), np.zeros((10, 11), bool))


def test_qc_picture_has_header_tile_grid_halo_and_a_true_scale_bar(tmp_path):
    from types import SimpleNamespace

    from weakstil.wsi.tissue import QC_HALO_RGB, QC_TILE_RGB, qc_scale

    thumb = thumbnail_of(tissue_like_image(*TINY_SIZE), 16)
    mask = tissue_mask(thumb, mpp_thumb=16 * TINY_MPP)
    grid = SimpleNamespace(coords_l0=np.array([[400, 400], [624, 400]]), size_l0=224.0,
                           mask_downsample_xy=(16.0, 16.0))
    mpp_thumb = 16 * TINY_MPP  # 4 µm per thumbnail pixel
    path = save_mask_qc(thumb, mask, tmp_path / "tiny.png", slide_id="tiny", mpp_thumb=mpp_thumb, grid=grid)
    picture = np.asarray(Image.open(path))
    plain = np.asarray(Image.open(save_mask_qc(thumb, mask, tmp_path / "plain.png")))
    scale = qc_scale(thumb.shape)
    assert picture.shape[0] > scale * thumb.shape[0]  # a header band above the picture
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert {QC_TISSUE_RGB, QC_HALO_RGB, QC_TILE_RGB} <= colours
    assert QC_TILE_RGB not in {tuple(c) for c in plain.reshape(-1, 3)}  # no grid without one
    # the scale bar: the longest run of black pixels in a bottom row, as long as its label says
    um_per_px = mpp_thumb / scale
    bottom = (picture[-14:, :, :] == 0).all(axis=2)
    run = max(int(row.sum()) for row in bottom)
    length_um = run * um_per_px
    assert any(abs(length_um - v) <= 2 * um_per_px for v in (50, 100, 200, 500)), length_um


@pytest.mark.parametrize("um_per_px, target_px, expected", [(1.0, 100, 100), (2.0, 100, 200), (0.7, 100, 50),
                                                             (13.0, 120, 1000), (0.05, 100, 5)])
def test_nice_scale_bar_lengths(um_per_px, target_px, expected):
    from weakstil.wsi.tissue import _nice_length_um

    assert _nice_length_um(um_per_px, target_px) == pytest.approx(expected)
