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


def _worker_loop(read: Callable[[int], tuple[int, np.ndarray]], ring, tasks, results) -> None:
    """Take ``(batch, slot, block, row)`` tasks, write the block's tiles at ``ring[slot, row:]``."""
    import torch

    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        batch, slot, block, row = task
        try:
            _, tiles = read(block)
            tiles = np.asarray(tiles)
            ring[slot, row : row + len(tiles)].numpy()[...] = tiles
            results.put((batch, block, None))
        except BaseException as exc:  # noqa: BLE001 - sent to the main process, raised there
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                import pickle

                pickle.dumps(exc)
                payload = (exc, text)
            except Exception:  # noqa: BLE001 - an exception that cannot travel travels as text
                payload = (RuntimeError(f"{type(exc).__name__}: {exc}"), text)
            results.put((batch, block, payload))


class RingLoader:
    """``(first row, uint8 tensor (B, px, px, 3))`` batches of a block dataset, read by ``workers``
    processes into a shared-memory ring of ``slots`` batches.

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
        import multiprocessing as mp

        import torch

        if not self.batches:
            return
        ring = torch.empty((self.slots, self.rows, self.tile_px, self.tile_px, 3), dtype=torch.uint8).share_memory_()
        ctx = mp.get_context("fork" if os.name == "posix" else "spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=_worker_loop, args=(self.read, ring, tasks, results), daemon=True,
                             name=f"weakstil-reader-{k}") for k in range(self.workers)]
        for p in procs:
            p.start()
        pinned = self.pin and _pin(ring)  # page-locked: copies to the GPU run at full speed, async
        offsets = []  # row offset of each block inside its batch
        for batch in self.batches:
            row = 0
            for i in batch:
                offsets.append(row)
                row += self.block_sizes[i]
        try:
            def submit(b: int) -> None:
                for i in self.batches[b]:
                    tasks.put((b, b % self.slots, i, offsets[i]))

            for b in range(min(self.slots, len(self.batches))):
                submit(b)
            pending = {b: len(batch) for b, batch in enumerate(self.batches)}
            for b, batch in enumerate(self.batches):
                while pending[b] > 0:
                    try:
                        done_b, block, error = results.get(timeout=self.poll_s)
                    except queue.Empty:
                        dead = [p for p in procs if not p.is_alive()]
                        if dead:
                            raise ReaderDied(
                                f"tile reader {dead[0].name} stopped (exit code {dead[0].exitcode}) before "
                                "it finished its blocks; this slide's features were not written"
                            ) from None
                        continue
                    if error is not None:
                        exc, text = error
                        log.debug("reader error in block %d:\n%s", block, text)
                        raise exc
                    pending[done_b] -= 1
                n = sum(self.block_sizes[i] for i in batch)
                yield self.first_rows[batch[0]], ring[b % self.slots, :n]
                if b + self.slots < len(self.batches):  # the caller is done with this slot: refill it
                    submit(b + self.slots)
        finally:
            try:  # stopped early (an error, or the caller closed us): drop the blocks not started yet
                while True:
                    tasks.get_nowait()
            except (queue.Empty, OSError, ValueError):
                pass
            for _ in procs:
                tasks.put(None)
            for p in procs:
                p.join(timeout=5)
            for p in procs:
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            for q in (tasks, results):
                q.cancel_join_thread()
                q.close()
            if pinned:
                _unpin(ring)


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
