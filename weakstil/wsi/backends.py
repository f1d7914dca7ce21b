"""Backend readers behind :class:`weakstil.wsi.slide.SlideHandle`, and TIFF diagnostics.

Each reader exposes ``name``, ``vendor``, ``objective_power``, ``level_dimensions``,
``level_downsamples``, ``stated_mpp()``, ``read(level, x_lv, y_lv, w, h)`` (an in-bounds block of
level pixels as uint8 RGB) and ``close()``. Kept apart from slide.py so that each stays small.
"""

from __future__ import annotations

import functools
import logging
import math
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from weakstil.errors import (
    CorruptSlideError,
    NotASlideError,
    TruncatedSlideError,
    UnsupportedFormatError,
)

TAG_MPP_RANGE = (0.01, 20.0)  # µm/px from TIFF resolution tags outside this are display dpi, not a scan


@functools.cache
def openslide_module():
    """The openslide module, or None when it (or its shared library) is not available."""
    try:
        import openslide
    except (ImportError, OSError):
        return None
    return openslide


def read_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a backend raises on undecodable or missing data (imagecodecs errors are RuntimeErrors)."""
    import tifffile

    errors: tuple[type[BaseException], ...] = (tifffile.TiffFileError, RuntimeError, OSError, ValueError,
                                               struct.error, EOFError)
    openslide = openslide_module()
    if openslide is not None:
        errors += (openslide.OpenSlideError,)
    return errors


def damaged_file_error(path: Path, exc: BaseException, doing: str) -> Exception:
    """TruncatedSlideError when the TIFF refers past its end, else CorruptSlideError."""
    detail = f"{type(exc).__name__}: {exc}".strip()
    try:
        truncation = tiff_truncation(path)
    except (OSError, ValueError, struct.error):  # tifffile.TiffFileError is a ValueError
        truncation = None
    if truncation or "truncated" in str(exc).lower():
        return TruncatedSlideError(f"the file ends early ({truncation or detail}) — failed {doing}", path=path)
    return CorruptSlideError(f"cannot decode the image data ({detail}) — failed {doing}", path=path)


# --- TIFF structure ---------------------------------------------------------------------------
@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Silence tifffile's log (it logs 'invalid page offset' as an error) while we diagnose the file."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tiff_structure(path: str | Path) -> None:
    """Raise TruncatedSlideError if a TIFF refers to bytes past its end, CorruptSlideError if unreadable."""
    import tifffile

    path = Path(path)
    try:
        problem = tiff_truncation(path)
    except (tifffile.TiffFileError, struct.error, ValueError, OSError) as exc:
        raise damaged_file_error(path, exc, "reading the TIFF structure") from exc
    if problem:
        raise TruncatedSlideError(f"the file ends early: {problem}", path=path)


def tiff_truncation(path: str | Path) -> str | None:
    """Describe how a TIFF is cut short (an IFD or image data past the end of file), or None."""
    import tifffile

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(16)
    first_ifd = _first_ifd_offset(head)
    if first_ifd is None:
        return f"the TIFF header is incomplete ({size} bytes)"
    if first_ifd >= size:
        return f"the first directory is at byte {first_ifd} but the file has {size} bytes"
    with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
        pages = list(tf.pages)
        for page in pages:
            offsets, counts = page.dataoffsets, page.databytecounts
            if len(offsets):
                end = max(o + c for o, c in zip(offsets, counts))
                if end > size:
                    return f"page {page.index} needs bytes up to {end} but the file has {size} bytes"
        if pages and not tf.tiff.is_ndpi:
            nxt = _next_ifd_offset(tf, pages[-1].offset)
            if nxt >= size:
                return f"the next directory is at byte {nxt} but the file has {size} bytes"
    return None


def _first_ifd_offset(head: bytes) -> int | None:
    order = "<" if head[:2] == b"II" else ">"
    if len(head) >= 8 and head[2:4] in (b"*\x00", b"\x00*"):
        return struct.unpack(order + "I", head[4:8])[0]
    if len(head) >= 16 and head[2:4] in (b"+\x00", b"\x00+"):
        return struct.unpack(order + "Q", head[8:16])[0]
    return None


def _next_ifd_offset(tf, ifd_offset: int) -> int:
    """The 'next IFD' pointer stored after the directory at ``ifd_offset`` (0 at the last page)."""
    fmt = tf.tiff
    fh = tf.filehandle
    fh.seek(ifd_offset)
    (n_tags,) = struct.unpack(fmt.byteorder + fmt.tagnoformat[-1], fh.read(fmt.tagnosize))
    fh.seek(ifd_offset + fmt.tagnosize + n_tags * fmt.tagsize)
    raw = fh.read(fmt.offsetsize)
    if len(raw) < fmt.offsetsize:
        return tf.filehandle.size  # the pointer itself is cut off
    return struct.unpack(fmt.byteorder + fmt.offsetformat[-1], raw)[0]


# --- resolution -------------------------------------------------------------------------------
def parse_positive(value: Any) -> float | None:
    """A finite positive float, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def mpp_from_tiff(path: str | Path) -> tuple[tuple[float, float] | None, str | None]:
    """((mpp_x, mpp_y), source) from the TIFF itself, the file opened once: an OME-TIFF's OME-XML
    (``"ome-xml"``), else page 0's resolution tags (``"tiff-tags"``); (None, None) when neither states
    one — also for values outside TAG_MPP_RANGE (72 or 96 dpi written by image software is a display
    setting, not a scan resolution)."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
            found = [(_ome_mpp(tf.ome_metadata if tf.is_ome else None), "ome-xml"),
                     (_tag_mpp(tf), "tiff-tags")]
    except (tifffile.TiffFileError, OSError, ValueError, struct.error):
        return None, None
    for mpp_xy, source in found:
        if mpp_xy is not None and all(TAG_MPP_RANGE[0] <= v <= TAG_MPP_RANGE[1] for v in mpp_xy):
            return mpp_xy, source
    return None, None


def _tag_mpp(tf) -> tuple[float, float] | None:
    """Page 0's X/YResolution and ResolutionUnit (cm or inch); None for a missing or NONE unit."""
    import tifffile

    tags = tf.pages.first.tags
    unit, x_res, y_res = tags.get("ResolutionUnit"), tags.get("XResolution"), tags.get("YResolution")
    if unit is None or x_res is None or y_res is None:
        return None
    um_per_unit = {tifffile.RESUNIT.CENTIMETER: 1e4, tifffile.RESUNIT.INCH: 25400.0}.get(unit.value)
    rx, ry = (_fraction(r.value) for r in (x_res, y_res))
    return (um_per_unit / rx, um_per_unit / ry) if um_per_unit and rx and ry else None


# OME length units (UnitsLength) in µm; the OME default is µm
_OME_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    """``PhysicalSizeX/Y`` (with their units) of the largest image in the OME-XML: not a label or
    macro image; None when absent, not a number, or in a unit that is no length."""
    import xml.etree.ElementTree as ET

    if not xml:
        return None
    try:
        pixels = [e for e in ET.fromstring(xml).iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"]
        main = max(pixels, key=lambda e: float(e.get("SizeX") or 0) * float(e.get("SizeY") or 0))
        return tuple(float(main.get(f"PhysicalSize{a}")) * _OME_UM[main.get(f"PhysicalSize{a}Unit", "µm")]
                     for a in "XY")
    except (ET.ParseError, TypeError, ValueError, KeyError):  # max() of no Pixels is a ValueError too
        return None


def has_subifd_pyramid(path: str | Path) -> bool:
    """Whether the TIFF's first page holds its reduced levels in SubIFDs (tifffile's pyramid layout,
    OME-TIFFs among them), which OpenSlide does not follow."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
            return bool(tf.pages.first.subifds)
    except (tifffile.TiffFileError, OSError, ValueError, struct.error):
        return False


def _fraction(value: Any) -> float:
    if isinstance(value, tuple):
        return value[0] / value[1] if value[1] else 0.0
    return float(value)


# --- backends ---------------------------------------------------------------------------------
def _as_rgb(arr: np.ndarray, path: Path | None = None) -> np.ndarray:
    """Writable uint8 (h, w, 3) from gray, RGB or RGBA (alpha composited onto white)."""
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if arr.dtype != np.uint8:
        raise UnsupportedFormatError(f"{arr.dtype} pixels are not supported; weakstil reads 8-bit RGB",
                                     path=path)
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[2]
    if channels == 1:
        return np.repeat(arr, 3, axis=2)
    if channels == 4 and arr[..., 3].min() < 255:
        alpha = arr[..., 3:4].astype(np.uint16)
        rgb = arr[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    out = np.ascontiguousarray(arr[..., :3])  # opaque RGBA or RGB
    return out if out.flags.writeable else out.copy()


class OpenSlideReader:
    name = "openslide"

    def __init__(self, osr, path: Path):
        self._osr = osr
        self._path = path
        props = osr.properties
        self.vendor = props.get("openslide.vendor")
        self.objective_power = parse_positive(props.get("openslide.objective-power"))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)

    @classmethod
    def open(cls, path: Path) -> OpenSlideReader:
        openslide = openslide_module()
        if openslide is None:
            raise UnsupportedFormatError("the openslide backend is not available", path=path,
                                         fix="install openslide-bin, or use --backend tiffslide")
        try:
            return cls(openslide.OpenSlide(str(path)), path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise UnsupportedFormatError("OpenSlide does not recognise this file", path=path,
                                         fix="try --backend auto (TiffSlide reads more TIFF variants)") from exc
        except openslide.OpenSlideError as exc:
            raise damaged_file_error(path, exc, "opening with OpenSlide") from exc

    def stated_mpp(self) -> tuple[float, float] | None:
        props = self._osr.properties
        mpp_x = parse_positive(props.get("openslide.mpp-x"))
        mpp_y = parse_positive(props.get("openslide.mpp-y"))
        return (mpp_x, mpp_y) if mpp_x and mpp_y else None

    def read(self, level: int, x_lv: int, y_lv: int, width: int, height: int) -> np.ndarray:
        level_ds = self.level_downsamples[level]
        xy_l0 = (round(x_lv * level_ds), round(y_lv * level_ds))
        return _as_rgb(np.asarray(self._osr.read_region(xy_l0, level, (width, height))), self._path)

    def close(self) -> None:
        self._osr.close()


class TiffSlideReader:
    name = "tiffslide"

    def __init__(self, ts, path: Path):
        self._ts = ts
        self._path = path
        props = ts.properties
        self.vendor = props.get("tiffslide.vendor") or type(ts).detect_format(path)
        self.objective_power = parse_positive(props.get("tiffslide.objective-power"))
        self.level_dimensions = tuple((int(w), int(h)) for w, h in ts.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in ts.level_downsamples)

    @classmethod
    def open(cls, path: Path) -> TiffSlideReader:
        import tifffile
        import tiffslide

        try:
            with _quiet_tifffile():
                return cls(tiffslide.TiffSlide(path), path)
        except NotImplementedError as exc:
            raise UnsupportedFormatError(f"TiffSlide cannot read this TIFF layout ({exc})", path=path) from exc
        except (tifffile.TiffFileError, KeyError, ValueError, IndexError) as exc:
            raise damaged_file_error(path, exc, "opening with TiffSlide") from exc

    def stated_mpp(self) -> tuple[float, float] | None:
        props = self._ts.properties
        mpp_x = parse_positive(props.get("tiffslide.mpp-x"))
        mpp_y = parse_positive(props.get("tiffslide.mpp-y"))
        return (mpp_x, mpp_y) if mpp_x and mpp_y else None

    def read(self, level: int, x_lv: int, y_lv: int, width: int, height: int) -> np.ndarray:
        level_ds = self.level_downsamples[level]
        xy_l0 = (_l0_for_level_px(x_lv, level_ds), _l0_for_level_px(y_lv, level_ds))
        arr = self._ts.read_region(xy_l0, level, (width, height), as_array=True, padding=False)
        return _as_rgb(np.asarray(arr), self._path)

    def close(self) -> None:
        self._ts.close()


def _l0_for_level_px(px_lv: int, level_ds: float) -> int:
    """A level-0 coordinate that TiffSlide maps back to level pixel ``px_lv`` (it uses int(l0 / ds))."""
    x_l0 = max(0, math.ceil(px_lv * level_ds) - 1)
    while int(x_l0 / level_ds) < px_lv:
        x_l0 += 1
    return x_l0


class ImageReader:
    """A plain single-level image (PNG, JPEG, or a TIFF that TiffSlide cannot read) via PIL."""

    name = "image"
    vendor = None
    objective_power = None

    def __init__(self, path: Path, size: tuple[int, int]):
        self._path = path
        self._pixels: np.ndarray | None = None
        self.level_dimensions = (size,)
        self.level_downsamples = (1.0,)

    @classmethod
    def open(cls, path: Path) -> ImageReader:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return cls(path, (int(image.size[0]), int(image.size[1])))
        except Image.DecompressionBombError as exc:
            raise UnsupportedFormatError("the image is too large to read as one plain image", path=path) from exc
        except UnidentifiedImageError as exc:
            raise NotASlideError("PIL cannot identify this image", path=path) from exc

    def stated_mpp(self) -> None:
        return None  # image dpi is a display setting; plain images need --mpp

    def read(self, level: int, x_lv: int, y_lv: int, width: int, height: int) -> np.ndarray:
        if self._pixels is None:
            from PIL import Image

            with Image.open(self._path) as image:
                image.load()
                mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
                self._pixels = _as_rgb(np.asarray(image.convert(mode)), self._path)
        return self._pixels[y_lv : y_lv + height, x_lv : x_lv + width].copy()

    def close(self) -> None:
        self._pixels = None
