"""Tiles → embeddings: block reading, reader processes (or a reader thread), the encoder, the cache.

Reading is the part peers get slow. Instead of one ``read_region`` per tile, tiles are grouped into
blocks of up to ``block`` × ``block`` neighbouring grid cells; each block is read once (the slide's
own JPEG tiles decoded straight into output tiles where the file allows, else one ``read_region``
per block, resized once) and cut into tiles (:mod:`weakstil.wsi.reader`). Reader processes each open
their own slide handle and write into a shared-memory ring (:mod:`weakstil.embed.loader`); on a small CPU
one reader thread in this process does it instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from weakstil.errors import ConfigError, WeakstilError
from weakstil.wsi.reader import (
    Block,
    aligned_block,
    plan_blocks,
    read_block_tiles,
)

log = logging.getLogger(__name__)


class BlockDataset:
    """Map-style dataset over the blocks of one slide; each worker opens its own slide handle.

    ``coords_l0`` must already be in block order (see :func:`plan_blocks`).
    """

    def __init__(self, path: Path, coords_l0: np.ndarray, blocks: list[Block], size_l0: float, tile_px: int,
                 open_kwargs: dict, *, slide=None):
        self.path = Path(path)
        self.coords_l0 = coords_l0
        self.blocks = blocks
        self.size_l0 = size_l0
        self.tile_px = tile_px
        self.open_kwargs = open_kwargs
        self._slide = slide  # a handle the caller opened (and closes): used in this process only
        self._pid: int | None = os.getpid() if slide is not None else None
        self._owned = slide is None

    def __len__(self) -> int:
        return len(self.blocks)

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():
            from weakstil.wsi.slide import open_slide

            self._slide = open_slide(self.path, **self.open_kwargs)
            self._pid = os.getpid()
            self._owned = True
        return self._slide

    def __getitem__(self, i: int):
        import torch

        block = self.blocks[i]
        tiles = read_block_tiles(self._handle(), block, self.coords_l0, size_l0=self.size_l0, tile_px=self.tile_px)
        return int(block.index[0]), torch.from_numpy(tiles)

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid() and self._owned:
            self._slide.close()
        self._slide = None


@dataclass
class ExtractOptions:
    """How to run the encoder: device, batch size, tile-reader processes."""

    device: str = "auto"
    batch_size: int | None = None  # None: see default_batch_size (32 on a CPU, 256 on a GPU)
    workers: int | None = None  # None: see default_workers (0 = read in this process)
    block: int = 4
    progress: bool = True
    open_kwargs: dict = field(default_factory=dict)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: see resolve_precision
    compile: bool = False  # torch.compile the encoder (first batches slower; see docs/performance.md)
    decode: str = "auto"  # auto | cpu | gpu: where JPEG tiles are decoded (see resolve_decode)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise WeakstilError("--device cuda was asked for but no CUDA GPU is visible",
                            fix="use --device cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise WeakstilError(f"unknown device {device!r}", fix="use --device auto, cpu or cuda")
    return device


def default_batch_size(device: str) -> int:
    """Tiles per forward pass: 32 on a CPU (larger batches are no faster there, and the first
    features come sooner); 256 on a GPU, where small batches leave it waiting on kernel launches."""
    return 256 if str(device).startswith("cuda") else 32


def default_workers(device: str) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.startswith("cuda"):  # decoding bounds extraction there (docs/performance.md): every
        return max(1, min(16, cpus - 1))  # core but the one feeding the GPU reads
    # On a small CPU the encoder's OpenMP threads already use every core; a reader process beside
    # them stalls their barriers (ResNet-18 on 2 cores: 0.78x the forward-only rate with one reader
    # process, 0.87-0.89x reading between batches, ~0.95x with the in-process reader thread that
    # workers=0 means).
    return 0 if cpus <= 4 else min(4, cpus // 4)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NATIVE_BF16 = frozenset({"amx_bf16", "avx512_bf16"})  # CPU flags of native bf16 arithmetic: auto picks bf16


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(precision: str, device: str) -> str:
    """The autocast dtype name for the encoder: ``fp32`` (none), ``bf16`` or ``fp16``.

    ``auto``: fp16 on a GPU; bf16 on a CPU with native bf16 arithmetic (:data:`NATIVE_BF16`: AMX
    matrix units, Sapphire Rapids and later, or AVX512-BF16 dot products, e.g. AMD Zen 4): ResNet-18
    extraction 1.5x faster on 2 Zen 4 cores, features at cosine 0.99999 with fp32 and the same
    trained-model R² (docs/performance.md); fp32 on other CPUs, where bf16 would be emulated and
    slower. fp16 is refused on a CPU.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}", fix=f"use --precision {' | '.join(PRECISIONS)}")
    cuda = str(device).startswith("cuda")
    if precision == "auto":
        return "fp16" if cuda else ("bf16" if NATIVE_BF16 & cpu_flags() else "fp32")
    if precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a GPU", fix="use --precision bf16 or fp32 on a CPU")
    return precision


def _inference_copy(encoder):
    """The module the embedder runs: a copy of ``encoder`` with the BatchNorms of its built-in
    ResNets folded into their convolutions (:func:`weakstil.embed.resnet.fold_batchnorm`: same
    features to float rounding, ~10 % faster on a CPU), or ``encoder`` itself when it holds none
    (the caller's module is never changed)."""
    import copy

    from weakstil.embed.resnet import ResNet, fold_batchnorm

    if not any(isinstance(m, ResNet) for m in encoder.modules()):
        return encoder
    return fold_batchnorm(copy.deepcopy(encoder))


class TileEmbedder:
    """An encoder on a device with its own preprocessing; uint8 tile batches → float16 features.

    ``precision``: autocast dtype (:func:`resolve_precision`); ``compile``: ``torch.compile`` the
    encoder on first use (dynamic shapes off: the last, smaller batch compiles once more).
    """

    def __init__(self, encoder, device: str, *, precision: str = "auto", compile: bool = False):
        import torch

        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval().to(memory_format=torch.channels_last)
        self.embed_dim = encoder.spec.embed_dim
        self._folded = _inference_copy(self.encoder)
        self.precision, self.compile, self._forward = "fp32", False, self._folded
        self.set_options(precision=precision, compile=compile)

    def set_options(self, *, precision: str = "auto", compile: bool = False) -> None:
        import torch

        self.precision = resolve_precision(precision, str(self.device))
        if compile != self.compile:
            self._forward = torch.compile(self._folded) if compile else self._folded
            self.compile = compile

    def __call__(self, tiles_uint8, stain=None) -> np.ndarray:
        """(B, H, W, 3) uint8 tensor → (B, D) float16 numpy (resize + normalise from the encoder spec).

        ``stain``: the slide's :class:`weakstil.embed.stain.StainEstimate`; tiles are first rendered
        with the reference stains (on the encoder's device)."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.inference_mode():
            if stain is not None:
                from weakstil.embed.stain import normalize_tiles

                tiles_uint8 = normalize_tiles(torch.as_tensor(tiles_uint8).to(self.device), stain)
            x = self.encoder.preprocess(tiles_uint8)
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats = self._forward(x)
            return feats.float().cpu().numpy().astype(np.float16)


def _thread_reader(read, n: int, depth: int = 4) -> Iterator[tuple[int, object]]:
    """``read(i)`` for i in 0..n-1 in order, run by one background thread ``depth`` items ahead.

    JPEG decoding releases the GIL, so the thread reads while the encoder runs; unlike a reader
    process it needs no inter-process copies, and on a small CPU it disturbs the encoder's OpenMP
    threads far less (ResNet-18 on 2 cores: ~0.95x forward-only vs 0.78x with a reader process).
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="weakstil-reader")
    try:
        futures = [pool.submit(read, i) for i in range(min(depth, n))]
        nxt = len(futures)
        while futures:
            item = futures.pop(0).result()
            if nxt < n:
                futures.append(pool.submit(read, nxt))
                nxt += 1
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(dataset: BlockDataset, opts: ExtractOptions, device: str, *,
                 pool=None) -> Iterator[tuple[int, object]]:
    """Yield (first row, uint8 tile tensor (B, H, W, 3)) batches of about ``batch_size`` tiles, in row order.

    Decoding on the GPU (``opts.decode``, a CUDA device, a slide with JPEG tiles): compressed tiles
    read by a thread, decoded on ``device`` (:mod:`weakstil.embed.gpu_decode`). Else ``pool`` (a
    :class:`weakstil.embed.loader.RingPool`): its reader processes, kept across slides; ``workers``
    > 0: that many reader processes for this slide; either way each batch is a view into a
    shared-memory ring, valid until the next is asked for. 0: one reader thread in this process.
    """
    import contextlib

    import torch

    from weakstil.embed.gpu_decode import gpu_batches, has_raw_path, resolve_decode
    from weakstil.embed.loader import RingLoader, block_payloads, plan_batches

    workers = opts.workers if opts.workers is not None else default_workers(device)
    workers = min(workers, len(dataset))
    batch_size = opts.batch_size or default_batch_size(device)
    sizes = [len(b.index) for b in dataset.blocks]
    first_rows = [int(b.index[0]) for b in dataset.blocks]
    if resolve_decode(opts.decode, device) == "gpu" and has_raw_path(dataset._handle(), dataset.size_l0,
                                                                     dataset.tile_px):
        yield from gpu_batches(dataset, batch_size, device, _thread_reader)
        return
    if pool is not None and workers > 0:
        payloads = block_payloads(dataset.path, dataset.open_kwargs, dataset.blocks, dataset.coords_l0,
                                  dataset.size_l0, dataset.tile_px)
        yield from pool.run(payloads, plan_batches(sizes, batch_size), sizes, first_rows)
        return
    if workers > 0:
        yield from RingLoader(dataset.__getitem__, sizes, first_rows, dataset.tile_px, batch_size=batch_size,
                              workers=workers, pin=device.startswith("cuda"))
        return
    with contextlib.closing(_thread_reader(dataset.__getitem__, len(dataset))) as blocks:  # closing stops it
        for batch in plan_batches(sizes, batch_size):  # the same grouping as the reader processes'
            items = [next(blocks) for _ in batch]
            yield items[0][0], torch.cat([t for _, t in items]) if len(items) > 1 else items[0][1]


def embed_tiles(path: Path, coords_l0: np.ndarray, blocks: list[Block], size_l0: float, tile_px: int,
                embedder: TileEmbedder, write, opts: ExtractOptions, *, advance=None, slide=None,
                pool=None, timings: dict | None = None, stain=None) -> int:
    """Embed every tile (coords in block order) and hand ``write(start_row, feats_f16)`` each batch.

    ``slide``: a handle already open on ``path`` for the reader thread (saves opening it again);
    ``pool``: reader processes kept across slides (:class:`weakstil.embed.loader.RingPool`);
    ``timings``: filled with the seconds to the first batch's features and after it; ``stain``: the
    slide's stain estimate when tiles are stain-normalised (:mod:`weakstil.embed.stain`).
    """
    import time

    dataset = BlockDataset(path, coords_l0, blocks, size_l0, tile_px, opts.open_kwargs, slide=slide)
    batches = iter_batches(dataset, opts, str(embedder.device), pool=pool)
    started = time.perf_counter()
    try:
        done = 0
        for start, tiles in batches:
            if start != done:
                raise RuntimeError(f"tile batches out of order: expected row {done}, got {start}")
            write(start, embedder(tiles, stain))
            if done == 0 and timings is not None:
                timings["first_batch"] = time.perf_counter() - started
            done += len(tiles)
            if advance is not None:
                advance(len(tiles))
    finally:
        batches.close()  # stops the reader (thread or processes) before its slide handle closes
        dataset.close()
    if timings is not None:
        timings["steady"] = time.perf_counter() - started - timings.get("first_batch", 0.0)
    return done


# --- a folder of slides → the feature cache -----------------------------------------------------
@dataclass
class SlideSource:
    """How to open one slide of a batch (picklable: it travels to worker processes)."""

    path: Path
    open_kwargs: dict

    @property
    def slide_id(self) -> str:
        from weakstil.wsi.slide import slide_id_from_path

        return slide_id_from_path(self.path)


def qc_dir_for(features_dir: Path) -> Path:
    """Where tissue-mask QC pictures go: ``<features>/qc/`` (next to the store when given a .zarr)."""
    features_dir = Path(features_dir)
    return (features_dir.parent if features_dir.suffix == ".zarr" else features_dir) / "qc"


def roi_for(roi_dir: Path | None, slide_id: str) -> Path | None:
    """``<roi_dir>/<slide_id>.geojson`` (or .json) when it exists; slides without one use all tissue."""
    if roi_dir is None:
        return None
    for suffix in (".geojson", ".json"):
        path = Path(roi_dir) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def open_cache(features_dir: Path, encoder, spec, tissue, *, create: bool = True):
    """The feature cache for this encoder and tiling (refused if the store holds another)."""
    from weakstil.embed.cache import FeatureCache

    return FeatureCache.open(features_dir, encoder.fingerprint(), spec.fingerprint(tissue), create=create)


def _slide_mpp(source: SlideSource) -> float:
    """The mpp ``source`` is read at with its options (opens the slide's metadata only)."""
    from weakstil.wsi.slide import open_slide

    with open_slide(source.path, **source.open_kwargs) as slide:
        return float(slide.mpp)


class SlideExtractor:
    """Everything one slide needs, built once per process: encoder on its device, cache, tiling,
    and what is kept from slide to slide (reader processes, the QC-picture thread).

    ``timings`` holds the last slide's seconds per stage: open, mask (thumbnail, tissue mask, grid),
    blocks, cache (the slide group), first_batch, steady (the rest of the tiles), write (inside
    steady: feature writes), commit (the group renamed into place), qc_wait (QC picture not yet
    written when the features were).
    """

    def __init__(self, cache, embedder: TileEmbedder, spec, tissue, opts: ExtractOptions, *,
                 roi_dir: Path | None = None, qc: bool = True, tiles_task=None):
        self.cache, self.embedder, self.spec, self.tissue, self.opts = cache, embedder, spec, tissue, opts
        self.roi_dir, self.qc, self.tiles_task = roi_dir, qc, tiles_task
        self._warned: set = set()  # (slide id, differences) already logged
        embedder.set_options(precision=opts.precision, compile=opts.compile)
        self.timings: dict[str, float] = {}
        self._pool = None  # RingPool, made on the first slide that reads with processes
        self._qc_thread = None
        self._finalizer = None

    def is_done(self, source: SlideSource) -> bool:
        """Whether the cache holds this slide, made from this very file, for this request: the
        store identity is the cache's own; the slide part (ROI content, mpp and its source) is
        compared here (:func:`weakstil.fingerprint.slide_differences`)."""
        from weakstil.fingerprint import slide_differences, slide_request

        attrs = self.cache.complete_attrs(source.slide_id, source=source.path)
        if attrs is None:
            return False
        request = slide_request(roi=roi_for(self.roi_dir, source.slide_id), open_kwargs=source.open_kwargs)
        diffs = slide_differences(attrs, request, resolve_mpp=lambda: _slide_mpp(source))
        if diffs and (source.slide_id, tuple(diffs)) not in self._warned:  # asked again under the lock
            self._warned.add((source.slide_id, tuple(diffs)))
            log.warning("%s: extracting again, the cached tiles were made for another request (%s)",
                        source.slide_id, "; ".join(diffs))
        return not diffs

    def reader_pool(self, tile_px: int, block: int):
        """Reader processes kept for the whole run (None when this process reads in a thread)."""
        import weakref

        from weakstil.embed.loader import RingPool, read_block_payload, ring_rows

        device = str(self.embedder.device)
        workers = self.opts.workers if self.opts.workers is not None else default_workers(device)
        if workers <= 0:
            return None
        rows = ring_rows(self.opts.batch_size or default_batch_size(device), block * block)
        if self._pool is None or not self._pool.fits(tile_px, rows):
            self.close()
            self._pool = RingPool(read_block_payload, tile_px, rows=rows, workers=workers,
                                  pin=device.startswith("cuda"))
            self._finalizer = weakref.finalize(self, self._pool.close)
        return self._pool

    def _decode_for(self, slide, size_l0: float) -> str:
        """``gpu`` when JPEG tiles are decoded on the GPU for this slide (``--decode``, CUDA, JPEG tiles)."""
        from weakstil.embed.gpu_decode import has_raw_path, resolve_decode

        if resolve_decode(self.opts.decode, str(self.embedder.device)) == "cpu":
            return "cpu"
        if has_raw_path(slide, size_l0, self.spec.tile_px):
            return "gpu"
        log.info("%s has no JPEG tiles to decode on the GPU: decoding on the CPU", slide.slide_id)
        return "cpu"

    def _stain_for(self, slide, grid, attrs: dict):
        """The slide's stain estimate when the tiling normalises stains (also into ``attrs``), else None."""
        if self.spec.stain == "none":
            return None
        from weakstil.embed.stain import estimate_slide_stain

        estimate = estimate_slide_stain(slide, grid.coords_l0, size_l0=grid.size_l0, tile_px=self.spec.tile_px)
        if estimate is None:  # a nearly blank sample: its tiles go to the encoder as they are
            log.warning("%s: too few stained pixels to estimate its stains; tiles are not stain-normalised",
                        slide.slide_id)
            attrs["stain"] = {"method": self.spec.stain, "skipped": "too few stained pixels"}
            return None
        attrs["stain"] = estimate.as_attrs()
        return estimate

    def _qc_later(self, grid, path: Path, **labels):
        """Write the QC picture (mask outline, tile grid, slide id, scale bar: ``labels`` are
        :func:`~weakstil.wsi.tissue.save_mask_qc`'s ``slide_id`` and ``mpp_thumb``) in a background
        thread (PNG encoding releases the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from weakstil.wsi.tissue import save_mask_qc

        if self._qc_thread is None:
            self._qc_thread = ThreadPoolExecutor(1, thread_name_prefix="weakstil-qc")
        return self._qc_thread.submit(save_mask_qc, grid.thumb, grid.mask, path, roi=grid.roi, grid=grid, **labels)

    def close(self) -> None:
        """Stop the reader processes and the QC thread (also done when this object is collected)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer, self._pool = None, None
        if self._qc_thread is not None:
            self._qc_thread.shutdown(wait=True)
            self._qc_thread = None

    def __call__(self, source: SlideSource) -> int:
        """Tiles → features for one slide into the cache; returns the number of tiles."""
        import time

        from weakstil.embed.loader import trim_heap
        from weakstil.errors import NoTissueError
        from weakstil.fingerprint import file_sha256
        from weakstil.wsi.slide import open_slide
        from weakstil.wsi.tiling import plan_tiles
        from weakstil.wsi.tissue import save_mask_qc

        t = self.timings = {}
        clock = [time.perf_counter()]

        def lap(stage: str) -> None:
            now = time.perf_counter()
            t[stage] = t.get(stage, 0.0) + now - clock[0]
            clock[0] = now

        roi = roi_for(self.roi_dir, source.slide_id)
        qc_done = None
        with open_slide(source.path, **source.open_kwargs) as slide:
            lap("open")
            qc_path = qc_dir_for(self.cache.path) / f"{slide.slide_id}.png"
            try:
                grid = plan_tiles(slide, self.spec, tissue=self.tissue, roi=roi)
            except NoTissueError as exc:
                if self.qc and getattr(exc, "grid", None) is not None:
                    save_mask_qc(exc.grid.thumb, exc.grid.mask, qc_path, slide_id=slide.slide_id,
                                 mpp_thumb=slide.mpp * exc.grid.mask_downsample)
                raise
            lap("mask")
            if self.qc:
                qc_done = self._qc_later(grid, qc_path, slide_id=slide.slide_id,
                                         mpp_thumb=slide.mpp * grid.mask_downsample)
            attrs = {"slide_mpp": slide.mpp, "mpp_source": slide.mpp_source, "tile_size_l0": grid.size_l0,
                     "tile_px": self.spec.tile_px, "dimensions": list(slide.dimensions),
                     "backend": slide.backend, "vendor": slide.vendor, "precision": self.embedder.precision,
                     "roi_sha256": file_sha256(roi) if roi else None}
            block = aligned_block(slide, grid.size_l0, self.spec.tile_px, block=self.opts.block)
            open_kwargs = dict(source.open_kwargs, backend=slide.backend if slide.backend != "image"
                               else source.open_kwargs.get("backend", "auto"))
            order, blocks = plan_blocks(grid.coords_l0, grid.size_l0, block=block)
            coords = grid.coords_l0[order]
            decode = self._decode_for(slide, grid.size_l0)
            opts = ExtractOptions(**{**self.opts.__dict__, "open_kwargs": open_kwargs, "decode": decode})
            pool = self.reader_pool(self.spec.tile_px, block) if decode == "cpu" else None
            attrs["decode"] = decode
            stain = self._stain_for(slide, grid, attrs)
            lap("blocks")
            try:
                with self.cache.slide_writer(source.slide_id, coords, self.embedder.embed_dim, attrs,
                                             source=source.path) as writer:
                    lap("cache")
                    write = _timed_calls(writer.write, t, "write")
                    embed_tiles(source.path, coords, blocks, grid.size_l0, self.spec.tile_px, self.embedder,
                                write, opts, advance=self.tiles_task, slide=slide if pool is None else None,
                                pool=pool, timings=t, stain=stain)
                    clock[0] = time.perf_counter()
                lap("commit")
            except BaseException:
                if qc_done is not None:
                    qc_done.exception()  # wait for the picture; this slide's own error goes on
                raise
            if qc_done is not None:
                qc_done.result()  # its error (disk full …) fails the slide like any other
                lap("qc_wait")
        trim_heap()  # a slide's freed buffers go back to the OS before the next one
        return len(coords)


def _timed_calls(fn, timings: dict, key: str):
    """``fn`` that adds the seconds spent in it to ``timings[key]``."""
    import time

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return timed


def slide_sources(paths, *, backend: str = "auto", mpp: float | None = None, mpp_override: bool = False,
                  mpp_by_slide: dict | None = None) -> list[SlideSource]:
    from weakstil.wsi.slide import open_kwargs_for

    return [SlideSource(Path(p), open_kwargs_for(p, backend=backend, mpp=mpp, mpp_override=mpp_override,
                                                 mpp_by_slide=mpp_by_slide)) for p in paths]


