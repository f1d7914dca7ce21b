"""Read case: tiles/s of 224-px tiles at 0.5 µm/px, three ways, on one core, same tiles.

* **naive** — what CLAM and TRIDENT do: one OpenSlide ``read_region`` per tile at the best level,
  RGBA → RGB, resize to 224 px where the level is finer than 0.5 µm/px.
* **weakstil** — :func:`weakstil.wsi.reader.read_block_tiles` over :func:`plan_blocks` blocks, a fresh
  slide handle each run (its open and the direct path's check are counted).
* **decode bound** — imagecodecs decoding each of the TIFF's own JPEG tiles that the tiles touch,
  exactly once, plus the resize the level needs (PIL's box ``reduce``, the cheapest resize); also
  given without the resize (``decode only``), the floor no full-resolution decoder can beat.

Tiles are the slide's tissue tiles (weakstil.wsi.tiling.plan_tiles), read in block order.
"""

from __future__ import annotations

import os

import numpy as np

from .common import Row, best_of, synthetic_slide

TILE_PX = 224
TARGET_MPP = 0.5


def slide_tiles(path):
    """(coords_l0 in block order, size_l0, blocks) of the slide's tissue tiles at 224 px / 0.5 µm."""
    from weakstil.wsi.reader import aligned_block, plan_blocks
    from weakstil.wsi.slide import open_slide
    from weakstil.wsi.tiling import TileSpec, plan_tiles

    with open_slide(path) as slide:
        grid = plan_tiles(slide, TileSpec(tile_px=TILE_PX, mpp=TARGET_MPP))
        block = aligned_block(slide, grid.size_l0, TILE_PX)
    order, blocks = plan_blocks(grid.coords_l0, grid.size_l0, block=block)
    return grid.coords_l0[order], grid.size_l0, blocks


def naive_tiles(path, coords_l0: np.ndarray, size_l0: float, tile_px: int = TILE_PX):
    """Tiles as CLAM/TRIDENT read them: one ``read_region`` per tile (OpenSlide), RGBA → RGB, resize
    when the level needs it; yields (tile_px, tile_px, 3) uint8 arrays."""
    import openslide
    from PIL import Image

    osr = openslide.OpenSlide(str(path))
    try:
        level = osr.get_best_level_for_downsample(size_l0 / tile_px)
        read_px = int(round(size_l0 / osr.level_downsamples[level]))
        for x, y in coords_l0:
            image = osr.read_region((int(x), int(y)), level, (read_px, read_px)).convert("RGB")
            if read_px != tile_px:
                image = image.resize((tile_px, tile_px), Image.Resampling.BILINEAR)
            yield np.asarray(image)
    finally:
        osr.close()


def naive_loop(path, coords_l0: np.ndarray, size_l0: float, tile_px: int = TILE_PX) -> int:
    """One ``read_region`` per tile (OpenSlide), RGBA → RGB, resize when the level needs it."""
    return sum(tile.shape[0] > 0 for tile in naive_tiles(path, coords_l0, size_l0, tile_px))


def weakstil_reader(path, coords_l0: np.ndarray, size_l0: float, blocks, *, direct: bool = True,
                    backend: str = "auto") -> int:
    from weakstil.wsi.reader import read_block_tiles
    from weakstil.wsi.slide import open_slide

    n = 0
    with open_slide(path, backend=backend) as slide:
        for block in blocks:
            n += len(read_block_tiles(slide, block, coords_l0, size_l0=size_l0, tile_px=TILE_PX, direct=direct))
    return n


class DecodeBound:
    """The JPEG tiles of one level that a set of tiles touches, and their decode (+ resize)."""

    def __init__(self, path, coords_l0: np.ndarray, size_l0: float, tile_px: int = TILE_PX):
        import tifffile
        from weakstil.wsi.slide import open_slide

        with open_slide(path) as slide:
            level = slide.best_level_for_downsample(size_l0 / tile_px)
            ds = slide.level_downsamples[level]
            dims = slide.level_dimensions[level]
        self.factor = size_l0 / tile_px / ds  # resize still needed after the level
        with tifffile.TiffFile(path) as tf:
            page = next(p for p in tf.pages if p.is_tiled and (p.imagewidth, p.imagelength) == dims)
            tw, th = page.tilewidth, page.tilelength
            across = -(-page.imagewidth // tw)
            self.tables = page.jpegtables or None
            offsets, counts = page.dataoffsets, page.databytecounts
            span = size_l0 / ds
            needed = set()
            for x, y in coords_l0 / ds:
                for row in range(int(y // th), int(np.ceil((y + span) / th))):
                    for col in range(int(x // tw), int(np.ceil((x + span) / tw))):
                        needed.add(row * across + col)
        fd = os.open(path, os.O_RDONLY)
        try:
            self.chunks = [os.pread(fd, counts[i], offsets[i]) for i in sorted(needed) if counts[i]]
        finally:
            os.close(fd)
        self.tile_px = tw

    def decode(self, *, resize: bool = True) -> int:
        import imagecodecs
        from PIL import Image

        factor = int(round(self.factor))
        exact = abs(self.factor - factor) < 1e-6
        out_px = max(1, int(round(self.tile_px / self.factor)))
        for data in self.chunks:
            arr = imagecodecs.jpeg8_decode(data, tables=self.tables)
            if resize and self.factor != 1:
                image = Image.fromarray(arr)
                image = image.reduce(factor) if exact else image.resize((out_px, out_px), Image.Resampling.BILINEAR)
                np.asarray(image)
        return len(self.chunks)


def run(mode, device: str = "cpu") -> list[Row]:
    rows: list[Row] = []
    for slide_mpp in (0.25, 0.5):
        path = synthetic_slide(slide_mpp, mode.slide_um)
        coords, size_l0, blocks = slide_tiles(path)
        n = len(coords)
        bound = DecodeBound(path, coords, size_l0)
        fns = {
            "naive": lambda: naive_loop(path, coords, size_l0),
            "weakstil": lambda: weakstil_reader(path, coords, size_l0, blocks),
            "region": lambda: weakstil_reader(path, coords, size_l0, blocks, direct=False),
            "decode": lambda: bound.decode(),
            "decode_only": lambda: bound.decode(resize=False),
        }
        fns["weakstil"]()  # warm the page cache and the imports
        secs = best_of(fns, mode.read_repeats)
        rate = {k: n / v for k, v in secs.items()}
        tag = f"{slide_mpp:g} µm/px slide → 0.5 µm/px"
        common = {"tiles": n, "jpeg_tiles": len(bound.chunks), "blocks": len(blocks),
                  "seconds": {k: round(v, 4) for k, v in secs.items()}}
        primary = slide_mpp == 0.25
        rows.append(Row("read", f"weakstil reader, {tag}", rate["weakstil"], "tiles/s",
                        "naive read_region loop", rate["naive"], rate["weakstil"] / rate["naive"],
                        "≥ 2×" if primary else "", (rate["weakstil"] / rate["naive"] >= 2) if primary else None,
                        extra=common))
        bound_ratio = rate["weakstil"] / rate["decode"]
        rows.append(Row("read", f"weakstil reader vs decode bound, {tag}", rate["weakstil"], "tiles/s",
                        "imagecodecs decode" + (" + reduce" if bound.factor != 1 else ""), rate["decode"],
                        bound_ratio, "≥ 0.67× (within 1.5×)" if primary else "",
                        (bound_ratio >= 1 / 1.5) if primary else None))
        if bound.factor != 1:
            rows.append(Row("read", f"weakstil reader vs decode only (no resize), {tag}", rate["weakstil"],
                            "tiles/s", "imagecodecs decode only", rate["decode_only"],
                            rate["weakstil"] / rate["decode_only"]))
        rows.append(Row("read", f"weakstil region path (read_region per block), {tag}", rate["region"],
                        "tiles/s", "naive read_region loop", rate["naive"], rate["region"] / rate["naive"]))
    return rows
