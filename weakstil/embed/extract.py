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

from weakstil.errors import WeakstilError
from weakstil.wsi.reader import (  # noqa: F401
    Block,
    aligned_block,
    plan_blocks,
    read_block_tiles,
    tile_offsets,
)

log = logging.getLogger(__name__)


class BlockDataset:
    """Map-style dataset over the blocks of one slide; each worker opens its own slide handle.

    ``coords_l0`` must already be in block order (see :func:`plan_blocks`).
    """

    def __init__(self, path: Path, coords_l0: np.ndarray, blocks: list[Block], size_l0: float, tile_px: int,
                 open_kwargs: dict):
        self.path = Path(path)
        self.coords_l0 = coords_l0
        self.blocks = blocks
        self.size_l0 = size_l0
        self.tile_px = tile_px
        self.open_kwargs = open_kwargs
        self._slide = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():
            from weakstil.wsi.slide import open_slide

            self._slide = open_slide(self.path, **self.open_kwargs)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int):
        import torch

        block = self.blocks[i]
        tiles = read_block_tiles(self._handle(), block, self.coords_l0, size_l0=self.size_l0, tile_px=self.tile_px)
        return int(block.index[0]), torch.from_numpy(tiles)

    def close(self) -> None:
        if self._slide is not None and self._pid == os.getpid():
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


class TileEmbedder:
    """An encoder on a device with its own preprocessing; uint8 tile batches → float16 features."""

    def __init__(self, encoder, device: str):
        import torch

        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval().to(memory_format=torch.channels_last)
        self.embed_dim = encoder.spec.embed_dim

    def __call__(self, tiles_uint8) -> np.ndarray:
        """(B, H, W, 3) uint8 tensor → (B, D) float16 numpy (resize + normalise from the encoder spec)."""
        import torch

        cuda = self.device.type == "cuda"
        with torch.inference_mode():
            x = self.encoder.preprocess(tiles_uint8)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                feats = self.encoder(x)
            return feats.float().cpu().numpy().astype(np.float16)


def _thread_reader(dataset: BlockDataset, depth: int = 4) -> Iterator[tuple[int, object]]:
    """Blocks in order, read by one background thread ``depth`` blocks ahead of the consumer.

    JPEG decoding releases the GIL, so the thread reads while the encoder runs; unlike a reader
    process it needs no inter-process copies, and on a small CPU it disturbs the encoder's OpenMP
    threads far less (ResNet-18 on 2 cores: ~0.95x forward-only vs 0.78x with a reader process).
    """
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="weakstil-reader")
    try:
        futures = [pool.submit(dataset.__getitem__, i) for i in range(min(depth, len(dataset)))]
        nxt = len(futures)
        while futures:
            item = futures.pop(0).result()
            if nxt < len(dataset):
                futures.append(pool.submit(dataset.__getitem__, nxt))
                nxt += 1
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def iter_batches(dataset: BlockDataset, opts: ExtractOptions, device: str) -> Iterator[tuple[int, object]]:
    """Yield (first row, uint8 tile tensor (B, H, W, 3)) batches of about ``batch_size`` tiles, in row order.

    ``workers`` > 0: that many reader processes writing into a shared-memory ring
    (:class:`weakstil.embed.loader.RingLoader`); each batch is then a view, valid until the next is asked
    for. 0: one reader thread in this process.
    """
    import contextlib

    import torch

    from weakstil.embed.loader import RingLoader, plan_batches

    workers = opts.workers if opts.workers is not None else default_workers(device)
    workers = min(workers, len(dataset))
    batch_size = opts.batch_size or default_batch_size(device)
    sizes = [len(b.index) for b in dataset.blocks]
    if workers > 0:
        yield from RingLoader(dataset.__getitem__, sizes, [int(b.index[0]) for b in dataset.blocks],
                              dataset.tile_px, batch_size=batch_size, workers=workers,
                              pin=device.startswith("cuda"))
        return
    with contextlib.closing(_thread_reader(dataset)) as blocks:  # closing it stops the thread
        for batch in plan_batches(sizes, batch_size):  # the same grouping as the reader processes'
            items = [next(blocks) for _ in batch]
            yield items[0][0], torch.cat([t for _, t in items]) if len(items) > 1 else items[0][1]


def embed_tiles(path: Path, coords_l0: np.ndarray, blocks: list[Block], size_l0: float, tile_px: int,
                embedder: TileEmbedder, write, opts: ExtractOptions, *, advance=None) -> int:
    """Embed every tile (coords in block order) and hand ``write(start_row, feats_f16)`` each batch."""
    dataset = BlockDataset(path, coords_l0, blocks, size_l0, tile_px, opts.open_kwargs)
    batches = iter_batches(dataset, opts, str(embedder.device))
    try:
        done = 0
        for start, tiles in batches:
            if start != done:
                raise RuntimeError(f"tile batches out of order: expected row {done}, got {start}")
            write(start, embedder(tiles))
            done += len(tiles)
            if advance is not None:
                advance(len(tiles))
    finally:
        batches.close()  # stops the reader (thread or processes) before its slide handle closes
        dataset.close()
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


@dataclass
class ExtractResult:
    cache: object  # FeatureCache
    outcomes: list
    n_tiles: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]


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


class SlideExtractor:
    """Everything one slide needs, built once per process: encoder on its device, cache, tiling."""

    def __init__(self, cache, embedder: TileEmbedder, spec, tissue, opts: ExtractOptions, *,
                 roi_dir: Path | None = None, qc: bool = True, tiles_task=None):
        self.cache, self.embedder, self.spec, self.tissue, self.opts = cache, embedder, spec, tissue, opts
        self.roi_dir, self.qc, self.tiles_task = roi_dir, qc, tiles_task

    def is_done(self, source: SlideSource) -> bool:
        return self.cache.is_complete(source.slide_id, source=source.path)

    def __call__(self, source: SlideSource) -> int:
        """Tiles → features for one slide into the cache; returns the number of tiles."""
        import hashlib

        from weakstil.errors import NoTissueError
        from weakstil.wsi.slide import open_slide
        from weakstil.wsi.tiling import plan_tiles
        from weakstil.wsi.tissue import save_mask_qc

        roi = roi_for(self.roi_dir, source.slide_id)
        with open_slide(source.path, **source.open_kwargs) as slide:
            try:
                grid = plan_tiles(slide, self.spec, tissue=self.tissue, roi=roi)
            except NoTissueError as exc:
                if self.qc and getattr(exc, "grid", None) is not None:
                    save_mask_qc(exc.grid.thumb, exc.grid.mask, qc_dir_for(self.cache.path) / f"{slide.slide_id}.png")
                raise
            if self.qc:
                save_mask_qc(grid.thumb, grid.mask, qc_dir_for(self.cache.path) / f"{slide.slide_id}.png",
                             roi=grid.roi)
            attrs = {"slide_mpp": slide.mpp, "mpp_source": slide.mpp_source, "tile_size_l0": grid.size_l0,
                     "tile_px": self.spec.tile_px, "dimensions": list(slide.dimensions),
                     "backend": slide.backend, "vendor": slide.vendor,
                     "roi_sha256": hashlib.sha256(roi.read_bytes()).hexdigest() if roi else None}
            block = aligned_block(slide, grid.size_l0, self.spec.tile_px, block=self.opts.block)
            open_kwargs = dict(source.open_kwargs, backend=slide.backend if slide.backend != "image"
                               else source.open_kwargs.get("backend", "auto"))
        order, blocks = plan_blocks(grid.coords_l0, grid.size_l0, block=block)
        coords = grid.coords_l0[order]
        opts = ExtractOptions(**{**self.opts.__dict__, "open_kwargs": open_kwargs})
        with self.cache.slide_writer(source.slide_id, coords, self.embedder.embed_dim, attrs,
                                     source=source.path) as writer:
            embed_tiles(source.path, coords, blocks, grid.size_l0, self.spec.tile_px, self.embedder,
                        writer.write, opts, advance=self.tiles_task)
        return len(coords)


def slide_sources(paths, *, backend: str = "auto", mpp: float | None = None, mpp_override: bool = False,
                  mpp_by_slide: dict | None = None) -> list[SlideSource]:
    from weakstil.wsi.slide import open_kwargs_for

    return [SlideSource(Path(p), open_kwargs_for(p, backend=backend, mpp=mpp, mpp_override=mpp_override,
                                                 mpp_by_slide=mpp_by_slide)) for p in paths]


def extract_slides(sources: list[SlideSource], features_dir: Path, *, encoder, spec, tissue,
                   opts: ExtractOptions | None = None, roi_dir: Path | None = None, qc: bool = True,
                   lock: bool = True, on_outcome=None) -> ExtractResult:
    """Fill the feature cache for every slide; finished slides are skipped, bad ones recorded.

    ``encoder`` is an Encoder from :func:`weakstil.embed.encoders.create_encoder`. One slide's failure
    never stops the others: each gets an Outcome (done / skipped / failed with reason and fix).
    """
    import time

    from weakstil.runs.runner import run_batch

    opts = opts or ExtractOptions()
    device = resolve_device(opts.device)
    cache = open_cache(features_dir, encoder, spec, tissue)
    embedder = TileEmbedder(encoder, device)
    started = time.perf_counter()
    with _progress(opts.progress) as progress:
        slides_task = progress.add_task("slides", total=len(sources), unit="slides")
        tiles_task = progress.add_task("tiles", total=None, unit="tiles")
        job = SlideExtractor(cache, embedder, spec, tissue, opts, roi_dir=roi_dir, qc=qc,
                             tiles_task=lambda n: progress.update(tiles_task, advance=n))

        def record(outcome):
            progress.update(slides_task, advance=1)
            if on_outcome is not None:
                on_outcome(outcome)

        outcomes = run_batch(sources, job, key=lambda s: s.slide_id, is_done=job.is_done, desc="extract",
                             lock_dir=cache.path / ".locks" if lock else None, progress=False,
                             on_outcome=record)
    n_tiles = sum(int(o.result or 0) for o in outcomes if o.status == "done")
    return ExtractResult(cache, outcomes, n_tiles, time.perf_counter() - started)


def _progress(enabled: bool):
    """A rich progress display with one line per task: count, rate in its unit, elapsed time."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            unit = task.fields.get("unit", "it")
            if task.speed is None:
                return Text(f"– {unit}/s")
            return Text(f"{task.speed:,.1f} {unit}/s" if task.speed < 10 else f"{task.speed:,.0f} {unit}/s")

    return Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)
