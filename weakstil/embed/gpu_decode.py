"""JPEG tiles decoded on the GPU: the CPU only reads the slide's compressed tiles.

On a GPU machine extraction was bound by JPEG decoding on the CPU (H200, 8 reader processes:
~5,400-5,900 tiles/s against ResNet-18's 34,000 forward-only; docs/performance.md). Here a reader
thread reads each block's compressed JPEG tiles with ``os.pread`` (:func:`weakstil.wsi.reader.read_raw_tiles`,
no decoding, a few blocks ahead), and the main thread decodes a whole batch of them in one call to
``torchvision.io.decode_jpeg(list, device="cuda")`` (nvJPEG), pastes them into each block's region,
box-reduces it to the output resolution (or resizes it for other ratios), cuts the tiles, and hands
``(B, px, px, 3)`` uint8 tiles on the GPU to the encoder, which normalises them there.

The same code runs with ``device="cpu"`` (torchvision's libjpeg decoder): that is how it is tested
without a GPU, against the CPU reader's tiles (within :data:`MAX_MEAN_DIFF` grey levels: a full
decode box-reduced on the GPU vs libjpeg's DCT-domain scaled decode on the CPU).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from weakstil.errors import ConfigError

log = logging.getLogger(__name__)

DECODES = ("auto", "cpu", "gpu")
MAX_MEAN_DIFF = 2.0  # mean |GPU path - CPU reader| in grey levels that tests accept (as reader.CHECK_MAX_MEAN_DIFF)


def resolve_decode(decode: str, device: str) -> str:
    """``cpu`` or ``gpu``: where JPEG tiles are decoded. ``auto`` is ``gpu`` with a CUDA encoder (a
    slide without JPEG tiles still decodes on the CPU), else ``cpu``."""
    if decode not in DECODES:
        raise ConfigError(f"unknown decode {decode!r}", fix=f"use --decode {' | '.join(DECODES)}")
    cuda = str(device).startswith("cuda")
    if decode == "gpu" and not cuda:
        raise ConfigError("--decode gpu needs a CUDA device", fix="use --decode auto or cpu, or --device cuda")
    return "gpu" if decode == "gpu" or (decode == "auto" and cuda) else "cpu"


def has_raw_path(slide, size_l0: float, tile_px: int) -> bool:
    """Whether this slide's tiles at this size can be read as compressed JPEG tiles."""
    from weakstil.wsi.reader import read_raw_tiles

    return read_raw_tiles(slide, np.zeros((0, 2)), size_l0=size_l0, tile_px=tile_px) is not None


def decode_raw_blocks(raws: list, device) -> object:
    """(sum k, px, px, 3) uint8 tiles on ``device`` from :class:`weakstil.wsi.reader.RawTiles` blocks;
    every JPEG tile of the batch is decoded in one ``decode_jpeg`` call."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    streams = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for raw in raws for j in raw.jpegs if j is not None]
    images = iter(decode_jpeg(streams, mode=ImageReadMode.RGB, device=device) if streams else [])
    tiles = []
    for raw in raws:
        decoded = [next(images) if j is not None else None for j in raw.jpegs]
        tiles.append(assemble_tiles(raw, decoded, device))
    return torch.cat(tiles) if len(tiles) > 1 else tiles[0]


def assemble_tiles(raw, decoded: list, device) -> object:
    """A block's tiles (k, px, px, 3) uint8 from its decoded JPEG tiles ((3, h, w) each, None = white):
    paste them into the block's region, bring it to the output resolution, cut the tiles."""
    import torch
    import torch.nn.functional as F

    px = raw.tile_px
    factor = raw.span / px  # level px per output px
    step = max(1, round(factor)) if abs(factor - round(factor)) < 1e-6 else 1  # an exact box reduce
    x0 = math.floor(raw.origins[:, 0].min() / step) * step
    y0 = math.floor(raw.origins[:, 1].min() / step) * step
    x1 = math.ceil(raw.origins[:, 0].max() + raw.span)
    y1 = math.ceil(raw.origins[:, 1].max() + raw.span)
    region = torch.full((3, y1 - y0, x1 - x0), 255, dtype=torch.uint8, device=device)
    for (row, col), image in zip(raw.touched, decoded):
        if image is None:
            continue
        gx0, gy0 = col * raw.tile_w, row * raw.tile_h
        cx0, cy0 = max(gx0, x0), max(gy0, y0)
        cx1, cy1 = min(gx0 + raw.tile_w, x1, raw.width), min(gy0 + raw.tile_h, y1, raw.height)
        if cx1 > cx0 and cy1 > cy0:
            region[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = image[:3, cy0 - gy0 : cy1 - gy0, cx0 - gx0 : cx1 - gx0]
    if step > 1:  # as PIL's reduce: the mean of each step × step box, rounded
        region = F.avg_pool2d(region[None].float(), step, ceil_mode=True)[0].round_().to(torch.uint8)
        offsets = np.round(raw.origins / step) - np.array([x0 // step, y0 // step])
    elif abs(factor - 1) < 1e-6:
        offsets = np.round(raw.origins - np.array([x0, y0]))
    else:
        out_h, out_w = max(1, round((y1 - y0) / factor)), max(1, round((x1 - x0) / factor))
        region = F.interpolate(region[None].float(), size=(out_h, out_w), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp_(0, 255).round_().to(torch.uint8)
        offsets = np.round((raw.origins - np.array([x0, y0])) / factor)
    region = F.pad(region, (0, px, 0, px), value=255)  # crops that run past the region: white there
    crops = [region[:, oy : oy + px, ox : ox + px] for ox, oy in offsets.astype(np.int64).tolist()]
    return torch.stack(crops).permute(0, 2, 3, 1)


def gpu_batches(dataset, batch_size: int, device: str, reader) -> Iterator[tuple[int, object]]:
    """``(first row, (B, px, px, 3) uint8 tiles on device)`` per batch of blocks: ``reader(read, n)``
    (a background thread) reads the compressed tiles of the next blocks while this batch decodes."""
    import contextlib

    from weakstil.embed.loader import plan_batches
    from weakstil.wsi.reader import read_raw_tiles

    slide = dataset._handle()

    def read(i: int):
        block = dataset.blocks[i]
        raw = read_raw_tiles(slide, dataset.coords_l0[block.index], size_l0=dataset.size_l0,
                             tile_px=dataset.tile_px)
        if raw is None:
            raise RuntimeError(f"{dataset.path}: no JPEG tiles to decode on the GPU")
        return int(block.index[0]), raw

    sizes = [len(b.index) for b in dataset.blocks]
    with contextlib.closing(reader(read, len(sizes))) as blocks:
        for batch in plan_batches(sizes, batch_size):
            items = [next(blocks) for _ in batch]
            yield items[0][0], decode_raw_blocks([raw for _, raw in items], device)
