"""Tile geometry (dense, pure) and plan_tiles on tiny slides."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_SIZE, tissue_ellipse_mask

from weakstil.errors import ConfigError, NoTissueError
from weakstil.wsi.slide import open_slide
from weakstil.wsi.tiling import (
    TileSpec,
    grid_starts,
    plan_tiles,
    tile_grid,
    tissue_fraction,
)
from weakstil.wsi.tissue import RoiPolygon, TissueParams

FINE = TissueParams(thumb_mpp=2.0)  # 188×150 px thumbnails of the tiny slide


# --- TileSpec -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, slide_mpp, size, stride", [
    (TileSpec(), 0.25, 448.0, 448.0),
    (TileSpec(), 0.5, 224.0, 224.0),
    (TileSpec(), 0.2527, 224 * 0.5 / 0.2527, 224 * 0.5 / 0.2527),
    (TileSpec(tile_px=256, mpp=1.0, overlap=32), 0.25, 1024.0, 896.0),
    (TileSpec(tile_px=224, mpp=0.25), 0.5, 112.0, 112.0),
])
def test_tile_size_and_stride(spec, slide_mpp, size, stride):
    assert spec.size_l0(slide_mpp) == pytest.approx(size)
    assert spec.stride_l0(slide_mpp) == pytest.approx(stride)
    assert isinstance(spec.size_l0(slide_mpp), float)


@pytest.mark.parametrize("kwargs", [
    {"tile_px": 0}, {"tile_px": 22.5}, {"mpp": 0}, {"mpp": float("inf")}, {"overlap": -1},
    {"overlap": 224}, {"min_tissue": 1.5}, {"min_tissue": -0.1},
])
def test_bad_tile_spec(kwargs):
    with pytest.raises(ConfigError):
        TileSpec(**kwargs)


def test_fingerprint():
    spec = TileSpec()
    fp = spec.fingerprint(TissueParams())
    assert {"tile_px", "mpp", "overlap", "min_tissue", "tissue"} <= fp.keys()
    assert json.loads(json.dumps(fp)) == fp
    assert fp == TileSpec().fingerprint(TissueParams())
    assert fp != spec.fingerprint(TissueParams(thumb_mpp=4.0))
    assert fp != TileSpec(min_tissue=0.25).fingerprint(TissueParams())


# --- the grid (pure, dense) ---------------------------------------------------------------------
def brute_force_starts(length: int, size: float, stride: float) -> list[int]:
    starts, k = [], 0
    while math.floor(k * stride + 1e-9) + math.ceil(size - 1e-9) <= length:
        starts.append(math.floor(k * stride + 1e-9))
        k += 1
    return starts


@pytest.mark.parametrize("length", [0, 1, 7, 447, 448, 449, 895, 896, 1000, 1500, 12345])
@pytest.mark.parametrize("size", [1.0, 7.5, 224.0, 443.2, 448.0])
@pytest.mark.parametrize("stride_ratio", [1.0, 0.75, 0.5, 1.5])
def test_grid_starts(length, size, stride_ratio):
    stride = size * stride_ratio
    starts = grid_starts(length, size, stride)
    assert starts.tolist() == brute_force_starts(length, size, stride)
    if len(starts):
        assert starts[0] == 0
        assert starts[-1] + math.ceil(size) <= length  # never past the slide
        assert math.floor(len(starts) * stride) + math.ceil(size) > length  # as many as fit
        assert np.all(np.diff(starts) >= math.floor(stride))


@pytest.mark.parametrize("size, stride", [(0, 1), (1, 0), (-1, 1)])
def test_grid_starts_rejects_bad_geometry(size, stride):
    with pytest.raises(ValueError):
        grid_starts(100, size, stride)


@pytest.mark.parametrize("dims, size, stride, n_x, n_y", [
    ((1500, 1200), 448.0, 448.0, 3, 2),
    ((1500, 1200), 448.0, 224.0, 5, 4),
    ((1501, 1203), 443.2, 443.2, 3, 2),
    ((100, 100), 448.0, 448.0, 0, 0),
    ((448, 100), 448.0, 448.0, 1, 0),
    ((100_000, 80_000), 448.0, 448.0, 223, 178),
])
def test_tile_grid(dims, size, stride, n_x, n_y):
    coords = tile_grid(dims, size, stride)
    assert coords.dtype == np.int32 and coords.shape == (n_x * n_y, 2)
    if len(coords):
        assert np.all(coords >= 0)
        assert np.all(coords[:, 0] + math.ceil(size) <= dims[0])
        assert np.all(coords[:, 1] + math.ceil(size) <= dims[1])
        order = np.lexsort((coords[:, 0], coords[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(coords)))  # row by row


# --- tissue fraction (pure, dense) --------------------------------------------------------------
def brute_force_fraction(coords, size, mask, ds_x, ds_y, up=20):
    """Upsample the mask `up`× and count: the tile edges are snapped to 1/up of a mask pixel."""
    fine = np.kron(mask, np.ones((up, up), bool)).astype(float)
    fine = np.pad(fine, ((0, 4 * up * mask.shape[0]), (0, 4 * up * mask.shape[1])))
    out = []
    for x, y in coords:
        c0, c1 = round(x / ds_x * up), round((x + size) / ds_x * up)
        r0, r1 = round(y / ds_y * up), round((y + size) / ds_y * up)
        out.append(fine[r0:r1, c0:c1].mean())
    return np.array(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ds", [(8.0, 8.0), (10.0, 10.0), (32.0, 31.9), (4.0, 6.0)])
def test_tissue_fraction_matches_brute_force(seed, ds):
    rng = np.random.default_rng(seed)
    mask = rng.random((12, 15)) < 0.5
    size = float(rng.choice([20.0, 35.0, 64.0]))
    coords = rng.integers(0, int(15 * ds[0]), size=(40, 2))
    got = tissue_fraction(coords, size, mask, ds)
    want = brute_force_fraction(coords, size, mask, *ds)
    np.testing.assert_allclose(got, want, atol=0.06)


@pytest.mark.parametrize("xy, size, expected", [
    ((0, 0), 10.0, 1.0),  # exactly the one tissue pixel
    ((5, 5), 10.0, 0.25),  # a quarter of it
    ((5, 0), 10.0, 0.5),
    ((10, 10), 10.0, 0.0),
    ((0, 0), 20.0, 0.25),
    ((-10, -10), 20.0, 0.25),  # partly outside the mask: outside counts as no tissue
])
def test_tissue_fraction_partial_pixels(xy, size, expected):
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert tissue_fraction(np.array([xy]), size, mask, 10.0)[0] == pytest.approx(expected)


def test_tissue_fraction_extremes():
    coords = tile_grid((400, 300), 50.0, 50.0)
    assert np.all(tissue_fraction(coords, 50.0, np.ones((30, 40), bool), 10.0) == 1)
    assert np.all(tissue_fraction(coords, 50.0, np.zeros((30, 40), bool), 10.0) == 0)
    assert tissue_fraction(np.zeros((0, 2)), 50.0, np.ones((3, 3), bool), 10.0).shape == (0,)


# --- plan_tiles on slides -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_plan_tiles_tiny(tiny_slide, backend):
    spec = TileSpec(tile_px=56, mpp=1.0)  # 224 level-0 px: a 6 × 5 grid
    with open_slide(tiny_slide, backend=backend) as slide:
        grid = plan_tiles(slide, spec, tissue=FINE)
    assert grid.size_l0 == 224.0 and grid.coords_l0.dtype == np.int32
    assert 0 < len(grid) < 30
    assert np.all(grid.tissue_fraction >= spec.min_tissue)
    assert np.all(grid.coords_l0 + 224 <= np.array(TINY_SIZE))
    truth = tissue_ellipse_mask(*TINY_SIZE)
    for x, y in grid.coords_l0:
        assert truth[y : y + 224, x : x + 224].mean() > spec.min_tissue - 0.1
    assert grid.mask_downsample == pytest.approx(TINY_SIZE[0] / grid.mask.shape[1], rel=0.01)
    assert grid.thumb.shape[:2] == grid.mask.shape


def test_plan_tiles_same_for_both_backends(tiny_slide, odd_slide):
    for path in (tiny_slide, odd_slide):
        grids = []
        for backend in ("openslide", "tiffslide"):
            with open_slide(path, backend=backend) as slide:
                grids.append(plan_tiles(slide, TileSpec(tile_px=28, mpp=1.0), tissue=FINE))
        np.testing.assert_array_equal(grids[0].coords_l0, grids[1].coords_l0)
        np.testing.assert_array_equal(grids[0].tissue_fraction, grids[1].tissue_fraction)


def test_plan_tiles_mask_is_not_misplaced(odd_slide):
    """The mask maps to level 0 with the exact (float) downsample: compare with the ground truth."""
    with open_slide(odd_slide) as slide:
        grid = plan_tiles(slide, TileSpec(tile_px=28, mpp=1.0, min_tissue=0.0), tissue=FINE)
    truth = tissue_ellipse_mask(*slide.dimensions)
    want = np.array([truth[y : y + 112, x : x + 112].mean() for x, y in grid.coords_l0])
    assert np.abs(grid.tissue_fraction - want).max() < 0.2
    assert np.abs(grid.tissue_fraction - want).mean() < 0.03


def test_plan_tiles_with_roi(tiny_slide, tmp_path):
    left = RoiPolygon(np.array([[0, 0], [700, 0], [700, 1200], [0, 1200]], float))
    with open_slide(tiny_slide) as slide:
        grid = plan_tiles(slide, TileSpec(tile_px=28, mpp=1.0), tissue=FINE, roi=[left])
        path = tmp_path / "roi.geojson"
        path.write_text(json.dumps({"type": "Polygon", "coordinates": [left.exterior.tolist()]}))
        from_file = plan_tiles(slide, TileSpec(tile_px=28, mpp=1.0), tissue=FINE, roi=path)
    assert len(grid) > 0 and np.all(grid.coords_l0[:, 0] + 112 <= 700 + 16)
    assert grid.roi is not None and grid.roi.shape == grid.mask.shape
    np.testing.assert_array_equal(grid.coords_l0, from_file.coords_l0)


def test_plan_tiles_min_tissue_zero_keeps_the_whole_grid(tiny_slide):
    with open_slide(tiny_slide) as slide:
        grid = plan_tiles(slide, TileSpec(min_tissue=0.0), tissue=FINE)
    np.testing.assert_array_equal(grid.coords_l0, tile_grid(TINY_SIZE, 448.0, 448.0))


def test_plan_tiles_blank_slide_raises_with_the_grid(tmp_path):
    from weakstil.wsi.writer import write_aperio_tiff

    path = write_aperio_tiff(tmp_path / "blank.svs", np.full((600, 800, 3), 245, np.uint8), 0.25)
    with open_slide(path) as slide, pytest.raises(NoTissueError) as info:
        plan_tiles(slide, TileSpec(), tissue=FINE)
    assert len(info.value.grid) == 0 and not info.value.grid.mask.any()
    assert str(path) in str(info.value)
