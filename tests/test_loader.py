"""The shared-memory ring of reader processes (weakstil.embed.loader): order, contents, errors, shutdown."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from weakstil.embed.loader import ReaderDied, RingLoader, plan_batches

PX = 8
SIZES = [3, 1, 4, 4, 2, 5, 1, 3, 2, 4, 4, 1]  # tiles per block
FIRST = np.cumsum([0] + SIZES[:-1]).tolist()


class FakeRead:
    """Block i: its tiles hold (first row + tile number) in every pixel, after a jittered delay."""

    def __init__(self, sizes):
        self.sizes, self.first = list(sizes), np.cumsum([0] + list(sizes)[:-1]).tolist()

    def __call__(self, i: int):
        time.sleep(0.001 * ((i * 7) % 5))  # blocks finish out of order
        rows = self.first[i] + np.arange(self.sizes[i])
        tiles = np.broadcast_to(rows[:, None, None, None] % 256, (self.sizes[i], PX, PX, 3)).astype(np.uint8)
        return self.first[i], tiles


fake_read = FakeRead(SIZES)


def children_alive() -> list:
    return [p for p in mp.active_children() if p.name.startswith("weakstil-reader")]


def test_plan_batches_groups_consecutive_blocks():
    assert plan_batches([3, 1, 4, 4, 2], 4) == [[0, 1], [2], [3], [4]]
    assert plan_batches([], 4) == []
    assert sum(plan_batches(SIZES, 5), []) == list(range(len(SIZES)))


@pytest.mark.parametrize("workers,slots", [(1, 2), (3, None)])
def test_batches_come_in_row_order_with_every_tile(workers, slots):
    loader = RingLoader(fake_read, SIZES, FIRST, PX, batch_size=5, workers=workers, slots=slots)
    assert loader.slots < len(loader)  # slots are reused: the refill path runs
    seen = []
    for start, tiles in loader:
        assert tiles.shape[1:] == (PX, PX, 3)
        values = tiles[:, 0, 0, 0].numpy()
        assert values.tolist() == list(range(start, start + len(tiles)))
        assert (tiles.numpy() == values[:, None, None, None]).all()  # whole tiles, not just corners
        seen.extend(values.tolist())
    assert seen == list(range(sum(SIZES)))
    assert not children_alive()


def _fails_on_block_5(i: int):
    if i == 5:
        raise ValueError("corrupt JPEG tile in block 5")
    return fake_read(i)


def test_a_reader_error_reaches_the_caller_with_its_type():
    with pytest.raises(ValueError, match="block 5"):
        for _ in RingLoader(_fails_on_block_5, SIZES, FIRST, PX, batch_size=4, workers=2):
            pass
    assert not children_alive()


def _dies_on_block_2(i: int):
    if i == 2:
        os._exit(3)  # as if killed: no report
    return fake_read(i)


def test_a_reader_that_dies_is_reported_not_waited_for():
    t0 = time.monotonic()
    with pytest.raises(ReaderDied, match="exit code 3"):
        for _ in RingLoader(_dies_on_block_2, SIZES, FIRST, PX, batch_size=4, workers=2, poll_s=0.2):
            pass
    assert time.monotonic() - t0 < 30
    assert not children_alive()


def test_stopping_early_stops_the_readers():
    many = FakeRead(SIZES * 20)
    batches = iter(RingLoader(many, many.sizes, many.first, PX, batch_size=2, workers=2))
    next(batches)
    assert children_alive()
    batches.close()
    assert not children_alive()


def test_a_dead_reader_is_a_weakstil_error_with_a_fix():
    from weakstil.errors import WeakstilError

    with pytest.raises(WeakstilError) as info:
        for _ in RingLoader(_dies_on_block_2, SIZES, FIRST, PX, batch_size=4, workers=1, poll_s=0.2):
            pass
    assert isinstance(info.value, ReaderDied) and "--read-workers" in info.value.fix


# --- a pool kept across runs (slides) -------------------------------------------------------------
def _read_payload(payload):
    """Payload (first row, n): n tiles holding their row numbers, like FakeRead's."""
    first, n = payload
    time.sleep(0.001 * (first % 3))
    rows = first + np.arange(n)
    return first, np.broadcast_to(rows[:, None, None, None] % 256, (n, PX, PX, 3)).astype(np.uint8)


def _run_all(pool, sizes, batch_size):
    from weakstil.embed.loader import plan_batches

    first = np.cumsum([0] + sizes[:-1]).tolist()
    payloads = list(zip(first, sizes))
    return [(start, t.numpy().copy()) for start, t in pool.run(payloads, plan_batches(sizes, batch_size), sizes, first)]


def test_a_pool_serves_several_runs_with_the_same_processes():
    from weakstil.embed.loader import RingPool, ring_rows

    with RingPool(_read_payload, PX, rows=ring_rows(5, max(SIZES)), workers=2, slots=2) as pool:
        pids = {p.pid for p in pool.procs}
        for sizes in (SIZES, SIZES[:3], [2] * 11):  # three "slides"
            batches = _run_all(pool, sizes, 5)
            rows = np.concatenate([t[:, 0, 0, 0] for _, t in batches]).tolist()
            assert rows == list(range(sum(sizes)))
            assert [s for s, _ in batches] == np.cumsum([0] + [len(t) for _, t in batches][:-1]).tolist()
        assert {p.pid for p in pool.procs} == pids and all(p.is_alive() for p in pool.procs)
    assert not children_alive()


def test_a_run_stopped_early_leaves_the_pool_clean_for_the_next():
    """Blocks still queued or being read when a slide is abandoned never land in the next slide's batches."""
    from weakstil.embed.loader import RingPool, plan_batches, ring_rows

    sizes = [4] * 40
    first = np.cumsum([0] + sizes[:-1]).tolist()
    with RingPool(_read_payload, PX, rows=ring_rows(5, max(SIZES)), workers=2, slots=3) as pool:
        run = pool.run([(f + 1000, n) for f, n in zip(first, sizes)], plan_batches(sizes, 4), sizes, first)
        next(run)
        run.close()  # abandoned with blocks in flight
        assert pool._in_flight == 0
        batches = _run_all(pool, SIZES, 5)
        assert np.concatenate([t[:, 0, 0, 0] for _, t in batches]).tolist() == list(range(sum(SIZES)))


def test_a_batch_larger_than_the_ring_is_refused():
    from weakstil.embed.loader import RingPool

    with RingPool(_read_payload, PX, rows=4, workers=1) as pool:
        assert not pool.fits(PX, 5) and pool.fits(PX, 4) and not pool.fits(PX + 1, 4)
        with pytest.raises(ValueError, match="4 rows"):
            _run_all(pool, [3, 3], 5)


def test_slide_extractor_keeps_one_reader_pool_for_every_slide(slide_folder, tmp_path):
    """Reader processes start once per run (not per slide) and give the features the in-process
    reader thread gives; each slide's stage timings and QC picture are there."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import (
        ExtractOptions,
        SlideExtractor,
        TileEmbedder,
        open_cache,
        qc_dir_for,
        slide_sources,
    )
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    sources = slide_sources([slide_folder / "a.svs", slide_folder / "sub" / "b.svs"])
    encoder = create_encoder("resnet18-random")
    spec, tissue = TileSpec(tile_px=112, mpp=1.0), TissueParams()
    features = {}
    for workers in (1, 0):
        cache = open_cache(tmp_path / f"w{workers}", encoder, spec, tissue)
        job = SlideExtractor(cache, TileEmbedder(encoder, "cpu"), spec, tissue,
                             ExtractOptions(device="cpu", batch_size=4, workers=workers, progress=False))
        pools = []
        for source in sources:
            assert job(source) > 0
            pools.append(job._pool)
            assert {"open", "mask", "blocks", "cache", "first_batch", "steady", "commit"} <= job.timings.keys()
            assert (qc_dir_for(cache.path) / f"{source.slide_id}.png").is_file()
            features[workers, source.slide_id] = cache.read(source.slide_id).features
        if workers:
            assert pools[0] is pools[1] is not None and all(p.is_alive() for p in pools[0].procs)
        else:
            assert pools == [None, None]
        job.close()
        assert not children_alive()
    for source in sources:
        np.testing.assert_array_equal(features[1, source.slide_id], features[0, source.slide_id])
