"""Reading tiles fast: group neighbouring tiles into blocks, read each block once, cut it into tiles.

Peers call ``read_region`` once per tile. Here tiles are grouped into blocks of up to ``block`` ×
``block`` neighbouring grid cells (:func:`plan_blocks`, pure) and each block is read at once by
:func:`read_block_tiles`, along one of two paths:

* **Direct JPEG-tile path** (tiled TIFFs: Aperio ``.svs``, generic tiled ``.tif``). The slide's own
  compressed tiles that the block's tiles touch are read from the file with ``os.pread`` and
  decoded straight into the block, each exactly once. Where the target resolution is 2, 4 or 8
  times coarser than the pyramid level (224 px at 0.5 µm/px from a 0.25 µm/px scan), JPEG tiles are
  decoded *in the DCT domain* at 1/2, 1/4 or 1/8 scale (libjpeg-turbo through PIL's
  ``Image.draft``): as fast as a full decode, with no resize afterwards. Other ratios are decoded at
  the nearest smaller scale and resized once per block. Before a level is used, one of its tiles is
  decoded this way and compared with the backend's own ``read_region`` (:data:`CHECK_MAX_MEAN_DIFF`):
  a file whose tiles do not mean what the plain TIFF structure says (colour space, geometry) falls
  back to the next path.
* **Region path** (everything else: OpenSlide-only formats, plain images, files that fail the
  check): the block's bounding box is read with one ``read_region`` at the best level, box-reduced
  (or resized) once and cut into tiles.

Both give the same pixels up to JPEG rounding (DCT-domain scaling vs a box filter: mean absolute
difference well under 1 grey level; see tests/test_reader.py). Every process must use its own slide
handle; the direct path keeps its own file descriptor and a small cache of decoded JPEG tiles per
handle (tiles shared by neighbouring blocks are decoded once while they stay in the cache).
"""

from __future__ import annotations

import io
import math
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

JPEG = 7  # TIFF Compression tag value of "new-style" JPEG
DCT_SCALES = (8, 4, 2)  # JPEG decode scales libjpeg does in the DCT domain (1/8, 1/4, 1/2)
SCALE_TOLERANCE = 0.02  # a scale s is used when the wanted reduction r >= s * (1 - this)
CHECK_MAX_MEAN_DIFF = 2.0  # mean |direct - read_region| (grey levels) a level must stay under
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff", "generic_tiff", "generic", "tiff"})

try:  # DCT-domain downscaled decoding without PIL's per-image overhead (PIL is the fallback)
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a declared dependency; PIL does the same, slower
    _simplejpeg = None

TILE_CACHE_BYTES = 64 * 2**20  # decoded JPEG tiles kept per slide handle


@dataclass(frozen=True)
class Block:
    """Tiles read together: their indices in the slide's tile list and the block's level-0 box."""

    index: np.ndarray  # (k,) int, rows into coords_l0
    xy_l0: tuple[int, int]
    size_l0: tuple[int, int]


def plan_blocks(coords_l0: np.ndarray, size_l0: float, *, block: int = 4) -> tuple[np.ndarray, list[Block]]:
    """Group tiles into blocks of up to ``block``×``block`` grid cells (pure).

    Returns ``order`` (a permutation of the tiles: block by block, row-major inside a block) and the
    blocks, whose ``index`` are contiguous ranges of positions in ``coords_l0[order]``. Storing tiles
    in this order lets features be written as contiguous row ranges as blocks arrive.
    """
    if len(coords_l0) == 0:
        return np.zeros(0, dtype=np.int64), []
    cell_l0 = size_l0 * block
    keys = np.floor(coords_l0 / cell_l0).astype(np.int64)
    order = np.lexsort((coords_l0[:, 0], coords_l0[:, 1], keys[:, 0], keys[:, 1]))
    sorted_keys = keys[order]
    starts = np.concatenate([[0], np.flatnonzero(np.any(np.diff(sorted_keys, axis=0) != 0, axis=1)) + 1])
    ends = np.concatenate([starts[1:], [len(order)]])
    xy_sorted = coords_l0[order]
    blocks = []
    edge = int(np.ceil(size_l0))
    for start, end in zip(starts, ends):
        xy = xy_sorted[start:end]
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0) + edge
        blocks.append(Block(index=np.arange(start, end), xy_l0=(int(x0), int(y0)),
                            size_l0=(int(x1 - x0), int(y1 - y0))))
    return order, blocks


def aligned_block(slide, size_l0: float, tile_px: int, *, block: int = 4, max_block: int = 8) -> int:
    """A ``block`` for :func:`plan_blocks` whose edge falls on the slide's own tile grid, if one exists.

    With 224-px tiles at 0.5 µm/px on a 0.5 µm/px slide stored in 256-px JPEG tiles, blocks of 4
    tiles (896 px) cut through JPEG tiles, which neighbouring blocks then both decode; 8 tiles
    (1792 px = 7 JPEG tiles) do not. Returns the smallest ``n`` in ``block..max_block`` that aligns,
    else ``block``. Pure arithmetic on the handle's geometry; costs nothing when there is no direct
    path.
    """
    source = direct_source(slide)
    if source is None:
        return block
    level = slide.best_level_for_downsample(size_l0 / tile_px)
    info = source.levels.get(level)
    if info is None:
        return block
    tile_l0 = info.tile_w * slide.level_downsamples[level]
    for n in range(block, max_block + 1):
        ratio = n * size_l0 / tile_l0
        if abs(ratio - round(ratio)) < 1e-6:
            return n
    return block


def tile_offsets(xy_l0: np.ndarray, block_xy_l0: tuple[int, int], out_per_l0: float) -> np.ndarray:
    """Offsets (x, y) of tiles inside a block's resized region, in output pixels (pure)."""
    return np.round((xy_l0 - np.asarray(block_xy_l0)) * out_per_l0).astype(np.int64)


def read_block_tiles(slide, block: Block, coords_l0: np.ndarray, *, size_l0: float, tile_px: int,
                     direct: bool = True) -> np.ndarray:
    """Tiles of one block as (k, tile_px, tile_px, 3) uint8.

    ``direct=True`` decodes the slide's own JPEG tiles where the file allows (see the module
    docstring), else reads the block's region once; ``direct=False`` always reads the region.
    """
    if direct:
        tiles = read_tiles_direct(slide, coords_l0[block.index], size_l0=size_l0, tile_px=tile_px)
        if tiles is not None:
            return tiles
    return read_block_region(slide, block, coords_l0, size_l0=size_l0, tile_px=tile_px)


def read_block_region(slide, block: Block, coords_l0: np.ndarray, *, size_l0: float, tile_px: int) -> np.ndarray:
    """The region path: one ``read_region`` of the block's box at the best level, resized once, cut."""
    out_per_l0 = tile_px / size_l0
    level = slide.best_level_for_downsample(1.0 / out_per_l0)
    ds = slide.level_downsamples[level]
    w_lv = max(1, int(round(block.size_l0[0] / ds)))
    h_lv = max(1, int(round(block.size_l0[1] / ds)))
    region = slide.read_region(block.xy_l0, level, (w_lv, h_lv))
    w_out = max(1, int(round(block.size_l0[0] * out_per_l0)))
    h_out = max(1, int(round(block.size_l0[1] * out_per_l0)))
    if (w_out, h_out) != (w_lv, h_lv):
        region = _resize(region, w_out, h_out)
    offsets = tile_offsets(coords_l0[block.index], block.xy_l0, out_per_l0)
    return _cut(region, offsets, tile_px)


def read_tiles_direct(slide, coords_l0: np.ndarray, *, size_l0: float, tile_px: int) -> np.ndarray | None:
    """Tiles at ``coords_l0`` (k, 2) decoded from the slide's own compressed tiles, or None when the
    slide or the level has no direct path (then read regions instead)."""
    source = direct_source(slide)
    if source is None:
        return None
    return source.read_tiles(slide, np.asarray(coords_l0), size_l0=size_l0, tile_px=tile_px)


# --- helpers shared by both paths ---------------------------------------------------------------
def _resize(region: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(region))
    factor = int(round(image.size[0] / width))
    if factor > 1 and image.size == (width * factor, height * factor):
        image = image.reduce(factor)  # exact box filter: much faster than a general resize
    else:
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image)


def _cut(region: np.ndarray, offsets: np.ndarray, tile_px: int) -> np.ndarray:
    """(k, tile_px, tile_px, 3) crops of ``region`` at ``offsets`` (x, y); white where it ends."""
    tiles = np.empty((len(offsets), tile_px, tile_px, 3), dtype=np.uint8)
    height, width = region.shape[:2]
    for k, (ox, oy) in enumerate(offsets):
        crop = region[max(oy, 0) : oy + tile_px, max(ox, 0) : ox + tile_px]
        if crop.shape[:2] == (tile_px, tile_px):
            tiles[k] = crop
        else:
            tiles[k] = 255
            y0, x0 = max(-oy, 0), max(-ox, 0)
            tiles[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return tiles


# --- the direct path ----------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelTiles:
    """Where one pyramid level's compressed tiles are in the file and how to decode them."""

    page_index: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    across: int
    down: int
    offsets: np.ndarray
    counts: np.ndarray
    compression: int
    jpegtables: bytes | None


_SOURCES: dict[int, tuple[weakref.ref, DirectSource | None]] = {}
_SOURCES_LOCK = threading.Lock()


def direct_source(slide) -> DirectSource | None:
    """The direct reader attached to this slide handle (made on first use), or None if none applies."""
    key = id(slide)
    entry = _SOURCES.get(key)
    if entry is not None and entry[0]() is slide:
        return entry[1]
    source = DirectSource.open(slide)
    with _SOURCES_LOCK:
        try:
            ref = weakref.ref(slide)
        except TypeError:  # an object that cannot be weakly referenced: no caching, no direct path
            if source is not None:
                source.close()
            return None
        _SOURCES[key] = (ref, source)
    weakref.finalize(slide, _forget, key, source)
    return source


def _forget(key: int, source: DirectSource | None) -> None:
    with _SOURCES_LOCK:
        entry = _SOURCES.get(key)
        if entry is not None and entry[1] is source:
            del _SOURCES[key]
    if source is not None:
        source.close()


class DirectSource:
    """Decodes a tiled TIFF's own tiles for one slide handle (see the module docstring)."""

    def __init__(self, path, levels: dict[int, LevelTiles], decoders: dict[int, object]):
        self.path = path
        self.levels = levels
        self._decoders = decoders  # level -> tifffile's decode function for that page
        self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._checked: dict[tuple[int, int], bool] = {}
        self._cache: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.cache_limit = TILE_CACHE_BYTES
        self.decoded = 0  # JPEG tiles decoded (for tests and benchmarks)

    @classmethod
    def open(cls, slide) -> DirectSource | None:
        """A source for ``slide`` if it is a tiled TIFF whose levels map to tiled pages, else None."""
        path = getattr(slide, "path", None)
        if path is None or getattr(slide, "backend", None) not in ("openslide", "tiffslide"):
            return None
        vendor = (getattr(slide, "vendor", None) or "").lower()
        if vendor not in DIRECT_VENDORS:
            return None
        try:
            import tifffile

            with open(path, "rb") as fh:
                if fh.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                    return None
            tf = tifffile.TiffFile(path)
        except (ImportError, OSError, ValueError, RuntimeError):
            return None
        try:
            levels, decoders = {}, {}
            pages = list(tf.pages)
            for level, (width, height) in enumerate(slide.level_dimensions):
                match = [p for p in pages if _usable_page(p) and (p.imagewidth, p.imagelength) == (width, height)]
                if len(match) != 1:
                    continue
                page = match[0]
                across = -(-width // page.tilewidth)
                down = -(-height // page.tilelength)
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if len(offsets) != across * down:
                    continue
                levels[level] = LevelTiles(
                    page_index=page.index, width=width, height=height, tile_w=page.tilewidth,
                    tile_h=page.tilelength, across=across, down=down, offsets=offsets, counts=counts,
                    compression=int(page.compression), jpegtables=page.jpegtables or None)
                decoders[level] = page.decode
        except Exception:  # noqa: BLE001 - any surprise in a file's structure: use read_region
            tf.close()
            return None
        if not levels:
            tf.close()
            return None
        source = cls(path, levels, decoders)
        source._tiff = tf  # the decode functions refer to its pages
        return source

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._tiff.close()
        self._cache.clear()
        self._cache_bytes = 0

    # -- planning ---------------------------------------------------------------------------------
    def plan(self, slide, size_l0: float, tile_px: int) -> tuple[int, int] | None:
        """(level, DCT scale) to read ``tile_px`` tiles of ``size_l0`` level-0 px, or None."""
        downsample = size_l0 / tile_px
        level = slide.best_level_for_downsample(downsample)
        if level not in self.levels:
            return None
        wanted = downsample / slide.level_downsamples[level]  # reduction still to do after the level
        scales = [1]
        if self.levels[level].compression == JPEG:
            scales = [s for s in DCT_SCALES if wanted >= s * (1 - SCALE_TOLERANCE)
                      and self.levels[level].tile_w % s == 0 and self.levels[level].tile_h % s == 0] + [1]
        for scale in scales:
            if self._verified(slide, level, scale):
                return level, scale
        return None

    def _verified(self, slide, level: int, scale: int) -> bool:
        """Decode the level's fullest inner tile directly and via ``read_region``; do they agree?"""
        key = (level, scale)
        if key not in self._checked:
            self._checked[key] = self._check(slide, level, scale)
        return self._checked[key]

    def _check(self, slide, level: int, scale: int) -> bool:
        info = self.levels[level]
        rows, cols = np.divmod(np.arange(info.across * info.down), info.across)
        inner = ((cols + 1) * info.tile_w <= info.width) & ((rows + 1) * info.tile_h <= info.height)
        inner &= info.counts > 0
        if not inner.any():
            return False
        index = int(np.flatnonzero(inner)[np.argmax(info.counts[inner])])
        try:
            mine = self._decode(level, index, scale)
            ds = slide.level_downsamples[level]
            x_lv, y_lv = int(cols[index]) * info.tile_w, int(rows[index]) * info.tile_h
            xy_l0 = (math.ceil(x_lv * ds), math.ceil(y_lv * ds))  # floor(xy_l0 / ds) == (x_lv, y_lv)
            ref = slide.read_region(xy_l0, level, (info.tile_w, info.tile_h))
            if scale > 1:
                from PIL import Image

                ref = np.asarray(Image.fromarray(ref).reduce(scale))
        except Exception:  # noqa: BLE001 - a tile we cannot decode means: no direct path here
            return False
        if mine.shape != ref.shape:
            return False
        return float(np.abs(mine.astype(np.int16) - ref.astype(np.int16)).mean()) <= CHECK_MAX_MEAN_DIFF

    # -- decoding ---------------------------------------------------------------------------------
    def _bytes(self, info: LevelTiles, index: int) -> bytes:
        count = int(info.counts[index])
        data = os.pread(self._fd, count, int(info.offsets[index]))
        if len(data) != count:
            from weakstil.errors import TruncatedSlideError

            raise TruncatedSlideError(f"tile {index} of page {info.page_index} is cut short", path=self.path)
        return data

    def _decode(self, level: int, index: int, scale: int) -> np.ndarray:
        """One compressed tile as (tile_h / scale, tile_w / scale, 3) uint8 (white if absent)."""
        info = self.levels[level]
        shape = (info.tile_h // scale, info.tile_w // scale, 3)
        if info.counts[index] == 0:
            return np.full(shape, 255, dtype=np.uint8)
        data = self._bytes(info, index)
        if scale == 1:
            arr = self._decoders[level](data, index, jpegtables=info.jpegtables)[0]
            arr = np.asarray(arr)
            arr = arr.reshape(arr.shape[-3:])[..., :3]  # RGBA pages: alpha dropped
            if arr.shape != shape:
                raise ValueError(f"decoded tile has shape {arr.shape}, expected {shape}")
            return arr
        if info.jpegtables:
            data = merge_jpeg_tables(info.jpegtables, data)
        if _simplejpeg is not None:  # libjpeg-turbo's scaled IDCT, ~1.8x PIL's per tile, same pixels
            arr = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=shape[0], min_width=shape[1])
            if arr.shape == shape:
                return arr
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (shape[1], shape[0]))
            if image.size != (shape[1], shape[0]):
                raise ValueError(f"JPEG draft gave {image.size}, expected {(shape[1], shape[0])}")
            if image.mode != "RGB":
                image = image.convert("RGB")
            return np.asarray(image)

    def _tile(self, level: int, index: int, scale: int) -> np.ndarray:
        key = (level, scale, index)
        with self._lock:
            arr = self._cache.get(key)
            if arr is not None:
                self._cache.move_to_end(key)
                return arr
        arr = self._decode(level, index, scale)
        self.decoded += 1
        if self.cache_limit > 0:
            with self._lock:
                self._cache[key] = arr
                self._cache_bytes += arr.nbytes
                while self._cache_bytes > self.cache_limit and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._cache_bytes -= old.nbytes
        return arr

    # -- reading tiles ----------------------------------------------------------------------------
    def read_tiles(self, slide, coords_l0: np.ndarray, *, size_l0: float, tile_px: int) -> np.ndarray | None:
        """(k, tile_px, tile_px, 3) uint8 tiles at ``coords_l0``, or None if this level has no direct path."""
        plan = self.plan(slide, size_l0, tile_px)
        if plan is None:
            return None
        if len(coords_l0) == 0:
            return np.zeros((0, tile_px, tile_px, 3), dtype=np.uint8)
        level, scale = plan
        info = self.levels[level]
        unit = slide.level_downsamples[level] * scale  # level-0 px per decoded px
        span = size_l0 / unit  # tile edge in decoded px
        fx = coords_l0[:, 0] / unit
        fy = coords_l0[:, 1] / unit
        tw, th = info.tile_w // scale, info.tile_h // scale  # decoded tile size
        valid_w, valid_h = -(-info.width // scale), -(-info.height // scale)  # decoded level size
        if abs(span - tile_px) < 1e-6:
            # Decoded px are output px: copy each tile straight from the decoded JPEG tiles (one copy).
            # Tile origins on the decoded grid, as read_region + box reduce place them.
            ox, oy = np.round(fx).astype(np.int64), np.round(fy).astype(np.int64)
            decoded = self._decoded(level, scale, _tiles_touched(ox, oy, tile_px, tw, th, info.across, info.down))
            tiles = np.empty((len(ox), tile_px, tile_px, 3), dtype=np.uint8)
            for k, (x0, y0) in enumerate(zip(ox.tolist(), oy.tolist())):
                _paste(tiles[k], x0, y0, decoded, tw, th, valid_w, valid_h)
            return tiles
        # Another ratio: assemble the block's region on the decoded grid, resize it once, cut it.
        x0, y0 = math.floor(fx.min()), math.floor(fy.min())
        x1, y1 = math.ceil(fx.max() + span), math.ceil(fy.max() + span)
        decoded = self._decoded(level, scale, _tiles_touched(fx, fy, span, tw, th, info.across, info.down))
        region = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        _paste(region, x0, y0, decoded, tw, th, valid_w, valid_h)
        out_per_decoded = tile_px / span
        w_out = max(1, int(round((x1 - x0) * out_per_decoded)))
        h_out = max(1, int(round((y1 - y0) * out_per_decoded)))
        region = _resize(region, w_out, h_out)
        offsets = np.stack([np.round((fx - x0) * out_per_decoded), np.round((fy - y0) * out_per_decoded)],
                           axis=1).astype(np.int64)
        return _cut(region, offsets, tile_px)

    def _decoded(self, level: int, scale: int, needed: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
        across = self.levels[level].across
        return {(row, col): self._tile(level, row * across + col, scale) for row, col in needed}


def _paste(out: np.ndarray, x0: int, y0: int, decoded: dict, tw: int, th: int, valid_w: int, valid_h: int) -> None:
    """Fill ``out`` (h, w, 3), whose top-left is (x0, y0) on a level's decoded grid, from the decoded
    tiles ``{(row, col): (th, tw, 3)}``; white where the level ends or no tile was given."""
    height, width = out.shape[:2]
    x1, y1 = x0 + width, y0 + height
    pieces = []
    for row in range(max(y0, 0) // th, (min(y1, valid_h) - 1) // th + 1):
        for col in range(max(x0, 0) // tw, (min(x1, valid_w) - 1) // tw + 1):
            arr = decoded.get((row, col))
            if arr is None:
                continue
            gx0, gy0 = col * tw, row * th
            cx0, cy0 = max(gx0, x0), max(gy0, y0)
            cx1, cy1 = min(gx0 + tw, x1, valid_w), min(gy0 + th, y1, valid_h)
            if cx1 > cx0 and cy1 > cy0:
                pieces.append(((slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0)),
                               arr[cy0 - gy0 : cy1 - gy0, cx0 - gx0 : cx1 - gx0]))
    if sum(src.shape[0] * src.shape[1] for _, src in pieces) < width * height:
        out[...] = 255  # part of it lies outside the level (or was not decoded): white there
    for dst, src in pieces:
        out[dst] = src


def _usable_page(page) -> bool:
    """A tiled, contiguous, 8-bit RGB(A)/YCbCr page that tifffile can decode tile by tile."""
    try:
        return (bool(page.is_tiled) and page.imagedepth == 1 and page.tiledepth == 1
                and page.planarconfig == 1 and page.bitspersample == 8 and page.samplesperpixel in (3, 4)
                and int(page.photometric) in (2, 6))  # RGB, YCbCr
    except (AttributeError, TypeError, ValueError):
        return False


def _tiles_touched(x: np.ndarray, y: np.ndarray, span: float, tw: int, th: int,
                   across: int, down: int) -> list[tuple[int, int]]:
    """(row, col) of the level's ``tw``×``th`` tiles that the boxes at ``(x, y)`` of edge ``span``
    touch (all on the decoded grid of the level), in row-major order."""
    gx0 = np.floor(x / tw).astype(np.int64)
    gy0 = np.floor(y / th).astype(np.int64)
    gx1 = np.ceil((x + span) / tw).astype(np.int64)
    gy1 = np.ceil((y + span) / th).astype(np.int64)
    seen: set[tuple[int, int]] = set()
    for a, b, c, d in zip(gy0, gy1, gx0, gx1):
        for row in range(max(int(a), 0), min(int(b), down)):
            for col in range(max(int(c), 0), min(int(d), across)):
                seen.add((row, col))
    return sorted(seen)


def merge_jpeg_tables(tables: bytes, data: bytes) -> bytes:
    """A complete JPEG stream from TIFF JPEGTables (SOI … EOI) and an abbreviated tile (SOI …)."""
    if tables[:2] != b"\xff\xd8" or data[:2] != b"\xff\xd8":
        return data
    end = len(tables) - 2 if tables.endswith(b"\xff\xd9") else len(tables)
    return tables[:end] + data[2:]
