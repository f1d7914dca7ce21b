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
