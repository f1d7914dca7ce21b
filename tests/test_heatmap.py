"""Review outputs: tiles.csv, heatmap.png, heatmap.tif, tiles.geojson, top_tiles.png.

Most tests use ``FakeSlide``, a procedural slide (the SlideHandle duck type) whose pixels are a
function of level-0 position: each 448-px grid cell has its own flat colour, so any tile read back
can be recognised. One integration test runs on a real Aperio-like file through ``open_slide``.
"""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from weakstil import heatmap as hm
from weakstil.errors import ConfigError, HeatmapInputError, WeakstilError

TILE = 448.0  # level-0 px: 112 µm at 0.25 µm/px


class FakeSlide:
    """Procedural slide: the colour of level-0 pixel (x, y) is ``cell_rgb(x // 448, y // 448)``."""

    def __init__(self, width=1792, height=1344, *, mpp=0.25, slide_id="fake", downsamples=(1.0, 4.0, 16.0)):
        self.dimensions = (width, height)
        self.mpp = mpp
        self.slide_id = slide_id
        self.level_downsamples = tuple(downsamples)
        self.level_dimensions = tuple((math.ceil(width / d), math.ceil(height / d)) for d in downsamples)
        self.reads: list[tuple[int, tuple[int, int]]] = []

    @staticmethod
    def cell_rgb(cx, cy):
        cx, cy = np.asarray(cx), np.asarray(cy)
        return np.stack(np.broadcast_arrays((60 + 40 * cx) % 256, (70 + 50 * cy) % 256, 150 + 0 * cx), -1)

    def _pixels(self, xs_l0, ys_l0):
        cx, cy = np.meshgrid(np.asarray(xs_l0) // int(TILE), np.asarray(ys_l0) // int(TILE))
        return self.cell_rgb(cx, cy).astype(np.uint8)

    def read_region(self, xy_l0, level, size):
        self.reads.append((level, tuple(size)))
        ds = self.level_downsamples[level]
        x_lv, y_lv = math.floor(xy_l0[0] / ds), math.floor(xy_l0[1] / ds)
        return self._pixels((x_lv + np.arange(size[0])) * ds, (y_lv + np.arange(size[1])) * ds)

    def get_thumbnail(self, max_px):
        width, height = self.dimensions
        ds = max(1.0, max(width, height) / max_px)
        tw, th = max(1, round(width / ds)), max(1, round(height / ds))
        return self._pixels((np.arange(tw) + 0.5) * width / tw, (np.arange(th) + 0.5) * height / th)


def grid(slide, size=TILE):
    """Top-left corners of the whole tiles of a regular grid over the slide, row-major."""
    width, height = slide.dimensions
    ys, xs = np.mgrid[0:height - size + 1:size, 0:width - size + 1:size]
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


@pytest.fixture
def slide():
    return FakeSlide()


@pytest.fixture
def tiles(slide):
    """12 tiles (4 × 3), a spread of predictions incl. one NaN, attention summing to 1."""
    coords = grid(slide)
    pred = np.array([95.0, 80, 65, 50, 35, 30, 29.9, 20, 10, 5, 0, np.nan])
    attention = np.arange(1, 13, dtype=float) / 78
    contribution = attention * np.nan_to_num(pred)
    return coords, pred, attention, contribution


def centre(xy, size=TILE):
    return (xy[0] + size / 2, xy[1] + size / 2)


def luminance(rgb):
    return 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]


# --- inputs and colour ------------------------------------------------------------------------
@pytest.mark.parametrize("coords, size, pred, words", [
    (np.zeros((3, 3)), TILE, [1, 2, 3], "shape (N, 2)"),
    (np.zeros((3, 2)), TILE, [1, 2], "2 values for 3 tiles"),
    (np.zeros((2, 2)), 0.0, [1, 2], "size_l0"),
    (np.zeros((2, 2)), TILE, [1, 150], "0-100"),
    (np.zeros((2, 2)), TILE, [-5, 50], "0-100"),
    (np.zeros((2, 2)), TILE, [np.inf, 50], "0-100"),
])
def test_bad_tile_arrays_are_typed_errors(coords, size, pred, words):
    with pytest.raises(HeatmapInputError, match=re.escape(words)) as info:
        hm.check_tiles(coords, size, pred)
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeakstilError)
    assert "0-100" in info.value.fix


def test_colour_scale_is_fixed_0_to_100():
    lut = hm.colormap_lut("viridis")
    assert np.array_equal(hm.stil_rgb([0, 50, 100]), lut[[0, 128, 255]])
    # the colour of a value does not depend on the other values (no min-max normalisation)
    assert np.array_equal(hm.stil_rgb([10, 20, 30])[1], hm.stil_rgb([20, 90])[0])
    assert tuple(hm.stil_rgb([np.nan])[0]) == hm.NO_PREDICTION_RGB
    assert luminance(hm.stil_rgb([90])[0]) > luminance(hm.stil_rgb([10])[0])  # viridis gets lighter
    with pytest.raises(ConfigError, match="colormap"):
        hm.colormap_lut("no-such-map")


@pytest.mark.parametrize("downsamples, target, level", [
    ((1, 4, 16), 0.5, 0), ((1, 4, 16), 2.0, 0), ((1, 4, 16), 4.0, 1), ((1, 4, 16), 3.99, 1),
    ((1, 4, 16), 100, 2), ((1, 3.9943, 15.9957), 4.0, 1), ((1, 3.9943, 15.9957), 16, 2),
])
def test_level_for_downsample(downsamples, target, level):
    assert hm.level_for_downsample(downsamples, target) == level


# --- tiles.csv --------------------------------------------------------------------------------
def test_tiles_csv_columns_and_units(tmp_path, tiles):
    coords, pred, attention, contribution = tiles
    size = 443.4  # non-integer tile edge: written rounded, in level-0 px
    path = hm.write_tiles_csv(tmp_path / "tiles.csv", coords, size, pred, attention, contribution)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["x", "y", "width", "height", "prediction", "attention", "contribution"]
    assert len(rows) == len(coords)
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords.tolist()]
    assert {(r["width"], r["height"]) for r in rows} == {("443", "443")}
    assert [float(r["prediction"]) for r in rows[:-1]] == pytest.approx(pred[:-1], abs=1e-4)
    assert rows[-1]["prediction"] == ""  # NaN: no prediction
    assert sum(float(r["attention"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
    assert float(rows[0]["contribution"]) == pytest.approx(contribution[0], rel=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.csv"]


# --- heatmap.png ------------------------------------------------------------------------------
def png_pixel(path, layout, xy_l0, slide):
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (layout.height, layout.width)
    x, y = layout.png_xy_from_l0(xy_l0, slide.dimensions)
    return image[y, x].astype(int)


@pytest.mark.parametrize("side_by_side", [False, True])
def test_png_colours_follow_the_fixed_scale(tmp_path, slide, tiles, side_by_side):
    coords, pred, _, _ = tiles
    alpha = 0.55
    path = hm.heatmap_png(slide, coords, TILE, pred, tmp_path / "heatmap.png", score=42.0, max_px=400,
                          alpha=alpha, side_by_side=side_by_side)
    thumb = slide.get_thumbnail(400)
    layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0], side_by_side=side_by_side)
    for i in (0, 10, 11):  # 95 %, 0 %, no prediction
        xy = centre(coords[i])
        got = png_pixel(path, layout, xy, slide)
        under = thumb[int(xy[1] * thumb.shape[0] / slide.dimensions[1]),
                      int(xy[0] * thumb.shape[1] / slide.dimensions[0])].astype(float)
        if np.isnan(pred[i]):
            assert np.array_equal(got, under)  # plain thumbnail where there is no prediction
        else:
            expected = (1 - alpha) * under + alpha * hm.stil_rgb([pred[i]])[0]
            assert np.abs(got - expected).max() <= 1
    # direction of the colormap: the 95 % tile is lighter than the 0 % tile, relative to the tissue
    # under each (the fake slide's cells differ in colour)
    high, low = (png_pixel(path, layout, centre(coords[i]), slide) for i in (0, 10))
    assert luminance(high) - luminance(slide.read_region(coords[0], 0, (1, 1))[0, 0]) > \
        luminance(low) - luminance(slide.read_region(coords[10], 0, (1, 1))[0, 0])


def test_png_same_value_same_colour_on_slides_with_different_ranges(tmp_path):
    colours = []
    # the 35 % tile sits on the same grid cell (same tissue colour) in both slides
    for name, values in (("narrow", [5, 35, 10, 40]), ("wide", [100, 35, 60, 80])):
        slide = FakeSlide(896, 896, slide_id=name)
        coords = grid(slide)
        path = hm.heatmap_png(slide, coords, TILE, values, tmp_path / f"{name}.png", score=50.0, max_px=300)
        thumb = slide.get_thumbnail(300)
        layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0])
        colours.append(png_pixel(path, layout, centre(coords[values.index(35)]), slide))
    assert np.array_equal(colours[0], colours[1])


def test_png_title_and_legend_present(tmp_path, slide, tiles):
    coords, pred, _, _ = tiles
    image = hm.heatmap_image(slide, coords, TILE, pred, score=42.0, max_px=300)
    thumb = slide.get_thumbnail(300)
    layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0])
    bx, by, bw, bh = layout.colorbar_xywh
    # the bar runs from the colour of 0 (bottom) to the colour of 100 (top), linearly
    for value in (5, 30, 50, 95):
        pixel = image[round(by + (1 - value / 100) * bh), bx + bw // 2].astype(int)
        assert np.abs(pixel - hm.stil_rgb([value])[0]).max() <= 4, value
    title_band = image[: layout.panels_xy[0][1]]
    assert (title_band < 128).any()  # some dark title text above the panels


# --- heatmap.tif ------------------------------------------------------------------------------
@pytest.fixture
def overlay_path(tmp_path, slide, tiles):
    coords, pred, _, _ = tiles
    return hm.heatmap_tiff(slide, coords, TILE, pred, tmp_path / "heatmap.tif")


def test_tiff_opens_in_openslide_with_the_slide_geometry(overlay_path, slide, tiles):
    openslide = pytest.importorskip("openslide")
    coords, pred, _, _ = tiles
    d = hm.OVERLAY_DOWNSAMPLE
    width, height = slide.dimensions
    with openslide.OpenSlide(str(overlay_path)) as osr:
        ow, oh = osr.dimensions
        assert (ow, oh) == (math.ceil(width / d), math.ceil(height / d))
        assert abs(ow / oh - width / height) < 1 / oh
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(slide.mpp * d)
        assert osr.properties["aperio.Downsample"] == str(d)
        assert osr.properties["aperio.SlideWidth"] == str(width)
        for i in range(len(coords)):
            x, y = centre(coords[i])
            rgba = np.asarray(osr.read_region((int(x / d), int(y / d)), 0, (1, 1)))[0, 0]
            assert tuple(rgba[:3]) == tuple(hm.stil_rgb([pred[i]])[0]), i  # lossless: exact colour


def test_tiff_opens_in_tiffslide_with_the_same_pixels(overlay_path, slide, tiles):
    tiffslide = pytest.importorskip("tiffslide")
    coords, pred, _, _ = tiles
    d = hm.OVERLAY_DOWNSAMPLE
    with tiffslide.TiffSlide(overlay_path) as ts:
        assert ts.dimensions == tuple(math.ceil(v / d) for v in slide.dimensions)
        assert ts.properties["tiffslide.mpp-x"] == pytest.approx(slide.mpp * d)
        x, y = centre(coords[0])
        assert tuple(np.asarray(ts.read_region((int(x / d), int(y / d)), 0, (1, 1)))[0, 0, :3]) == \
            tuple(hm.stil_rgb([pred[0]])[0])


def test_tiff_pyramid_on_a_large_slide(tmp_path):
    openslide = pytest.importorskip("openslide")
    slide = FakeSlide(60_000, 40_000)  # geometry only: the overlay never reads slide pixels
    coords = np.array([[0, 0], [30_000, 20_000], [59_000, 39_000]])
    pred = [100.0, 50.0, 0.0]
    path = hm.heatmap_tiff(slide, coords, 1000.0, pred, tmp_path / "big.tif")
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.level_dimensions == ((3750, 2500), (938, 625))
        for (x, y), value in zip(coords, pred):
            for level in (0, 1):
                ds = osr.level_downsamples[level] * hm.OVERLAY_DOWNSAMPLE
                rgba = np.asarray(osr.read_region((int((x + 500) / 16), int((y + 500) / 16)), level, (1, 1)))
                assert tuple(rgba[0, 0, :3]) == tuple(hm.stil_rgb([value])[0]), (level, ds)
        assert tuple(np.asarray(osr.read_region((1000, 100), 0, (1, 1)))[0, 0, :3]) == hm.NO_PREDICTION_RGB
    assert path.stat().st_size < 200_000


def test_tiff_refuses_an_overlay_too_large(tmp_path, slide):
    with pytest.raises(HeatmapInputError, match="downsample"):
        hm.overlay_raster((200_000, 200_000), np.zeros((1, 2)), TILE, [1.0], downsample=1)


# --- tiles.geojson ----------------------------------------------------------------------------
def test_geojson_is_a_qupath_feature_collection(tmp_path, tiles):
    coords, pred, attention, contribution = tiles
    path = hm.tiles_geojson(tmp_path / "tiles.geojson", coords, TILE, pred, attention, slide_id="s1",
                            contribution=contribution)

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(path.read_text(), parse_constant=no_nan)
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == len(coords)
    for (x, y), feature, value, att in zip(coords.tolist(), features, pred, attention):
        assert feature["type"] == "Feature"
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert ring[:4] == [[x, y], [x + TILE, y], [x + TILE, y + TILE], [x, y + TILE]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["attention"] == pytest.approx(att)
        if np.isnan(value):
            assert "sTIL%" not in props["measurements"] and "classification" not in props
            continue
        assert props["measurements"]["sTIL%"] == pytest.approx(value)
        assert props["classification"]["name"] == ("sTIL high" if value >= 30 else "sTIL low")
        assert len(props["classification"]["color"]) == 3
        assert props["color"] == hm.stil_rgb([value])[0].tolist()
    assert len({f["id"] for f in features}) == len(features)


def test_geojson_cutoff_is_a_parameter(tmp_path, tiles):
    coords, pred, attention, _ = tiles
    collection = hm.tiles_feature_collection(coords, TILE, pred, attention, slide_id="s1", cutoff=50)
    names = [f["properties"].get("classification", {}).get("name") for f in collection["features"]]
    assert names[:5] == ["sTIL high", "sTIL high", "sTIL high", "sTIL high", "sTIL low"]


# --- top_tiles.png ----------------------------------------------------------------------------
def test_top_tiles_grid(tmp_path, slide, tiles):
    coords, pred, attention, _ = tiles
    path = hm.top_tiles_png(slide, coords, TILE, pred, tmp_path / "top.png", k=3, attention=attention)
    tile_px = hm.review_tile_px(TILE, slide.mpp)
    assert tile_px == 224  # 112 µm at 0.5 µm/px
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == hm.top_tiles_size(3, tile_px)[::-1]
    # read at level 0 (downsample 2 wanted; levels are 1, 4, 16) as 448 px, resized to 224
    assert {read for read in slide.reads} == {(0, (448, 448))}
    # first cell of the top row: the 95 % tile; first cell of the bottom row: the 0 % tile
    x0 = hm._PAD + tile_px // 2
    for row, i in ((0, 0), (1, 10)):
        y0 = hm._HEAD + row * (tile_px + hm._LABEL + hm._PAD) + hm._LABEL + tile_px // 2
        cx, cy = np.asarray(coords[i]) // int(TILE)
        assert np.abs(image[y0, x0].astype(int) - FakeSlide.cell_rgb(cx, cy)).max() <= 2


def test_top_tiles_with_few_tiles_and_none(tmp_path, slide):
    coords = grid(slide)[:3]
    path = hm.top_tiles_png(slide, coords, TILE, [10.0, 20.0, np.nan], tmp_path / "top.png", k=8)
    assert Image.open(path).size == hm.top_tiles_size(8, 224)
    with pytest.raises(HeatmapInputError, match="no tile has a prediction"):
        hm.top_tiles_png(slide, coords, TILE, [np.nan] * 3, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# --- one slide, all formats; atomic writes ----------------------------------------------------
def test_write_slide_outputs_writes_the_results_layout(tmp_path, slide, tiles):
    coords, pred, attention, contribution = tiles
    out = hm.slide_results_dir(tmp_path / "results", slide.slide_id)
    paths = hm.write_slide_outputs(slide, out, coords_l0=coords, size_l0=TILE, prediction=pred,
                                   attention=attention, contribution=contribution, score=41.5)
    assert out == tmp_path / "results" / "slides" / "fake"
    assert {k: p.name for k, p in paths.items()} == {
        "csv": "tiles.csv", "png": "heatmap.png", "tif": "heatmap.tif", "geojson": "tiles.geojson",
        "top": "top_tiles.png"}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())
    only = hm.write_slide_outputs(slide, tmp_path / "two", coords_l0=coords, size_l0=TILE, prediction=pred,
                                  attention=attention, contribution=contribution, score=41.5,
                                  formats=("csv", "geojson"))
    assert sorted(only) == ["csv", "geojson"]
    with pytest.raises(ConfigError, match="pdf"):
        hm.write_slide_outputs(slide, tmp_path / "x", coords_l0=coords, size_l0=TILE, prediction=pred,
                               attention=attention, contribution=contribution, score=1.0, formats=("pdf",))


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "tiles.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with hm.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.csv"]


def test_bad_input_writes_nothing(tmp_path, slide):
    with pytest.raises(HeatmapInputError):
        hm.write_slide_outputs(slide, tmp_path / "out", coords_l0=np.zeros((2, 2)), size_l0=TILE,
                               prediction=[0.5, 120.0], attention=[0.5, 0.5], contribution=[0, 0], score=50)
    assert not (tmp_path / "out").exists()


# --- a real slide file through open_slide -----------------------------------------------------
def test_real_slide_end_to_end(tmp_path, tiny_slide):
    slide_mod = pytest.importorskip("weakstil.slide")
    openslide = pytest.importorskip("openslide")
    with slide_mod.open_slide(tiny_slide) as slide:  # 1500 × 1200 at 0.25 µm/px
        coords = grid(slide, 224.0)
        rng = np.random.default_rng(0)
        pred = rng.uniform(0, 100, len(coords))
        attention = np.full(len(coords), 1 / len(coords))
        paths = hm.write_slide_outputs(slide, tmp_path / "tiny", coords_l0=coords, size_l0=224.0,
                                       prediction=pred, attention=attention, contribution=attention * pred,
                                       score=float((attention * pred).sum()))
        dims = slide.dimensions
    with openslide.OpenSlide(str(paths["tif"])) as osr:
        assert osr.dimensions == (94, 75)  # ceil(1500 / 16), ceil(1200 / 16)
        x, y = centre(coords[7], 224.0)
        got = np.asarray(osr.read_region((int(x / 16), int(y / 16)), 0, (1, 1)))[0, 0, :3]
        assert tuple(got) == tuple(hm.stil_rgb([pred[7]])[0])
    assert Image.open(paths["top"]).size == hm.top_tiles_size(8, 112)  # 56 µm tiles at 0.5 µm/px
    png = Image.open(paths["png"])
    assert png.size[0] > png.size[1] and dims == (1500, 1200)
    assert len(json.loads(paths["geojson"].read_text())["features"]) == len(coords)
