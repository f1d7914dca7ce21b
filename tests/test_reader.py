"""The tile reader: block planning, and the direct JPEG-tile path giving read_region's pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest

from weakstil.wsi import reader
from weakstil.wsi.reader import (
    aligned_block,
    direct_source,
    merge_jpeg_tables,
    plan_blocks,
    read_block_tiles,
    read_tiles_direct,
)
from weakstil.wsi.slide import open_slide
from weakstil.wsi.tiling import TileSpec, tile_grid


@pytest.fixture(scope="module")
def he_slides(tmp_path_factory):
    """A small synthetic H&E slide scanned at 0.25 and at 0.5 µm/px (real texture, 2 levels)."""
    from weakstil.synth.lattice import SlideParams, write_slide

    root = tmp_path_factory.mktemp("he")
    params = SlideParams(7, stil_target=30.0, size_um=(640.0, 512.0))
    paths = {}
    for mpp in (0.25, 0.5):
        paths[mpp] = root / f"he-{mpp:g}.svs"
        write_slide(paths[mpp], params, mpp)
    return paths


def all_tiles(slide, spec: TileSpec, *, block: int = 4):
    size_l0 = spec.size_l0(slide.mpp)
    coords = tile_grid(slide.dimensions, size_l0, spec.stride_l0(slide.mpp))
    order, blocks = plan_blocks(coords, size_l0, block=block)
    return coords[order], size_l0, blocks


def read_all(slide, coords, size_l0, blocks, tile_px, *, direct=True):
    return np.concatenate([read_block_tiles(slide, b, coords, size_l0=size_l0, tile_px=tile_px, direct=direct)
                           for b in blocks])


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- planning -------------------------------------------------------------------------------------
def test_plan_blocks_is_a_permutation_of_contiguous_blocks():
    coords = tile_grid((5000, 3000), 448.0, 448.0)
    rng = np.random.default_rng(0)
    coords = coords[rng.permutation(len(coords))][: len(coords) - 5]
    order, blocks = plan_blocks(coords, 448.0, block=4)
    assert sorted(order.tolist()) == list(range(len(coords)))
    assert np.concatenate([b.index for b in blocks]).tolist() == list(range(len(coords)))
    for b in blocks:
        xy = coords[order][b.index]
        assert np.all(xy >= b.xy_l0) and np.all(xy + 448 <= np.add(b.xy_l0, b.size_l0))
        assert np.ptp(xy[:, 0]) < 4 * 448 and np.ptp(xy[:, 1]) < 4 * 448
    assert plan_blocks(np.zeros((0, 2), np.int32), 448.0)[1] == []


# --- the direct path gives read_region's pixels -----------------------------------------------------
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("slide_mpp, target_mpp, exact", [
    (0.25, 0.5, True),    # 2× in the DCT domain (the common case)
    (0.5, 0.5, True),     # level 0 as stored
    (0.25, 1.0, True),    # level 1 (downsample 4) as stored
    (0.25, 2.0, True),    # level 1 then 2× in the DCT domain
    (0.5, 0.75, False),   # 1.5×: full decode, one resize per block
])
def test_direct_matches_region_path(he_slides, backend, slide_mpp, target_mpp, exact):
    with open_slide(he_slides[slide_mpp], backend=backend) as slide:
        spec = TileSpec(tile_px=224, mpp=target_mpp)
        coords, size_l0, blocks = all_tiles(slide, spec)
        direct = read_all(slide, coords, size_l0, blocks, 224)
        region = read_all(slide, coords, size_l0, blocks, 224, direct=False)
        source = direct_source(slide)
        assert source is not None and source.decoded > 0  # the direct path was taken
    assert direct.shape == region.shape == (len(coords), 224, 224, 3)
    diff = mean_abs_diff(direct, region)
    if exact and target_mpp / slide_mpp in (1.0, 4.0):  # no scaling at all: identical JPEG decodes
        assert diff == 0.0
    else:
        assert diff < 1.5
        per_tile = np.abs(direct.astype(np.int16) - region.astype(np.int16)).mean(axis=(1, 2, 3))
        assert per_tile.max() < 3.0


def test_direct_near_power_of_two_uses_dct_scale(he_slides):
    """A 40× scan stated as 0.2527 µm/px: 0.5 µm/px is a 1.979× reduction, read at 1/2 scale + resize."""
    with open_slide(he_slides[0.25], mpp=0.2527, mpp_override=True) as slide:
        spec = TileSpec(tile_px=224, mpp=0.5)
        coords, size_l0, blocks = all_tiles(slide, spec)
        direct = read_all(slide, coords, size_l0, blocks, 224)
        region = read_all(slide, coords, size_l0, blocks, 224, direct=False)
        assert direct_source(slide).plan(slide, size_l0, 224) == (0, 2)
    assert mean_abs_diff(direct, region) < 2.0


def test_scaled_decoding_is_the_same_with_simplejpeg_and_pil(he_slides, monkeypatch):
    """simplejpeg (the fast path) and PIL's draft mode (the fallback) run the same libjpeg-turbo
    scaled IDCT: the tiles must be identical."""
    got = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(reader, "_simplejpeg", None)
        with open_slide(he_slides[0.25]) as slide:
            coords, size_l0, blocks = all_tiles(slide, TileSpec(tile_px=112, mpp=0.5))
            got.append(read_all(slide, coords, size_l0, blocks, 112))
            assert direct_source(slide).plan(slide, size_l0, 112)[1] == 2  # decoded at 1/2
    assert reader._simplejpeg is None and got[0].shape == got[1].shape
    np.testing.assert_array_equal(got[0], got[1])


def test_direct_decodes_each_jpeg_tile_once_when_blocks_align(he_slides):
    with open_slide(he_slides[0.5]) as slide:
        spec = TileSpec(tile_px=224, mpp=0.5)
        size_l0 = spec.size_l0(slide.mpp)
        block = aligned_block(slide, size_l0, 224)
        assert block == 8  # 8 × 224 = 1792 = 7 × 256
        coords, size_l0, blocks = all_tiles(slide, spec, block=block)
        source = direct_source(slide)
        source.cache_limit = 0  # no cache: alignment alone must avoid decoding a JPEG tile twice
        read_all(slide, coords, size_l0, blocks, 224)
        level = source.levels[0]
        covered = {(int(y) // level.tile_h, int(x) // level.tile_w)
                   for x0, y0 in coords for x in range(x0, x0 + 224, 32) for y in range(y0, y0 + 224, 32)}
        assert source.decoded == len(covered)


def test_tiles_at_the_slide_edge_and_outside_are_white_beyond(tiny_slide):
    with open_slide(tiny_slide) as slide:
        width, height = slide.dimensions
        coords = np.array([[width - 300, height - 300], [width - 100, 0], [0, 0]], dtype=np.int64)
        order, blocks = plan_blocks(coords, 448.0, block=4)
        coords = coords[order]
        direct = read_all(slide, coords, 448.0, blocks, 224)
        region = read_all(slide, coords, 448.0, blocks, 224, direct=False)
    assert mean_abs_diff(direct, region) < 1.0
    k = int(np.flatnonzero((coords == [width - 100, 0]).all(axis=1))[0])
    assert (direct[k, :, 60:] == 255).all()  # past the right edge: white, as read_region gives


def test_odd_downsample_levels_match(odd_slide):
    """Level 1 of a 1501×1203 slide has downsample 3.9943: the direct path still agrees."""
    with open_slide(odd_slide) as slide:
        spec = TileSpec(tile_px=64, mpp=1.0)
        coords, size_l0, blocks = all_tiles(slide, spec)
        direct = read_all(slide, coords, size_l0, blocks, 64)
        region = read_all(slide, coords, size_l0, blocks, 64, direct=False)
    assert mean_abs_diff(direct, region) < 1.5


def test_generic_tiled_tiff_uses_the_direct_path(tmp_path):
    """A plain tiled JPEG TIFF (no vendor metadata, one level) is read directly as well."""
    import tifffile
    from conftest import tissue_like_image

    path = tmp_path / "generic.tif"
    tifffile.imwrite(path, tissue_like_image(1100, 900), tile=(256, 256), compression="jpeg",
                     photometric="rgb", metadata=None, resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff"
        coords, size_l0, blocks = all_tiles(slide, TileSpec(tile_px=112, mpp=0.5))
        direct = read_all(slide, coords, size_l0, blocks, 112)
        region = read_all(slide, coords, size_l0, blocks, 112, direct=False)
        assert direct_source(slide).decoded > 0
    assert mean_abs_diff(direct, region) < 1.5


# --- falling back ---------------------------------------------------------------------------------
def test_plain_images_use_the_region_path(tiny_png):
    with open_slide(tiny_png, mpp=0.25) as slide:
        assert direct_source(slide) is None
        assert aligned_block(slide, 448.0, 224, block=4) == 4
        assert read_tiles_direct(slide, np.zeros((1, 2), np.int64), size_l0=448.0, tile_px=224) is None
        coords, size_l0, blocks = all_tiles(slide, TileSpec())
        tiles = read_all(slide, coords, size_l0, blocks, 224)
    assert tiles.shape == (len(coords), 224, 224, 3)


def test_a_level_that_fails_the_check_falls_back(he_slides, monkeypatch):
    """Tiles that decode to something else than read_region gives (e.g. a colour-space mix-up) are
    never used: the level is read through read_region instead."""
    real_decode = reader.DirectSource._decode

    def wrong_colours(self, level, index, scale):
        return real_decode(self, level, index, scale)[..., ::-1].copy()

    monkeypatch.setattr(reader.DirectSource, "_decode", wrong_colours)
    with open_slide(he_slides[0.25]) as slide:
        coords, size_l0, blocks = all_tiles(slide, TileSpec())
        tiles = read_all(slide, coords, size_l0, blocks, 224)
        region = read_all(slide, coords, size_l0, blocks, 224, direct=False)
        source = direct_source(slide)
        assert source.plan(slide, size_l0, 224) is None
        assert source.decoded == 0
    assert np.array_equal(tiles, region)


def test_handles_get_their_own_source_and_release_it(he_slides):
    slide = open_slide(he_slides[0.25])
    first = direct_source(slide)
    assert first is not None and direct_source(slide) is first
    other = open_slide(he_slides[0.25])
    assert direct_source(other) is not first
    other.close()
    del other
    import gc

    gc.collect()
    assert first._fd is not None
    slide.close()
    del slide
    gc.collect()
    assert first._fd is None  # closed with its handle


# --- JPEG tables ----------------------------------------------------------------------------------
def _split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """Split a full JPEG into TIFF-style JPEGTables (SOI DQT DHT EOI) and an abbreviated stream."""
    pos, tables, rest = 2, [], []
    while pos < len(jpeg):
        marker = jpeg[pos : pos + 2]
        if marker == b"\xff\xda":  # start of scan: the rest is entropy-coded data
            rest.append(jpeg[pos:])
            break
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        segment = jpeg[pos : pos + 2 + length]
        (tables if marker in (b"\xff\xdb", b"\xff\xc4") else rest).append(segment)
        pos += 2 + length
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", b"\xff\xd8" + b"".join(rest)


def test_merge_jpeg_tables_restores_abbreviated_tiles():
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    full = buf.getvalue()
    tables, abbreviated = _split_tables(full)
    assert b"\xff\xdb" not in abbreviated[:200]
    merged = merge_jpeg_tables(tables, abbreviated)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(merged))), np.asarray(Image.open(io.BytesIO(full))))
    assert merge_jpeg_tables(b"", full) == full


# --- feeding the encoder --------------------------------------------------------------------------
def test_reader_thread_and_reader_processes_give_the_same_batches(he_slides):
    """workers=0 (one reader thread in this process, the small-CPU default) and workers=2 (reader
    processes writing into a shared-memory ring) yield the same rows in the same order, in batches of the requested size."""
    from weakstil.embed.extract import BlockDataset, ExtractOptions, iter_batches

    path = he_slides[0.25]
    with open_slide(path) as slide:
        coords, size_l0, blocks = all_tiles(slide, TileSpec(tile_px=112, mpp=0.5))
    got = {}
    for workers in (0, 2):
        dataset = BlockDataset(path, coords, blocks, size_l0, 112, {})
        # a batch is valid until the next is asked for (process readers hand out views of their ring)
        batches = [(start, t.clone()) for start, t in
                   iter_batches(dataset, ExtractOptions(device="cpu", batch_size=8, workers=workers), "cpu")]
        dataset.close()
        starts = [start for start, _ in batches]
        sizes = [len(t) for _, t in batches]
        assert starts == np.cumsum([0] + sizes[:-1]).tolist()
        assert all(size >= 8 for size in sizes[:-1])
        got[workers] = np.concatenate([t.numpy() for _, t in batches])
    assert len(got[0]) == len(coords)
    np.testing.assert_array_equal(got[0], got[2])
    with open_slide(path) as slide:  # and the tiles the reader gives when called directly
        np.testing.assert_array_equal(got[0], read_all(slide, coords, size_l0, blocks, 112))


def test_reader_thread_errors_reach_the_caller_and_the_thread_stops(he_slides, monkeypatch):
    import threading

    from weakstil.embed.extract import BlockDataset, ExtractOptions, iter_batches

    path = he_slides[0.5]
    with open_slide(path) as slide:
        coords, size_l0, blocks = all_tiles(slide, TileSpec(tile_px=112, mpp=0.5), block=2)
    assert len(blocks) > 3
    calls = []
    real = BlockDataset.__getitem__

    def flaky(self, i):
        calls.append(i)
        if i == 2:
            raise OSError("simulated read error in block 2")
        return real(self, i)

    monkeypatch.setattr(BlockDataset, "__getitem__", flaky)
    dataset = BlockDataset(path, coords, blocks, size_l0, 112, {})
    with pytest.raises(OSError, match="block 2"):
        for _ in iter_batches(dataset, ExtractOptions(device="cpu", batch_size=1, workers=0), "cpu"):
            pass
    dataset.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("weakstil-reader")]
    assert max(calls) < 2 + 4 + 1  # read ahead by at most the prefetch depth


def test_a_reader_pool_kept_across_slides_gives_each_slide_its_own_tiles(he_slides):
    """One RingPool reads two slides (payloads carry the path; each process keeps its handles):
    the same tiles as the reader thread, slide after slide, without new processes."""
    from weakstil.embed.extract import BlockDataset, ExtractOptions, iter_batches
    from weakstil.embed.loader import RingPool, read_block_payload, ring_rows

    opts = ExtractOptions(device="cpu", batch_size=8, workers=2)
    with RingPool(read_block_payload, 112, rows=ring_rows(8, 16), workers=2) as pool:
        pids = [p.pid for p in pool.procs]
        for mpp in (0.25, 0.5, 0.25):
            path = he_slides[mpp]
            with open_slide(path) as slide:
                coords, size_l0, blocks = all_tiles(slide, TileSpec(tile_px=112, mpp=0.5))
                want = read_all(slide, coords, size_l0, blocks, 112)
            dataset = BlockDataset(path, coords, blocks, size_l0, 112, {})
            got = np.concatenate([t.numpy().copy() for _, t in iter_batches(dataset, opts, "cpu", pool=pool)])
            np.testing.assert_array_equal(got, want)
        assert [p.pid for p in pool.procs] == pids
