"""Write Aperio-like pyramidal TIFFs that both OpenSlide and TiffSlide read (synthetic slides, tests).

Layout (see NOTES in the docs): page 0 = level 0, tiled JPEG, with an ``Aperio Image Library``
description carrying ``AppMag`` and ``MPP``; page 1 = a *stripped* thumbnail; then each reduced level
as its own tiled page (NewSubfileType 0). Always ``metadata=None`` so tifffile adds no JSON description
(with one, both readers see a single level). Resolution tags are written in px/cm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from weakstil.fs import atomic_path

APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"


def pyramid_levels(level0: np.ndarray, *, downsample: int = 4, min_px: int = 512) -> list[np.ndarray]:
    """Level 0 plus successive ``downsample``-fold reductions while the smaller side stays ≥ ``min_px``."""
    levels = [level0]
    image = Image.fromarray(level0)
    while min(image.size) // downsample >= min_px:
        image = image.reduce(downsample)
        levels.append(np.asarray(image))
    return levels


def write_aperio_tiff(
    path: str | Path,
    level0: np.ndarray,
    mpp: float | None,
    *,
    app_mag: float | None = None,
    tile_px: int = 256,
    quality: int = 90,
    downsample: int = 4,
    min_level_px: int = 512,
    thumbnail_px: int = 768,
    mpp_y: float | None = None,
    maxworkers: int | None = None,
) -> Path:
    """Write ``level0`` (H, W, 3) uint8 as an Aperio-like pyramidal JPEG TIFF.

    ``mpp=None`` writes a slide with no resolution at all (neither description nor tags), as
    some exports are. ``mpp_y`` (tags only) makes an anisotropic slide for tests.
    """
    import tifffile

    path = Path(path)
    height, width = level0.shape[:2]
    if app_mag is None and mpp is not None:
        app_mag = 40 if mpp < 0.375 else 20
    meta = ""
    if app_mag is not None:
        meta += f"|AppMag = {app_mag:g}"
    if mpp is not None:
        meta += f"|MPP = {mpp:g}"
    levels = pyramid_levels(level0, downsample=downsample, min_px=min_level_px)
    thumb = Image.fromarray(levels[-1])
    thumb.thumbnail((thumbnail_px, thumbnail_px))
    thumb_arr = np.asarray(thumb)

    def resolution_kwargs() -> dict:
        if mpp is None:
            return {}
        res_x = 1e4 / mpp
        res_y = 1e4 / (mpp_y if mpp_y is not None else mpp)
        return {"resolution": (res_x, res_y), "resolutionunit": "CENTIMETER"}

    common = {"photometric": "rgb", "metadata": None}
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
        tw.write(
            level0,
            tile=(tile_px, tile_px),
            **jpeg,
            description=f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] "
            f"({tile_px}x{tile_px}) JPEG/RGB Q={quality}{meta}",
            subfiletype=0,
            maxworkers=maxworkers,
            **resolution_kwargs(),
            **common,
        )
        tw.write(
            thumb_arr,
            **jpeg,
            description=f"{APERIO_HEADER}{width}x{height} -> {thumb_arr.shape[1]}x{thumb_arr.shape[0]} "
            f"- {meta}",
            subfiletype=0,
            **common,
        )
        for level in levels[1:]:
            h, w = level.shape[:2]
            tw.write(
                level,
                tile=(tile_px, tile_px),
                **jpeg,
                description=f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] "
                f"({tile_px}x{tile_px}) -> {w}x{h} JPEG/RGB Q={quality}",
                subfiletype=0,
                maxworkers=maxworkers,
                **common,
            )
    return path
