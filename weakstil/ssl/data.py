"""Random tissue tiles streamed from every slide, through the same tissue mask, ROI and TileSpec as
extraction, and the same fast reader — no tiles are written to disk.

:func:`plan_pretrain_tiles` runs the tissue mask and tile grid of each slide once (a thumbnail per
slide, a second or so). :class:`RandomTileStream` then yields uint8 batches (B, tile_px, tile_px, 3)
forever: each round draws up to ``tiles_per_slide`` random tiles from *every* slide, shuffles them
across slides and reads each batch slide by slide (the slide's own JPEG tiles decoded directly where
the file allows: :func:`weakstil.wsi.reader.read_tiles_direct`). Every loader worker and every DDP
rank draws from its own random stream, seeded from (seed, rank, worker, the step it starts at), so a
resumed run does not replay the tiles it has already seen.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weakstil.errors import NoPretrainTilesError, WeakstilError

log = logging.getLogger(__name__)

MAX_OPEN_SLIDES = 16  # slide handles kept open per loader process


@dataclass(frozen=True)
class SlideTiles:
    """The tissue tiles of one slide: how to open it, their level-0 corners, their edge in level 0."""

    path: Path
    open_kwargs: dict
    coords_l0: np.ndarray  # (N, 2) int32 (x, y)
    size_l0: float
    stain: object = None  # its weakstil.embed.stain.StainEstimate when tiles are stain-normalised

    @property
    def slide_id(self) -> str:
        from weakstil.wsi.slide import slide_id_from_path

        return slide_id_from_path(self.path)


def plan_pretrain_tiles(sources, spec, tissue, *, roi_dir: Path | None = None) -> tuple[list[SlideTiles], dict]:
    """Tissue tiles of every slide in ``sources`` (:class:`weakstil.embed.extract.SlideSource`).

    Returns (slides with tiles, {slide_id: why it was skipped}). A slide that cannot be opened or has
    no tissue is skipped and reported, as a batch would; no usable slide at all is an error.
    """
    from weakstil.embed.extract import roi_for
    from weakstil.wsi.slide import open_slide
    from weakstil.wsi.tiling import plan_tiles

    planned, skipped = [], {}
    for source in sources:
        try:
            with open_slide(source.path, **source.open_kwargs) as slide:
                grid = plan_tiles(slide, spec, tissue=tissue, roi=roi_for(roi_dir, source.slide_id))
                backend = slide.backend if slide.backend != "image" else source.open_kwargs.get("backend", "auto")
                stain = _slide_stain(slide, grid, spec) if spec.stain != "none" else None
        except WeakstilError as exc:  # unreadable, no mpp, no tissue …: skip it, say why
            skipped[source.slide_id] = str(exc).splitlines()[0]
            log.warning("pretrain: skipping %s: %s", source.slide_id, skipped[source.slide_id])
            continue
        open_kwargs = dict(source.open_kwargs, backend=backend)
        planned.append(SlideTiles(Path(source.path), open_kwargs, grid.coords_l0, float(grid.size_l0), stain))
    if not planned:
        raise NoPretrainTilesError(f"none of the {len(sources)} slides has usable tissue tiles"
                                   + (f" ({'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})"
                                      if skipped else ""))
    return planned, skipped


def _slide_stain(slide, grid, spec):
    """The slide's stain estimate, the same as extraction's (None, with a warning, when its tiles
    hold too few stained pixels)."""
    from weakstil.embed.stain import estimate_slide_stain

    estimate = estimate_slide_stain(slide, grid.coords_l0, size_l0=float(grid.size_l0), tile_px=spec.tile_px)
    if estimate is None:
        log.warning("pretrain: %s has too few stained pixels to estimate its stains; its tiles are used as they are",
                    slide.slide_id)
    return estimate


def read_tiles_at(slide, coords_l0: np.ndarray, *, size_l0: float, tile_px: int) -> np.ndarray:
    """Tiles at arbitrary (not neighbouring) corners → (k, tile_px, tile_px, 3) uint8.

    The direct JPEG path reads any set of tiles at once; otherwise each tile is its own one-tile block
    (a block of scattered tiles would read their whole bounding box).
    """
    from weakstil.wsi.reader import Block, read_block_region, read_tiles_direct

    tiles = read_tiles_direct(slide, coords_l0, size_l0=size_l0, tile_px=tile_px)
    if tiles is not None:
        return tiles
    edge = int(np.ceil(size_l0))
    out = np.empty((len(coords_l0), tile_px, tile_px, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(np.asarray(coords_l0)):
        block = Block(index=np.array([i]), xy_l0=(int(x), int(y)), size_l0=(edge, edge))
        out[i] = read_block_region(slide, block, coords_l0, size_l0=size_l0, tile_px=tile_px)[0]
    return out


@functools.cache
def _stream_class():
    import torch

    class RandomTileStream(torch.utils.data.IterableDataset):
        """Endless uint8 batches (B, tile_px, tile_px, 3) of random tissue tiles from every slide."""

        def __init__(self, slides: list[SlideTiles], *, tile_px: int, batch_size: int, tiles_per_slide: int = 256,
                     seed: int = 0, rank: int = 0, start_step: int = 0):
            super().__init__()
            if batch_size < 1 or tiles_per_slide < 1:
                raise ValueError("batch_size and tiles_per_slide must be ≥ 1")
            self.slides, self.tile_px, self.batch_size = list(slides), int(tile_px), int(batch_size)
            self.tiles_per_slide, self.seed, self.rank, self.start_step = tiles_per_slide, seed, rank, start_step
            self._handles: OrderedDict = OrderedDict()

        def _rng(self) -> np.random.Generator:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else 0
            return np.random.default_rng([self.seed, self.rank, worker, self.start_step])

        def rounds(self, rng: np.random.Generator):
            """Endless (slide index, tile index) arrays: one round = every slide's share, shuffled."""
            while True:
                picks = []
                for s, slide in enumerate(self.slides):
                    n = len(slide.coords_l0)
                    k = min(n, self.tiles_per_slide)
                    picks.append(np.stack([np.full(k, s), rng.choice(n, size=k, replace=False)], axis=1))
                pairs = np.concatenate(picks)
                yield pairs[rng.permutation(len(pairs))]

        def __iter__(self):
            rng = self._rng()
            pending = np.zeros((0, 2), dtype=np.int64)
            try:
                for pairs in self.rounds(rng):
                    pending = np.concatenate([pending, pairs])
                    while len(pending) >= self.batch_size:
                        batch, pending = pending[: self.batch_size], pending[self.batch_size:]
                        yield torch.from_numpy(self.read(batch))
            finally:
                self.close()

        def read(self, pairs: np.ndarray) -> np.ndarray:
            """Read the (slide, tile) ``pairs`` into one array, one reader call per slide."""
            out = np.empty((len(pairs), self.tile_px, self.tile_px, 3), dtype=np.uint8)
            for s in np.unique(pairs[:, 0]):
                rows = np.flatnonzero(pairs[:, 0] == s)
                slide = self.slides[int(s)]
                tiles = read_tiles_at(self._handle(int(s)), slide.coords_l0[pairs[rows, 1]],
                                      size_l0=slide.size_l0, tile_px=self.tile_px)
                if slide.stain is not None:
                    from weakstil.embed.stain import normalize_tiles

                    tiles = normalize_tiles(torch.from_numpy(tiles), slide.stain).numpy()
                out[rows] = tiles
            return out

        def _handle(self, s: int):
            from weakstil.wsi.slide import open_slide

            key = (os.getpid(), s)
            if key not in self._handles:
                if len(self._handles) >= MAX_OPEN_SLIDES:
                    self._handles.popitem(last=False)[1].close()
                slide = self.slides[s]
                self._handles[key] = open_slide(slide.path, **slide.open_kwargs)
            self._handles.move_to_end(key)
            return self._handles[key]

        def close(self) -> None:
            for (pid, _), handle in list(self._handles.items()):
                if pid == os.getpid():
                    handle.close()
            self._handles.clear()

        def __getstate__(self):  # handles stay in the process that opened them
            return {**self.__dict__, "_handles": OrderedDict()}

    RandomTileStream.__module__, RandomTileStream.__qualname__ = __name__, "RandomTileStream"
    return RandomTileStream


def __getattr__(name: str):
    if name == "RandomTileStream":  # built on first use: importing this module does not import torch
        return _stream_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tile_loader(slides: list[SlideTiles], *, tile_px: int, batch_size: int, workers: int, device: str,
                seed: int = 0, rank: int = 0, start_step: int = 0, tiles_per_slide: int = 256):
    """A DataLoader over :class:`RandomTileStream` (batches made by the stream; ``workers`` processes)."""
    import torch

    stream = _stream_class()(slides, tile_px=tile_px, batch_size=batch_size, tiles_per_slide=tiles_per_slide,
                             seed=seed, rank=rank, start_step=start_step)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                       pin_memory=str(device).startswith("cuda"),
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
