"""Reader processes that hand tiles to the encoder through one shared-memory ring.

torch's DataLoader sends every item through a fresh shared-memory segment: the worker allocates it,
copies the tiles in, passes a file descriptor; the main process maps it, copies it into the batch and
unmaps it. Every byte is page-faulted twice, and the main process does it all alone. On a 16-core GPU
machine that capped delivery at ~4,200 224-px tiles/s with 8 or 15 workers even with nothing to
decode, where the ring below delivered ~13,800 (docs/performance.md).

:class:`RingLoader` instead allocates a few batch-sized slots of shared memory once, before the
workers fork. Each worker reads a block of tiles and writes it straight into its place in a slot; only
small ``(batch, block)`` messages travel through queues. A finished slot is handed to the caller as a
tensor *view* (no copy), and goes back to the workers when the caller asks for the next batch.
With ``pin=True`` (a CUDA encoder) the ring is page-locked once (``cudaHostRegister``), so batches
go to the GPU by DMA without a staging copy.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import traceback
from collections.abc import Iterator
from typing import Callable

import numpy as np

from weakstil.errors import WeakstilError

log = logging.getLogger(__name__)


def plan_batches(block_sizes: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive blocks grouped into batches of at least ``batch_size`` tiles (the last may be smaller)."""
    batches, current, n = [], [], 0
    for i, k in enumerate(block_sizes):
        current.append(i)
        n += k
        if n >= batch_size:
            batches.append(current)
            current, n = [], 0
    if current:
        batches.append(current)
    return batches


class ReaderDied(WeakstilError, RuntimeError):
    """A reader process ended without reporting (killed, out of memory, crashed in C code)."""

    fix = ("check the slide with `weakstil check`; if memory ran out, use fewer --read-workers or a "
           "smaller --batch-size; run the command again, finished slides are kept")


MMAP_THRESHOLD_BYTES = 4 << 20  # glibc: buffers from this size up are mmapped and returned when freed
_heap_limited = False


def limit_heap_fragmentation(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep a tile reader's memory from creeping up with the number of tiles (glibc only).

    A reader allocates and frees block regions of many sizes between 1 and 32 MB. glibc serves the
    first ones from mmap, then raises its mmap threshold to the largest size freed, so later ones
    come from the heap, which fragments and is not given back. A fixed threshold (4 MiB) makes those
    buffers mmapped and returned to the OS when freed.

    Only in reader processes: in the process that runs the encoder the same setting turns every
    forward pass's activation buffers into fresh mmaps and page faults, measured 20 % slower
    extraction on 2 cores (ResNet-18, batch 32: 11.8 s against 9.6 s for 509 tiles), for about
    0.3 GB less peak RSS on a 60,000² px slide. ``MALLOC_MMAP_THRESHOLD_`` in the environment wins
    (and applies to every process). Returns whether the setting is in effect.
    """
    global _heap_limited
    if _heap_limited:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _heap_limited = bool(mallopt(m_mmap_threshold, int(threshold))) and bool(mallopt(m_trim_threshold, int(threshold)))
    return _heap_limited


def trim_heap() -> bool:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``), e.g. between slides."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _worker_loop(read: Callable, ring, tasks, results) -> None:
    """Take ``(run, batch, slot, payload, row)`` tasks, write the payload's tiles at ``ring[slot, row:]``."""
    import torch

    torch.set_num_threads(1)
    limit_heap_fragmentation()
    while True:
        task = tasks.get()
        if task is None:
            return
        gen, batch, slot, payload, row = task
        try:
            _, tiles = read(payload)
            tiles = np.asarray(tiles)
            ring[slot, row : row + len(tiles)].numpy()[...] = tiles
            results.put((gen, batch, None))
        except BaseException as exc:  # noqa: BLE001 - sent to the main process, raised there
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                import pickle

                pickle.dumps(exc)
                payload = (exc, text)
            except Exception:  # noqa: BLE001 - an exception that cannot travel travels as text
                payload = (RuntimeError(f"{type(exc).__name__}: {exc}"), text)
            results.put((gen, batch, payload))


class RingPool:
    """Reader processes and a shared-memory ring of ``slots`` batches of up to ``rows`` tiles, started
    once and used for any number of runs (:meth:`run`): a folder of small slides pays the start-up
    (fork, ring allocation, page-locking) once, not per slide.

    ``read(payload)`` returns ``(first row, tiles (k, px, px, 3))`` and runs in the forked processes;
    a run hands it one payload per block. :func:`read_block_payload` with :func:`block_payloads` reads
    any slide's blocks, each process keeping its own slide handles.
    """

    def __init__(self, read: Callable, tile_px: int, *, rows: int, workers: int, slots: int = 4,
                 poll_s: float = 1.0, pin: bool = False):
        import multiprocessing as mp

        import torch

        if workers < 1:
            raise ValueError("RingPool needs at least one worker")
        self.tile_px, self.rows, self.slots, self.workers, self.poll_s = tile_px, rows, max(2, slots), workers, poll_s
        self.ring = torch.empty((self.slots, rows, tile_px, tile_px, 3), dtype=torch.uint8).share_memory_()
        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_loop, args=(read, self.ring, self.tasks, self.results), daemon=True,
                                  name=f"weakstil-reader-{k}") for k in range(workers)]
        for p in self.procs:
            p.start()
        self.pinned = pin and _pin(self.ring)  # page-locked: copies to the GPU run at full speed, async
        self._run = 0  # generation: results of an abandoned run are told apart and dropped
        self._in_flight = 0

    def fits(self, tile_px: int, rows: int) -> bool:
        return not self.closed and tile_px == self.tile_px and rows <= self.rows

    @property
    def closed(self) -> bool:
        return self.procs is None

    def run(self, payloads: list, batches: list[list[int]], block_sizes: list[int],
            first_rows: list[int]) -> Iterator[tuple[int, object]]:
        """``(first row, ring view)`` per batch (blocks ``batches[b]``), in order; each view is valid
        until the next batch is asked for."""
        if self.closed:
            raise RuntimeError("this RingPool is closed")
        self._run += 1
        gen, slots = self._run, min(self.slots, len(batches))
        offsets = {}  # row offset of each block inside its batch
        for batch in batches:
            row = 0
            for i in batch:
                offsets[i] = row
                row += block_sizes[i]
        if max((offsets[b[-1]] + block_sizes[b[-1]] for b in batches), default=0) > self.rows:
            raise ValueError(f"a batch holds more than the ring's {self.rows} rows")

        def submit(b: int) -> None:
            for i in batches[b]:
                self.tasks.put((gen, b, b % self.slots, payloads[i], offsets[i]))
                self._in_flight += 1

        try:
            for b in range(slots):
                submit(b)
            pending = {b: len(batch) for b, batch in enumerate(batches)}
            for b, batch in enumerate(batches):
                while pending[b] > 0:
                    done_gen, done_b, error = self._result()
                    if done_gen != gen:
                        continue
                    if error is not None:
                        exc, text = error
                        log.debug("reader error in batch %d:\n%s", done_b, text)
                        raise exc
                    pending[done_b] -= 1
                n = sum(block_sizes[i] for i in batch)
                yield first_rows[batch[0]], self.ring[b % self.slots, :n]
                if b + slots < len(batches):  # the caller is done with this slot: refill it
                    submit(b + slots)
        finally:
            self._settle()

    def _result(self):
        """The next ``(run, batch, error)`` from a reader; ReaderDied when one ended without reporting."""
        while True:
            try:
                gen, batch, error = self.results.get(timeout=self.poll_s)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise ReaderDied(
                        f"tile reader {dead[0].name} stopped (exit code {dead[0].exitcode}) before it "
                        "finished its blocks; this slide's features were not written") from None
                continue
            self._in_flight -= 1
            return gen, batch, error

    def _settle(self) -> None:
        """After a run (finished or abandoned): drop the tasks not started, wait for those being
        read, so no reader still writes into the ring when the next run starts."""
        if self.closed:
            return
        try:
            while True:
                self.tasks.get_nowait()
                self._in_flight -= 1
        except (queue.Empty, OSError, ValueError):
            pass
        try:
            while self._in_flight > 0:
                self._result()
        except ReaderDied:
            pass

    def close(self) -> None:
        if self.closed:
            return
        procs, self.procs = self.procs, None
        try:
            while True:
                self.tasks.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass
        for _ in procs:
            self.tasks.put(None)
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()
        if self.pinned:
            _unpin(self.ring)
            self.pinned = False

    def __enter__(self) -> RingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ring_rows(batch_size: int, max_block_tiles: int) -> int:
    """Rows a ring slot needs: a batch closes at the block that reaches ``batch_size`` tiles."""
    return batch_size + max(0, max_block_tiles - 1)


def block_payloads(path, open_kwargs: dict, blocks, coords_l0: np.ndarray, size_l0: float, tile_px: int) -> list:
    """One self-contained task per block for :func:`read_block_payload` (its tiles' coordinates only)."""
    return [(str(path), tuple(sorted(open_kwargs.items())), int(b.index[0]), coords_l0[b.index], b.xy_l0,
             b.size_l0, size_l0, tile_px) for b in blocks]


_HANDLES: dict = {}  # reader process: (path, open kwargs) -> open slide handle (the latest few)


def read_block_payload(payload) -> tuple[int, np.ndarray]:
    """Read one :func:`block_payloads` task with this process's handle on that slide."""
    from weakstil.wsi.reader import Block, read_block_tiles
    from weakstil.wsi.slide import open_slide

    path, kwargs, first_row, coords, xy_l0, block_size_l0, size_l0, tile_px = payload
    key = (path, kwargs)
    slide = _HANDLES.get(key)
    if slide is None:
        while len(_HANDLES) >= 2:  # a run moves from slide to slide: keep the current and the next
            _HANDLES.pop(next(iter(_HANDLES))).close()
        slide = _HANDLES[key] = open_slide(path, **dict(kwargs))
    block = Block(np.arange(len(coords)), xy_l0, block_size_l0)
    return first_row, read_block_tiles(slide, block, coords, size_l0=size_l0, tile_px=tile_px)


class RingLoader:
    """``(first row, uint8 tensor (B, px, px, 3))`` batches of a block dataset, read by ``workers``
    processes into a shared-memory ring of ``slots`` batches: a :class:`RingPool` for one run.

    ``read(i)`` returns ``(first row, tiles (k_i, px, px, 3))`` for block ``i`` and must work in a
    forked process (:class:`weakstil.embed.extract.BlockDataset` opens one slide handle per process).
    ``block_sizes[i]`` is the number of tiles block ``i`` holds.

    **Each batch is a view into the ring: valid until the next one is asked for.** Copy it
    (``tensor.clone()``) to keep it longer.
    """

    def __init__(self, read: Callable[[int], tuple[int, np.ndarray]], block_sizes: list[int], first_rows: list[int],
                 tile_px: int, *, batch_size: int, workers: int, slots: int | None = None, poll_s: float = 1.0,
                 pin: bool = False):
        if workers < 1:
            raise ValueError("RingLoader needs at least one worker")
        self.read, self.block_sizes, self.first_rows = read, list(block_sizes), list(first_rows)
        self.tile_px, self.workers, self.poll_s, self.pin = tile_px, workers, poll_s, pin
        self.batches = plan_batches(self.block_sizes, batch_size)
        self.slots = max(2, min(slots or 4, len(self.batches)))  # 4: 3 batches read ahead while one is used
        self.rows = max((sum(self.block_sizes[i] for i in b) for b in self.batches), default=0)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, object]]:
        if not self.batches:
            return
        with RingPool(self.read, self.tile_px, rows=self.rows, workers=self.workers, slots=self.slots,
                      poll_s=self.poll_s, pin=self.pin) as pool:
            yield from pool.run(list(range(len(self.block_sizes))), self.batches, self.block_sizes,
                                self.first_rows)


def _pin(ring) -> bool:
    """Page-lock ``ring`` for the GPU (cudaHostRegister); False (and nothing changed) if refused."""
    import torch

    try:
        err = torch.cuda.cudart().cudaHostRegister(ring.data_ptr(), ring.numel() * ring.element_size(), 0)
    except Exception as exc:  # noqa: BLE001 - no CUDA runtime: stay pageable
        log.debug("cannot pin the reader ring: %s", exc)
        return False
    ok = int(getattr(err, "value", err)) == 0
    if not ok:
        log.debug("cudaHostRegister refused the reader ring: %s", err)
    return ok


def _unpin(ring) -> None:
    import torch

    try:
        torch.cuda.synchronize()  # no copy from the ring may still be running
        torch.cuda.cudart().cudaHostUnregister(ring.data_ptr())
    except Exception as exc:  # noqa: BLE001
        log.debug("cannot unpin the reader ring: %s", exc)
