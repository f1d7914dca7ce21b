"""Reduced copies of slides that lack a level near a Deep Zoom level's downsample (#13 case 4).

A 40,000 × 40,000 single-level TIFF has no reduced level, so the coarse Deep Zoom levels and the
thumbnail would each read the whole level-0 image (~5 GB RGB). Instead, the first time a coarse view
is asked for, the slide is read once in blocks of at most ``max_read_px`` × ``max_read_px`` level
pixels, each block box-reduced by a whole factor (PIL ``reduce``), and the result written as a
``.npy`` file in a cache folder (memory-mapped when read). Coarser copies are built from finer ones
in the same way, each ``16`` times smaller. Memory stays bounded by a block, not by the slide.

The cache key is the slide file's resolved path, size and mtime, so a changed file is rebuilt; files
are written under a temporary name and renamed. Nothing is written in the results folder.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MAX_READ_PX = 4096  # longest side of one read from a slide level (4096² RGBA: 64 MiB)
STEP = 16  # each cached copy is this many times coarser than the previous one
BASE_SPAN_PX = 256  # a Deep Zoom tile with its overlap: sets the finest copy, whatever asks first


def default_cache_dir() -> Path:
    """``$TMPDIR/weakstil-viewer-<uid>``: per user, outside the results folder (the viewer is read-only)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"weakstil-viewer-{uid}"


def read_side_px(slide, ds_l0: float, span_px: int) -> int:
    """Longest side (level px) of the read that covers ``span_px`` px at downsample ``ds_l0`` (a read
    never reaches past the level's own size)."""
    level = slide.best_level_for_downsample(ds_l0)
    return min(math.ceil(span_px * ds_l0 / slide.level_downsamples[level]), max(slide.level_dimensions[level]))


class ReducedLevels:
    """Box-reduced copies of slides on disk, for views too coarse for any of the slide's own levels.

    ``for_downsample(slide, ds_l0, span_px)`` gives ``None`` when a direct read of ``span_px`` px at
    that downsample stays within ``max_read_px``, else ``(array, downsample)``: an (h, w, 3) uint8
    copy of the whole slide and its level-0 px per array px, the coarsest copy with downsample ≤
    ``ds_l0``. Thread-safe; each copy is built once (``builds`` counts them, for tests).
    """

    def __init__(self, cache_dir: str | Path | None = None, *, max_read_px: int | None = None, keep: int = 8):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.max_read_px = int(max_read_px or MAX_READ_PX)
        self.builds = 0
        self.largest_read_px = 0  # longest side of any block read from a slide
        self._open: OrderedDict = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def needed(self, slide, ds_l0: float, span_px: int) -> bool:
        return read_side_px(slide, ds_l0, span_px) > self.max_read_px

    def for_downsample(self, slide, ds_l0: float, span_px: int):
        if not self.needed(slide, ds_l0, span_px):
            return None
        base = self._base_downsample(slide)
        if base is None or base > ds_l0:  # only a little too large for one read (a wider span): read it
            return None
        factor = base
        while factor * STEP <= ds_l0:
            factor *= STEP
        return self._copy(slide, factor, base), float(factor)

    def _base_downsample(self, slide) -> int | None:
        """The finest power of two at which a direct read of a Deep Zoom tile is too large (None: never)."""
        ds, largest = 1, 2 * max(slide.dimensions)
        while not self.needed(slide, ds, BASE_SPAN_PX):
            if ds > largest:
                return None
            ds *= 2
        return ds

    def _copy(self, slide, factor: int, base: int) -> np.ndarray:
        key = self._key(slide, factor)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        path = self.cache_dir / f"{key}.npy"
        if not path.is_file():
            if factor == base:
                self._build_from_slide(slide, factor, path)
            else:
                self._build_from_copy(self._copy(slide, factor // STEP, base), STEP, path)
        array = np.load(path, mmap_mode="r")
        with self._lock:
            self._open[key] = array
            while len(self._open) > self._keep:
                self._open.popitem(last=False)
        return array

    def _key(self, slide, factor: int) -> str:
        stat = os.stat(slide.path)
        text = f"{os.path.realpath(slide.path)}|{stat.st_size}|{stat.st_mtime_ns}|{factor}"
        return hashlib.sha1(text.encode()).hexdigest()[:20] + f"-x{factor}"

    def _build_from_slide(self, slide, factor: int, path: Path) -> None:
        """Read level 0 (or the slide level that fits ``factor``) block by block, reduce, write."""
        level = slide.best_level_for_downsample(factor)
        level_ds = slide.level_downsamples[level]
        step = max(1, round(factor / level_ds))  # whole-pixel box; level_ds is 1 on single-level slides
        level_w, level_h = slide.level_dimensions[level]
        block = step * max(1, self.max_read_px // step)
        log.info("%s: building a 1/%d copy for the viewer (%d × %d level-%d px)", slide.path, factor,
                 level_w, level_h, level)

        def blocks():
            for y in range(0, level_h, block):
                for x in range(0, level_w, block):
                    w, h = min(block, level_w - x), min(block, level_h - y)
                    self.largest_read_px = max(self.largest_read_px, w, h)
                    xy_l0 = (math.ceil(x * level_ds), math.ceil(y * level_ds))
                    yield x // step, y // step, slide.read_region(xy_l0, level, (w, h))

        self._write(path, (-(-level_h // step), -(-level_w // step)), blocks(), step)

    def _build_from_copy(self, source: np.ndarray, step: int, path: Path) -> None:
        height, width = source.shape[:2]
        block = step * max(1, self.max_read_px // step)

        def blocks():
            for y in range(0, height, block):
                for x in range(0, width, block):
                    yield x // step, y // step, np.asarray(source[y:y + block, x:x + block])

        self._write(path, (-(-height // step), -(-width // step)), blocks(), step)

    def _write(self, path: Path, shape: tuple[int, int], blocks, step: int) -> None:
        from weakstil.fs import atomic_path

        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(*shape, 3))
            for col, row, pixels in blocks:
                small = np.asarray(Image.fromarray(pixels).reduce(step)) if step > 1 else pixels
                out[row:row + small.shape[0], col:col + small.shape[1]] = small
            out.flush()
            del out
        self.builds += 1


def crop_resized(copy: np.ndarray, copy_ds: float, box_l0: tuple[int, int, int, int],
                 out_size: tuple[int, int]) -> np.ndarray:
    """The level-0 box ``(x0, y0, x1, y1)`` cut from a reduced copy and resized to ``out_size``."""
    x0, y0, x1, y1 = box_l0
    height, width = copy.shape[:2]
    cx0, cy0 = min(width - 1, int(x0 // copy_ds)), min(height - 1, int(y0 // copy_ds))
    cx1, cy1 = max(cx0 + 1, min(width, math.ceil(x1 / copy_ds))), max(cy0 + 1, min(height, math.ceil(y1 / copy_ds)))
    block = np.ascontiguousarray(copy[cy0:cy1, cx0:cx1])
    if (block.shape[1], block.shape[0]) == out_size:
        return block
    return np.asarray(Image.fromarray(block).resize(out_size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def thumbnail(slide, max_px: int, reduced: ReducedLevels | None) -> np.ndarray:
    """The slide's thumbnail (longer side ``max_px``), from a reduced copy when the slide has no
    level small enough to read whole (``SlideHandle.get_thumbnail`` otherwise)."""
    width, height = slide.dimensions
    ds = max(1.0, max(width, height) / max(1, int(max_px)))
    found = reduced.for_downsample(slide, ds, int(max_px)) if reduced is not None else None
    if found is None:
        return slide.get_thumbnail(max_px)
    copy, _ = found
    size = (max(1, round(width / ds)), max(1, round(height / ds)))
    image = Image.fromarray(np.ascontiguousarray(copy))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))
