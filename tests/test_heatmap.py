"""Review outputs: tiles.csv, heatmap.png, heatmap.tif, tiles.geojson, top_tiles.png.

Most tests use ``FakeSlide``, a procedural slide (the SlideHandle duck type) whose pixels are a
function of level-0 position: each 448-px grid cell has its own flat colour, so any tile read back
can be recognised. One integration test runs on a real Aperio-like file through ``open_slide``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakstil import fs
from weakstil.errors import ConfigError, HeatmapInputError, WeakstilError
from weakstil.outputs import colors, geojson, overlay
from weakstil.outputs import heatmap as hm
from weakstil.outputs import tiles as tiles_mod

TILE = 448.0  # level-0 px: 112 µm at 0.25 µm/px


class FakeSlide:
    """Procedural slide: the colour of level-0 pixel (x, y) is ``cell_rgb(x // 448, y // 448)``."""

    def __init__(self, width=2000, height=1500, *, mpp=0.25, slide_id="fake", downsamples=(1.0, 4.0, 16.0)):
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
    """12 tiles (4 × 3, leaving a margin without tiles), a spread of predictions incl. one NaN,
    attention summing to 1."""
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
        colors.check_tiles(coords, size, pred)
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeakstilError)
    assert "0-100" in info.value.fix


def test_colour_scale_is_fixed_0_to_100():
    lut = colors.colormap_lut("viridis")
    assert np.array_equal(colors.stil_rgb([0, 50, 100]), lut[[0, 128, 255]])
    # the colour of a value does not depend on the other values (no min-max normalisation)
    assert np.array_equal(colors.stil_rgb([10, 20, 30])[1], colors.stil_rgb([20, 90])[0])
    assert tuple(colors.stil_rgb([np.nan])[0]) == colors.NO_PREDICTION_RGB
    assert luminance(colors.stil_rgb([90])[0]) > luminance(colors.stil_rgb([10])[0])  # viridis gets lighter
    with pytest.raises(ConfigError, match="colormap"):
        colors.colormap_lut("no-such-map")


@pytest.mark.parametrize("downsamples, target, level", [
    ((1, 4, 16), 0.5, 0), ((1, 4, 16), 2.0, 0), ((1, 4, 16), 4.0, 1), ((1, 4, 16), 3.99, 1),
    ((1, 4, 16), 100, 2), ((1, 3.9943, 15.9957), 4.0, 1), ((1, 3.9943, 15.9957), 16, 2),
])
def test_level_for_downsample(downsamples, target, level):
    assert tiles_mod.level_for_downsample(downsamples, target) == level


# --- tiles.csv --------------------------------------------------------------------------------
def test_tiles_csv_columns_and_units(tmp_path, tiles):
    coords, pred, attention, contribution = tiles
    size = 443.4  # non-integer tile edge: written rounded, in level-0 px
    path = tiles_mod.write_tiles_csv(tmp_path / "tiles.csv", coords, size, pred, attention, contribution)
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
def read_png(path, layout):
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == (layout.height, layout.width)
    return image


def png_pixel(image, layout, xy_l0, slide, panel="prediction"):
    x, y = layout.png_xy_from_l0(xy_l0, slide.dimensions, panel)
    return image[y, x].astype(int)


def thumb_pixel(thumb, slide, xy_l0):
    return thumb[int(xy_l0[1] * thumb.shape[0] / slide.dimensions[1]),
                 int(xy_l0[0] * thumb.shape[1] / slide.dimensions[0])].astype(float)


OUTSIDE = (1900.0, 1400.0)  # a level-0 point of the fake slide outside every tile of the grid


@pytest.mark.parametrize("with_attention", [False, True])
def test_png_layers_follow_their_fixed_scales(tmp_path, slide, tiles, with_attention):
    coords, pred, attention, contribution = tiles
    alpha = 0.6
    extra = {"attention": attention, "contribution": contribution} if with_attention else {}
    path = hm.heatmap_png(slide, coords, TILE, pred, tmp_path / "heatmap.png", score=42.0, max_px=400,
                          alpha=alpha, **extra)
    thumb = slide.get_thumbnail(400)
    panels = ("he", "prediction", *extra)
    layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0], panels)
    image = read_png(path, layout)
    n = len(coords)
    for i in (0, 5, 10, 11):  # 95 %, 30 %, 0 %, no prediction
        xy = centre(coords[i])
        under = thumb_pixel(thumb, slide, xy)
        assert np.array_equal(png_pixel(image, layout, xy, slide, "he"), under)  # the H&E panel: plain
        got = png_pixel(image, layout, xy, slide)
        if np.isnan(pred[i]):
            assert np.array_equal(got, under)  # plain thumbnail where there is no prediction
        else:
            expected = (1 - alpha) * under + alpha * colors.stil_rgb([pred[i]])[0]
            assert np.abs(got - expected).max() <= 1, i
        for name in extra:
            expected = (1 - alpha) * under + alpha * colors.LAYERS[name].rgb(extra[name], n)[i]
            assert np.abs(png_pixel(image, layout, xy, slide, name) - expected).max() <= 1, (name, i)
    # background (no tile) is left clear in every panel: the thumbnail shows through uncoloured
    for panel in panels:
        assert np.array_equal(png_pixel(image, layout, OUTSIDE, slide, panel), thumb_pixel(thumb, slide, OUTSIDE))
    # direction of the colormap: the 95 % tile is lighter than the 0 % tile, relative to the tissue
    # under each (the fake slide's cells differ in colour)
    high, low = (png_pixel(image, layout, centre(coords[i]), slide) for i in (0, 10))
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
        layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0], ("he", "prediction"))
        colours.append(png_pixel(read_png(path, layout), layout, centre(coords[values.index(35)]), slide))
    assert np.array_equal(colours[0], colours[1])


def test_attention_and_contribution_scales_are_relative_to_uniform():
    att, con = colors.LAYERS["attention"], colors.LAYERS["contribution"]
    # uniform attention is 1× (the middle of the log scale) whatever the number of tiles
    for n in (3, 12, 25_000):
        assert att.shown(np.full(n, 1 / n)) == pytest.approx(np.ones(n))
        assert np.array_equal(att.rgb(np.full(n, 1 / n))[0], att.rgb([1 / 3] * 3)[0])
    assert att.position([1.0, 4.0, 0.25, 16.0, 1e4, 0.0, np.nan]) == pytest.approx(
        [0.5, 0.75, 0.25, 1.0, 1.0, 0.0, np.nan], nan_ok=True)
    # N × contribution is in sTIL% points: with uniform attention it is the tile's sTIL%
    pred = np.array([1.0, 10.0, 100.0, 0.0])
    shown = con.shown(pred / 4)
    assert shown == pytest.approx(pred)
    assert con.position(shown) == pytest.approx([0.0, 1 / 3, 2 / 3, 0.0])
    assert tuple(att.rgb([np.nan, 0.5, 0.5])[0]) == colors.NO_PREDICTION_RGB
    # the same relative attention has the same colour on a slide with other values
    assert np.array_equal(att.rgb([0.1, 0.2, 0.7])[1], att.rgb([0.2, 0.2, 0.3, 0.3], 3)[0])
    with pytest.raises(ConfigError, match="layer"):
        colors.layer_scale("nope")


def test_png_title_and_legends_present(slide, tiles):
    coords, pred, attention, contribution = tiles
    image = hm.heatmap_image(slide, coords, TILE, pred, attention=attention, contribution=contribution,
                             score=42.0, max_px=300)
    thumb = slide.get_thumbnail(300)
    layout = hm.heatmap_layout(thumb.shape[1], thumb.shape[0])
    assert image.shape[:2] == (layout.height, layout.width)
    bx, by, bw, bh = layout.colorbar_xywh
    # the sTIL% bar runs from the colour of 0 (bottom) to the colour of 100 (top), linearly
    for value in (5, 30, 50, 95):
        pixel = image[round(by + (1 - value / 100) * bh), bx + bw // 2].astype(int)
        assert np.abs(pixel - colors.stil_rgb([value])[0]).max() <= 4, value
    # the score is a red line across the sTIL% bar at 42
    line = image[round(by + (1 - 42 / 100) * bh), bx + bw // 2].astype(int)
    assert line[0] > 200 and line[1] < 60 and line[2] < 60
    # attention and contribution bars: 1× (uniform) and 10^1.5 points sit in the middle (log scales)
    for panel, middle in (("attention", 1.0), ("contribution", 10 ** 1.5)):
        x, y, w, h = layout.colorbars_xywh[layout.panels.index(panel)]
        scale = colors.LAYERS[panel]
        pixel = image[y + h // 2, x + w // 2].astype(int)
        assert np.abs(pixel - scale.rgb([middle], 1)[0]).max() <= 6, panel
    assert layout.colorbars_xywh[layout.panels.index("he")] is None
    assert (image[: layout.title_h] < 128).any()  # dark title text above the panels


def test_png_layout_one_row_for_two_panels_or_a_portrait_slide():
    two = hm.heatmap_layout(400, 300, ("he", "prediction"))
    assert two.panels_xy[0][1] == two.panels_xy[1][1] and two.width > 2 * 400
    four = hm.heatmap_layout(400, 300)
    assert len({y for _, y in four.panels_xy}) == 2  # 2 × 2
    portrait = hm.heatmap_layout(200, 400)
    assert len({y for _, y in portrait.panels_xy}) == 1  # 1 × 4
    for lay in (two, four, portrait):  # panels and bars lie inside the image and do not overlap
        boxes = [(x, y, *lay.panel_px) for x, y in lay.panels_xy] + [b for b in lay.colorbars_xywh if b]
        for x, y, w, h in boxes:
            assert 0 <= x and x + w <= lay.width and 0 <= y and y + h <= lay.height
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]


# --- heatmap.tif ------------------------------------------------------------------------------
def expected_level(slide, coords, size, pred, level_wh, ds):
    """What level ``ds`` of the overlay must hold: tiles painted at that scale over white."""
    canvas = np.empty((level_wh[1], level_wh[0], 3), np.uint8)
    canvas[:] = colors.NO_PREDICTION_RGB
    has = np.isfinite(pred)
    return colors.paint_tiles(canvas, np.asarray(coords)[has], size, colors.stil_rgb(np.asarray(pred)[has]),
                          downsample_xy=(ds, ds))


@pytest.fixture
def overlay_path(tmp_path, slide, tiles):
    coords, pred, _, _ = tiles
    return overlay.heatmap_tiff(slide, coords, TILE, pred, tmp_path / "heatmap.tif")


def test_tiff_opens_in_openslide_with_the_slide_geometry(overlay_path, slide, tiles):
    openslide = pytest.importorskip("openslide")
    coords, pred, _, _ = tiles
    with openslide.OpenSlide(str(overlay_path)) as osr:
        assert osr.dimensions == slide.dimensions == (2000, 1500)
        assert osr.level_dimensions == ((2000, 1500), (500, 375))
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(slide.mpp)
        assert float(osr.properties["openslide.mpp-y"]) == pytest.approx(slide.mpp)
        assert osr.properties["aperio.SlideID"] == "fake"
        for i in range(len(coords)):  # the centre and the corners of every tile have its colour
            x, y = (int(v) for v in coords[i])
            for px, py in ((x + 224, y + 224), (x, y), (x + 447, y + 447)):
                rgba = np.asarray(osr.read_region((px, py), 0, (1, 1)))[0, 0]
                assert tuple(rgba) == (*colors.stil_rgb([pred[i]])[0], 255), (i, px, py)  # lossless: exact
        outside = np.asarray(osr.read_region((int(OUTSIDE[0]), int(OUTSIDE[1])), 0, (1, 1)))[0, 0]
        assert tuple(outside) == (255, 255, 255, 255)  # no tile: white
        # every pixel of every level, exactly
        for level, ((w, h), ds) in enumerate(zip(osr.level_dimensions, (1.0, 4.0))):
            got = np.asarray(osr.read_region((0, 0), level, (w, h)))[..., :3]
            assert np.array_equal(got, expected_level(slide, coords, TILE, pred, (w, h), ds)), level


def test_tiff_opens_in_tiffslide_with_the_same_pixels(overlay_path, slide, tiles):
    tiffslide = pytest.importorskip("tiffslide")
    coords, pred, _, _ = tiles
    with tiffslide.TiffSlide(overlay_path) as ts:
        assert ts.dimensions == slide.dimensions
        assert ts.level_dimensions == ((2000, 1500), (500, 375))  # the thumbnail page is not a level
        assert ts.properties["tiffslide.mpp-x"] == pytest.approx(slide.mpp)
        got = ts.read_region((0, 0), 0, slide.dimensions, as_array=True)
        assert np.array_equal(got[..., :3], expected_level(slide, coords, TILE, pred, slide.dimensions, 1.0))


def test_tiff_edges_are_exact_with_a_fractional_tile_size(tmp_path):
    openslide = pytest.importorskip("openslide")
    slide = FakeSlide(2400, 1000, mpp=0.2526)
    size = 443.3  # 112 µm at 0.2526 µm/px; the grid starts at floor(k * size), as tiling.grid_starts
    starts = np.floor(np.arange(5) * size).astype(int)
    coords = np.array([(x, y) for y in starts[:2] for x in starts])
    pred = np.linspace(0, 100, len(coords))
    path = overlay.heatmap_tiff(slide, coords, size, pred, tmp_path / "f.tif")
    with openslide.OpenSlide(str(path)) as osr:
        got = np.asarray(osr.read_region((0, 0), 0, slide.dimensions))[..., :3]
    assert np.array_equal(got, expected_level(slide, coords, size, pred, slide.dimensions, 1.0))
    # tile 1 starts at x = 443: pixel 442 is tile 0's, pixel 443 tile 1's
    assert tuple(got[10, 442]) == tuple(colors.stil_rgb([pred[0]])[0])
    assert tuple(got[10, 443]) == tuple(colors.stil_rgb([pred[1]])[0])


def test_tiff_pyramid_on_a_large_slide(tmp_path):
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    import tifffile

    slide = FakeSlide(60_000, 40_000)  # geometry only: the overlay never reads slide pixels
    coords = np.array([[0, 0], [30_000, 20_000], [59_000, 39_000], [30_448, 20_000]])
    pred = [100.0, 50.0, 0.0, np.nan]
    path = overlay.heatmap_tiff(slide, coords, 1000.0, pred, tmp_path / "big.tif")
    sizes = ((60_000, 40_000), (15_000, 10_000), (3_750, 2_500), (938, 625))
    assert tuple(overlay.overlay_level_sizes(60_000, 40_000)) == sizes
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.dimensions == (60_000, 40_000) and osr.level_dimensions == sizes
        for (x, y), value in zip(coords[:3], pred):
            for level in range(4):  # read_region takes level-0 coordinates at every level
                rgba = np.asarray(osr.read_region((int(x + 500), int(y + 500)), level, (1, 1)))[0, 0]
                assert tuple(rgba[:3]) == tuple(colors.stil_rgb([value])[0]), (x, level)
        # a tile without a prediction is not drawn: white, like the background
        assert tuple(np.asarray(osr.read_region((30_948 + 300, 20_500), 0, (1, 1)))[0, 0, :3]) == (255, 255, 255)
        assert tuple(np.asarray(osr.read_region((10_000, 100), 0, (1, 1)))[0, 0, :3]) == colors.NO_PREDICTION_RGB
    with tiffslide.TiffSlide(path) as ts:
        assert ts.level_dimensions == sizes
    with tifffile.TiffFile(path) as tif:
        level0 = tif.pages[0]
        assert level0.is_tiled and level0.tilewidth == level0.tilelength == 256
        assert len(level0.dataoffsets) == 235 * 157
        # flat tiles (all but those crossing a tile edge) share the bytes of one tile per colour
        assert len(set(level0.dataoffsets)) < 60  # of 36,895: ~40 edge tiles + one per colour
        assert not tif.pages[1].is_tiled  # the Aperio thumbnail page
    assert path.stat().st_size < 600_000  # mostly the tile offset tables (8 bytes a tile)


def test_tiff_of_a_slide_without_predictions_is_white(tmp_path, slide):
    path = overlay.heatmap_tiff(slide, np.zeros((0, 2)), TILE, [], tmp_path / "empty.tif")
    import tifffile

    with tifffile.TiffFile(path) as tif:
        assert (tif.pages[0].asarray() == 255).all()


def test_overlay_benchmark_runs(monkeypatch):
    """The bounded-memory case (``python -m benchmarks.bench_overlay``), here at a small size."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = pytest.importorskip("benchmarks.bench_overlay")
    result = bench.run(width=12_000, height=9_000, tiles=300, workers=1, check_tiles=10_000)
    check = result["check"]
    assert result["tiles"] > 200 and check["tiles_checked"] == result["tiles"]  # every tile
    assert check["pixels_wrong"] == 0, check["first_wrong"]  # each tile has its own prediction's colour
    assert check["background_ok"] and check["dimensions"] == [12_000, 9_000] and check["mpp"] == 0.25
    assert result["peak_rss_mb"] > 0 and result["bytes"] > 0


# --- tiles.geojson ----------------------------------------------------------------------------
def test_geojson_is_a_qupath_feature_collection(tmp_path, tiles):
    coords, pred, attention, contribution = tiles
    path = geojson.tiles_geojson(tmp_path / "tiles.geojson", coords, TILE, pred, attention, slide_id="s1",
                            contribution=contribution)

    def no_nan(name):
        raise AssertionError(f"{name} is not JSON")

    data = json.loads(path.read_text(), parse_constant=no_nan)
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == len(coords)
    for (x, y), feature, value, att, con in zip(coords.tolist(), features, pred, attention, contribution):
        assert feature["type"] == "Feature"
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        assert ring[:4] == [[x, y], [x + TILE, y], [x + TILE, y + TILE], [x, y + TILE]]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        measurements = props["measurements"]
        assert measurements["attention"] == pytest.approx(att)
        assert measurements["relative attention"] == pytest.approx(att * len(coords))
        assert measurements["contribution"] == pytest.approx(con)
        assert all(isinstance(v, float) for v in measurements.values())
        if np.isnan(value):
            assert "sTIL %" not in measurements and "classification" not in props
            continue
        assert measurements["sTIL %"] == pytest.approx(value)
        assert props["classification"]["name"] == ("sTIL high" if value >= 30 else "sTIL low")
        assert len(props["classification"]["color"]) == 3
        assert props["color"] == colors.stil_rgb([value])[0].tolist()
    assert len({f["id"] for f in features}) == len(features)


@pytest.mark.parametrize("size", [TILE, 443.3])
def test_geojson_polygons_match_tiles_csv(tmp_path, slide, tiles, size):
    """Parsed with a geometry library: one valid square per tiles.csv row, at its level-0 box."""
    shapely = pytest.importorskip("shapely")
    from shapely.geometry import box, shape

    coords, pred, attention, contribution = tiles
    paths = hm.write_slide_outputs(slide, tmp_path, coords_l0=coords, size_l0=size, prediction=pred,
                                   attention=attention, contribution=contribution, score=40.0,
                                   formats=("csv", "geojson"))
    with open(paths["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    features = json.loads(paths["geojson"].read_text())["features"]
    assert len(features) == len(rows) == len(coords)
    for row, feature in zip(rows, features):
        polygon = shape(feature["geometry"])
        assert isinstance(polygon, shapely.geometry.Polygon) and polygon.is_valid and not polygon.interiors
        x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
        tile = box(x, y, x + w, y + h)
        if size == TILE:
            assert polygon.equals(tile)
        else:  # tiles.csv rounds the size to whole pixels; the polygon keeps it exact
            assert polygon.bounds == pytest.approx((x, y, x + size, y + size))
            assert polygon.symmetric_difference(tile).area <= 2 * 0.5 * size
        assert polygon.area == pytest.approx(size * size)
        m = feature["properties"]["measurements"]
        if row["prediction"]:
            assert m["sTIL %"] == pytest.approx(float(row["prediction"]), rel=1e-5)
        assert m["attention"] == pytest.approx(float(row["attention"]), rel=1e-5)
        assert m["contribution"] == pytest.approx(float(row["contribution"]), rel=1e-5)
    # tiles of a grid do not overlap
    polygons = [shape(f["geometry"]) for f in features]
    assert sum(p.area for p in polygons) == pytest.approx(shapely.union_all(polygons).area)


def test_geojson_cutoff_is_a_parameter(tmp_path, tiles):
    coords, pred, attention, _ = tiles
    collection = geojson.tiles_feature_collection(coords, TILE, pred, attention, slide_id="s1", cutoff=50)
    names = [f["properties"].get("classification", {}).get("name") for f in collection["features"]]
    assert names[:5] == ["sTIL high", "sTIL high", "sTIL high", "sTIL high", "sTIL low"]


# --- top_tiles.png ----------------------------------------------------------------------------
def test_top_tiles_grid(tmp_path, slide, tiles):
    coords, pred, attention, _ = tiles
    path = tiles_mod.top_tiles_png(slide, coords, TILE, pred, tmp_path / "top.png", k=3, attention=attention)
    tile_px = tiles_mod.review_tile_px(TILE, slide.mpp)
    assert tile_px == 224  # 112 µm at 0.5 µm/px
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[:2] == tiles_mod.top_tiles_size(3, tile_px)[::-1]
    # read at level 0 (downsample 2 wanted; levels are 1, 4, 16) as 448 px, resized to 224
    assert {read for read in slide.reads} == {(0, (448, 448))}
    # weights that differ: the top row by contribution (tile 6: 7/78 × 29.9 % is the largest), the
    # bottom row the lowest sTIL% among tiles weighted ≥ the median (tile 10, 0 %)
    x0 = tiles_mod._PAD + tile_px // 2

    def first_cell_is(image, row, i):
        y0 = tiles_mod._HEAD + row * (tile_px + tiles_mod._LABEL + tiles_mod._PAD) + tiles_mod._LABEL + tile_px // 2
        cx, cy = np.asarray(coords[i]) // int(TILE)
        return np.abs(image[y0, x0].astype(int) - FakeSlide.cell_rgb(cx, cy)).max() <= 2

    assert first_cell_is(image, 0, 6) and first_cell_is(image, 1, 10)
    # uniform weights (mean pooling): the 95 % tile on top, the 0 % tile below
    uniform = tiles_mod.top_tiles_png(slide, coords, TILE, pred, tmp_path / "mean.png", k=3,
                                      attention=np.full(len(pred), 1 / len(pred)))
    image = np.asarray(Image.open(uniform).convert("RGB"))
    assert first_cell_is(image, 0, 0) and first_cell_is(image, 1, 10)


def test_tiles_with_little_stroma_are_not_ranked(tmp_path, slide, tiles):
    """With a stroma estimate (a +stainmorph encoder), both rows of top_tiles.png hold only tiles
    estimated ≥ 50 % stroma: a tumour nest with a high tile value is not shown as high-sTIL."""
    coords, pred, attention, _ = tiles
    n = len(pred)
    stroma = np.full(n, 0.9)
    stroma[[0, 1, 10]] = 0.2  # the two highest tiles and the 0 % tile are nests
    uniform = np.full(n, 1 / n)
    rows, weighted, on_stroma = tiles_mod.rank_tiles(pred, uniform, stroma, k=3)
    assert on_stroma and not weighted
    assert not {0, 1, 10} & (set(rows[0].tolist()) | set(rows[1].tolist()))
    assert pred[rows[0][0]] == max(pred[i] for i in range(n) if stroma[i] >= tiles_mod.STROMA_MIN)
    # without an estimate, or where no tile reaches 50 %: every tile, as before
    assert tiles_mod.rank_tiles(pred, uniform, None, k=3)[0][0][0] == 0
    rows, _, on_stroma = tiles_mod.rank_tiles(pred, uniform, np.zeros(n), k=3)
    assert not on_stroma and rows[0][0] == 0
    path = tiles_mod.top_tiles_png(slide, coords, TILE, pred, tmp_path / "top.png", k=3, attention=attention,
                                   stroma=stroma)
    assert Image.open(path).size == tiles_mod.top_tiles_size(3, 224)
    with pytest.raises(HeatmapInputError, match="stroma has"):
        tiles_mod.top_tiles_png(slide, coords, TILE, pred, tmp_path / "bad.png", stroma=stroma[:-1])


def test_weighted_top_row_ranks_stromal_lymphocytes():
    """With weights that differ and a stroma estimate, the top row ranks by weight × sTIL% × estimated
    stroma: a tile just over the 50 % bar with the largest weight × sTIL% yields to a tile that is all
    stroma; the bottom row is unchanged."""
    pred = np.array([60.0, 50.0, 10.0, 5.0, 20.0, 30.0])
    weights = np.array([0.2, 0.2, 0.15, 0.15, 0.15, 0.15])
    stroma = np.array([0.55, 1.0, 1.0, 0.9, 0.8, 0.9])
    rows, weighted, on_stroma = tiles_mod.rank_tiles(pred, weights, stroma, k=2)
    assert weighted and on_stroma
    assert rows[0].tolist() == [1, 0]  # 50 × 0.2 × 1.0 = 10 > 60 × 0.2 × 0.55 = 6.6
    without = tiles_mod.rank_tiles(pred, weights, None, k=2)[0]
    assert without[0].tolist() == [0, 1]  # by weight × sTIL% alone, as before
    assert rows[1].tolist() == without[1].tolist()


def test_stroma_estimate_travels_in_tiles_csv(tmp_path, slide, tiles):
    coords, pred, attention, contribution = tiles
    stroma = np.linspace(0, 1, len(pred))
    out = tmp_path / "with"
    hm.write_slide_outputs(slide, out, coords_l0=coords, size_l0=TILE, prediction=pred, attention=attention,
                           contribution=contribution, score=41.5, formats=("csv",), stroma=stroma)
    table = tiles_mod.read_tiles_csv(out / "tiles.csv")
    assert np.allclose(table.stroma, stroma, atol=1e-6)
    hm.write_slide_outputs(slide, tmp_path / "without", coords_l0=coords, size_l0=TILE, prediction=pred,
                           attention=attention, contribution=contribution, score=41.5, formats=("csv",))
    header = (tmp_path / "without" / "tiles.csv").read_text().splitlines()[0]
    assert header == ",".join(tiles_mod.TILE_COLUMNS)  # the DESIGN.md columns, unchanged
    assert tiles_mod.read_tiles_csv(tmp_path / "without" / "tiles.csv").stroma is None
    with pytest.raises(HeatmapInputError, match="stroma has shape"):
        tiles_mod.tiles_frame(coords, TILE, pred, stroma=stroma[:-1])


def test_top_tiles_with_few_tiles_and_none(tmp_path, slide):
    coords = grid(slide)[:3]
    path = tiles_mod.top_tiles_png(slide, coords, TILE, [10.0, 20.0, np.nan], tmp_path / "top.png", k=8)
    assert Image.open(path).size == tiles_mod.top_tiles_size(8, 224)
    with pytest.raises(HeatmapInputError, match="no tile has a prediction"):
        tiles_mod.top_tiles_png(slide, coords, TILE, [np.nan] * 3, tmp_path / "none.png")
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
        with fs.atomic_path(target) as tmp:
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
    slide_mod = pytest.importorskip("weakstil.wsi.slide")
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
    with openslide.OpenSlide(str(paths["tif"])) as osr, openslide.OpenSlide(str(tiny_slide)) as original:
        assert osr.dimensions == original.dimensions == dims == (1500, 1200)
        assert osr.properties["openslide.mpp-x"] == original.properties["openslide.mpp-x"]
        x, y = centre(coords[7], 224.0)
        got = np.asarray(osr.read_region((int(x), int(y)), 0, (1, 1)))[0, 0, :3]
        assert tuple(got) == tuple(colors.stil_rgb([pred[7]])[0])
    assert Image.open(paths["top"]).size == tiles_mod.top_tiles_size(8, 112)  # 56 µm tiles at 0.5 µm/px
    png = Image.open(paths["png"])
    assert png.size[0] > png.size[1]  # 2 × 2 panels of a landscape slide
    assert len(json.loads(paths["geojson"].read_text())["features"]) == len(coords)


# --- weakstil heatmap: regenerate the bundle from a results folder ----------------------------
def write_scored(results, slide_path, slide_id=None, *, source_path=None, seed=0,
                 formats=("csv", "png", "tif", "geojson", "top")):
    """A results/slides/<id>/ folder as `weakstil score` leaves it (tiles.csv, outputs, score.json)."""
    from weakstil.wsi.slide import open_slide

    with open_slide(slide_path) as slide:
        coords = grid(slide, 224.0)
        rng = np.random.default_rng(seed)
        pred = rng.uniform(0, 100, len(coords))
        logits = rng.normal(0, 1, len(coords))
        attention = np.exp(logits) / np.exp(logits).sum()
        score = float((attention * pred).sum())
        folder = hm.slide_results_dir(results, slide_id or slide.slide_id)
        hm.write_slide_outputs(slide, folder, coords_l0=coords, size_l0=224.0, prediction=pred,
                               attention=attention, contribution=attention * pred, score=score, cutoff=40.0,
                               formats=formats)
    info = {"slide_id": folder.name, "score": round(score, 4), "n_tiles": len(coords), "status": "ok",
            "source_path": str(source_path or slide_path), "slide_mpp": 0.25, "tile_size_l0": 224.0}
    (folder / "score.json").write_text(json.dumps(info))
    return folder


def test_regenerate_rewrites_a_deleted_heatmap(tmp_path, tiny_slide):
    from weakstil.runs.batch import regenerate

    results = tmp_path / "results"
    folder = write_scored(results, tiny_slide)
    before = {name: (folder / name).read_bytes() for name in ("heatmap.png", "tiles.geojson", "tiles.csv")}
    (folder / "heatmap.png").unlink()
    (folder / "heatmap.tif").unlink()
    (results / "slides" / ".tiny.123-abc.partial").mkdir()  # a staging leftover is not a slide
    outcomes = regenerate(results)
    assert [(o.key, o.status) for o in outcomes] == [("tiny", "done")], outcomes
    assert set(outcomes[0].result) == {"png", "tif", "geojson", "top"}
    # the same pictures and objects as `score` wrote (same score, tile size and cutoff), tiles.csv untouched
    assert np.array_equal(np.asarray(Image.open(folder / "heatmap.png")),
                          np.asarray(Image.open(io.BytesIO(before["heatmap.png"]))))
    # the same objects (tiles.csv keeps 6 significant digits of attention and contribution)
    old, new = json.loads(before["tiles.geojson"]), json.loads((folder / "tiles.geojson").read_text())
    assert new["weakstil"] == old["weakstil"] and old["weakstil"]["cutoff"] == 40.0
    for a, b in zip(old["features"], new["features"], strict=True):
        assert a["geometry"] == b["geometry"] and a["id"] == b["id"]
        assert a["properties"]["classification"] == b["properties"]["classification"]
        assert a["properties"]["measurements"] == pytest.approx(b["properties"]["measurements"], rel=1e-5,
                                                                abs=2e-4)
    assert (folder / "tiles.csv").read_bytes() == before["tiles.csv"]
    assert not list(folder.glob("*.partial")) and not (results / ".locks" / "tiny.lock").exists()
    # without tiles.geojson to take the cutoff from, score.json's (or 30) applies
    (folder / "tiles.geojson").unlink()
    info = json.loads((folder / "score.json").read_text())
    (folder / "score.json").write_text(json.dumps({**info, "cutoff": 45.0}))
    assert regenerate(results)[0].status == "done"
    assert json.loads((folder / "tiles.geojson").read_text())["weakstil"]["cutoff"] == 45.0
    # only what was asked for
    (folder / "top_tiles.png").unlink()
    assert regenerate(results, formats=("geojson",))[0].status == "done"
    assert not (folder / "top_tiles.png").exists()


def test_regenerate_finds_slides_and_goes_on_after_a_bad_one(tmp_path, tiny_slide):
    import shutil

    from weakstil.outputs.bundle import ResultsNotFoundError
    from weakstil.runs.batch import regenerate

    results = tmp_path / "results"
    # "moved": scored from a path that no longer exists; "broken": a tiles.csv without predictions
    quick = ("csv",)
    write_scored(results, tiny_slide, "moved", source_path=tmp_path / "gone" / "moved.svs", formats=quick)
    write_scored(results, tiny_slide, "tiny", formats=quick)
    broken = write_scored(results, tiny_slide, "broken", seed=1, formats=quick)
    (broken / "tiles.csv").write_text("x,y,width\n0,0,224\n")
    # "wrong": its tiles reach beyond the slide found for it (another slide than the one scored)
    wrong = write_scored(results, tiny_slide, "wrong", formats=quick)
    (wrong / "tiles.csv").write_text("x,y,width,height,prediction,attention,contribution\n"
                                     "5000,5000,224,224,50,1,50\n")
    outcomes = {o.key: o for o in regenerate(results, formats=("geojson",))}
    assert outcomes["tiny"].status == "done" and (results / "slides" / "tiny" / "tiles.geojson").exists()
    assert outcomes["moved"].status == "failed" and outcomes["moved"].reason == "SlideNotFoundError"
    assert "--slides" in outcomes["moved"].fix
    assert outcomes["broken"].status == "failed" and "prediction" in outcomes["broken"].error
    assert outcomes["wrong"].status == "failed" and "not the slide" in outcomes["wrong"].error
    # with the slides folder, "moved" is found by its id
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(tiny_slide, slides / "moved.svs")
    outcomes = {o.key: o for o in regenerate(results, slides, slide_ids=["moved"], formats=("png",))}
    assert list(outcomes) == ["moved"] and outcomes["moved"].status == "done"
    assert (results / "slides" / "moved" / "heatmap.png").exists()
    with pytest.raises(ResultsNotFoundError, match="nope"):
        regenerate(results, slide_ids=["nope"])
    with pytest.raises(ResultsNotFoundError):
        regenerate(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="pdf"):
        regenerate(results, formats=("pdf",))
