"""heatmap.tif: the prediction overlay as a pyramidal TIFF at the slide's own geometry
(:mod:`weakstil.outputs.heatmap` describes the layout and the memory it needs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from weakstil.errors import HeatmapInputError
from weakstil.fs import atomic_path
from weakstil.outputs.colors import (
    DEFAULT_CMAP,
    NO_PREDICTION_RGB,
    _cell_bounds,
    check_tiles,
    paint_tiles,
    stil_rgb,
)

TIFF_TILE_PX = 256


OVERLAY_LEVEL_FACTOR = 4


OVERLAY_SMALLEST_PX = 1024  # the TIFF's last level has its larger side ≤ this


OVERLAY_THUMB_PX = 768


# --- heatmap.tif ------------------------------------------------------------------------------
def overlay_level_sizes(width: int, height: int, *, factor: int = OVERLAY_LEVEL_FACTOR,
                        smallest_px: int = OVERLAY_SMALLEST_PX) -> list[tuple[int, int]]:
    """(w, h) of the overlay's levels: the slide's level 0, then ÷``factor`` (rounded up) until the
    larger side is ≤ ``smallest_px``. Level k has the nominal downsample ``factor ** k``."""
    sizes = [(int(width), int(height))]
    while max(sizes[-1]) > smallest_px:
        w, h = sizes[-1]
        sizes.append((-(-w // factor), -(-h // factor)))
    return sizes


def _deflate_encoder():
    """bytes-like → zlib (deflate) stream: zlib-ng through imagecodecs when present (≈3× faster)."""
    try:
        import imagecodecs
    except ImportError:  # pragma: no cover - imagecodecs is a dependency
        imagecodecs = None
    if imagecodecs is not None:
        ng = getattr(imagecodecs, "ZLIBNG", None)
        if ng is not None and getattr(ng, "available", False):
            return lambda data: imagecodecs.zlibng_encode(data, level=3)
        return lambda data: imagecodecs.zlib_encode(data, level=6)
    import zlib

    return lambda data: zlib.compress(np.ascontiguousarray(data).tobytes(), 6)


def _encoder_threads(workers: int | None) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def _page_chunks(boxes, rgb: np.ndarray, level_wh: tuple[int, int], *, encode, pool, pool_size: int,
                 shared: list[tuple[int, int]]) -> Iterator[bytes]:
    """The encoded 256-px tiles of one overlay page, row by row (see the module docstring).

    ``boxes`` = (x0, y0, x1, y1): the tiles in this level's pixels. A 256-row band is held as its
    distinct pixel rows (``rows``, one per run of rows between tile edges, ``heights`` rows each).
    Flat tiles are encoded once per colour; each repeat yields ``b""`` and is appended to ``shared``
    as (tile index, index of the tile whose bytes it reuses), to be pointed there afterwards.
    """
    T = TIFF_TILE_PX
    w, h = level_wh
    ncols, nrows = -(-w // T), -(-h // T)
    row_w = ncols * T
    x0, y0, x1, y1 = (np.asarray(b, np.int64) for b in boxes)
    x0, x1 = np.clip(x0, 0, row_w), np.clip(x1, 0, row_w)
    order = np.argsort(y0, kind="stable")
    y0_sorted = y0[order]
    span = int((y1 - y0).max()) if len(y0) else 0
    flat: dict[bytes, int] = {}  # colour -> index of the first tile of that flat colour
    white = np.array(NO_PREDICTION_RGB, np.uint8)
    for band in range(nrows):
        top, bottom = band * T, band * T + T
        lo = np.searchsorted(y0_sorted, top - span, "right")
        hi = np.searchsorted(y0_sorted, bottom, "left")
        idx = np.sort(order[lo:hi])  # original order: later tiles win where they overlap
        idx = idx[y1[idx] > top]
        cuts = np.unique(np.concatenate([[top, bottom], np.clip(y0[idx], top, bottom),
                                         np.clip(y1[idx], top, bottom)]))
        heights = np.diff(cuts)
        rows = np.empty((len(heights), row_w, 3), np.uint8)
        rows[:] = white
        ka = np.searchsorted(cuts, np.maximum(y0[idx], top)).tolist()
        kb = np.searchsorted(cuts, np.minimum(y1[idx], bottom)).tolist()
        for i, a, b, xa, xb in zip(idx.tolist(), ka, kb, x0[idx].tolist(), x1[idx].tolist()):
            rows[a:b, xa:xb] = rgb[i]
        blocks = rows.reshape(len(heights), ncols, T, 3)
        first = blocks[:1, :, :1, :]
        is_flat = (blocks == first).all(axis=(0, 2, 3))
        delta = blocks.copy()  # the TIFF horizontal predictor, per row of each tile
        np.subtract(blocks[:, :, 1:], blocks[:, :, :-1], out=delta[:, :, 1:])

        def encode_tiles(cols, delta=delta, heights=heights):
            return [encode(np.repeat(delta[:, col], heights, axis=0)) for col in cols]

        out: list[bytes | None] = [None] * ncols
        todo = []
        base = band * ncols
        for col in range(ncols):
            if not is_flat[col]:
                todo.append(col)
                continue
            key = first[0, col, 0].tobytes()
            ref = flat.get(key)
            if ref is None:
                flat[key] = base + col
                todo.append(col)
            else:
                shared.append((base + col, ref))
                out[col] = b""
        n_jobs = min(pool_size, len(todo))  # one job per thread and band: few hand-offs
        parts = [todo[k * len(todo) // n_jobs:(k + 1) * len(todo) // n_jobs] for k in range(n_jobs)]
        encoded = pool.map(encode_tiles, parts) if n_jobs > 1 else map(encode_tiles, parts)
        for col, data in zip((c for part in parts for c in part), (d for part in encoded for d in part)):
            out[col] = data
        yield from out


def _point_shared_tiles(path: Path, shared_by_page: dict[int, list[tuple[int, int]]]) -> None:
    """Point every repeated flat tile at the bytes of its first occurrence (offsets and byte counts)."""
    import tifffile

    with tifffile.TiffFile(path, mode="r+b") as tif:
        for page_index, shared in shared_by_page.items():
            if not shared:
                continue
            page = tif.pages[page_index]
            offsets = np.array(page.dataoffsets, dtype=np.int64)
            counts = np.array(page.databytecounts, dtype=np.int64)
            pairs = np.asarray(shared, dtype=np.int64)
            offsets[pairs[:, 0]] = offsets[pairs[:, 1]]
            counts[pairs[:, 0]] = counts[pairs[:, 1]]
            page.tags["TileOffsets"].overwrite(offsets.tolist())
            page.tags["TileByteCounts"].overwrite(counts.tolist())


def heatmap_tiff(slide, coords_l0, size_l0, prediction, path, *, cmap: str = DEFAULT_CMAP,
                 workers: int | None = None) -> Path:
    """Write the pyramidal TIFF overlay at the slide's geometry (Aperio-like; see the module docstring).

    Level 0 is the slide's level-0 width × height with its mpp; predicted tiles are filled with their
    exact sTIL% colour (``stil_rgb``), everything else is white. ``workers`` deflate threads (default:
    up to 4 of the CPUs this process may use). The description carries ``MPP``, ``Overlay``,
    ``SlideID``, ``SlideWidth`` and ``SlideHeight``.
    """
    import tifffile

    from weakstil.wsi.writer import APERIO_HEADER

    coords, size, pred, _ = check_tiles(coords_l0, size_l0, prediction)
    has = np.isfinite(pred)
    coords, rgb = coords[has], stil_rgb(pred[has], cmap)
    width, height = (int(v) for v in slide.dimensions)
    if width < 1 or height < 1:
        raise HeatmapInputError(f"the slide has no pixels ({width}x{height})")
    sizes = overlay_level_sizes(width, height)
    mpp = getattr(slide, "mpp", None)
    meta = f"|MPP = {mpp:.6g}" if mpp else ""
    meta += (f"|Overlay = sTIL% 0-100 {cmap}|SlideID = {str(slide.slide_id).replace('|', '_')}"
             f"|SlideWidth = {width}|SlideHeight = {height}")
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    scale = min(1.0, OVERLAY_THUMB_PX / max(width, height))
    tw, th = max(1, round(width * scale)), max(1, round(height * scale))
    thumb = np.empty((th, tw, 3), np.uint8)
    thumb[:] = NO_PREDICTION_RGB
    paint_tiles(thumb, coords, size, rgb, downsample_xy=(width / tw, height / th))
    common = {"photometric": "rgb", "metadata": None, "compression": "zlib", "predictor": True,
              "subfiletype": 0, "dtype": np.uint8}
    T = TIFF_TILE_PX
    head = f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] ({T}x{T})"
    # flat tiles are shared, so the file holds ~1 KB per tile that crosses a tile edge at most
    n_segments = sum(-(-w // T) * -(-h // T) for w, h in sizes)
    bigtiff = n_segments * 4096 > 2**31
    encode = _deflate_encoder()
    threads = _encoder_threads(workers)
    shared_by_page: dict[int, list[tuple[int, int]]] = {}
    path = Path(path)
    with atomic_path(path) as tmp:
        with ThreadPoolExecutor(threads) as pool, \
                tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for level, (lw, lh) in enumerate(sizes):
                ds = float(OVERLAY_LEVEL_FACTOR ** level)
                page_index = 0 if level == 0 else level + 1  # page 1 is the thumbnail
                shared_by_page[page_index] = []
                chunks = _page_chunks(_cell_bounds(coords, size, ds, ds), rgb, (lw, lh), encode=encode,
                                      pool=pool, pool_size=threads, shared=shared_by_page[page_index])
                if level == 0:
                    tif.write(chunks, shape=(lh, lw, 3), tile=(T, T), description=f"{head} RGB{meta}",
                              **res, **common)
                    # page 1: the stripped thumbnail that Aperio readers expect before the reduced levels
                    tif.write(thumb, description=f"{APERIO_HEADER}{width}x{height} -> {tw}x{th} - {meta}",
                              **common)
                else:
                    tif.write(chunks, shape=(lh, lw, 3), tile=(T, T), description=f"{head} -> {lw}x{lh} RGB",
                              **common)
        _point_shared_tiles(tmp, shared_by_page)
    return path
