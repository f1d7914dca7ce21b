"""Open a whole-slide image behind one small interface: :func:`open_slide` → :class:`SlideHandle`.

The handle *composes* a backend reader (OpenSlide, TiffSlide, or a plain image through PIL) and
adds what weakstil needs on top: typed errors that name the file and the fix, the slide's resolution
in µm per pixel (mpp) resolved once, and region reads that are pixel-identical across backends.

Region semantics (both backends): ``read_region(xy_l0, level, size)`` returns the ``size`` block of
level pixels whose top-left pixel is ``floor(xy_l0 / downsample)``; pixels outside the slide are
white. (OpenSlide itself interpolates when ``xy_l0 / downsample`` is fractional, TiffSlide truncates;
snapping to a whole level pixel first makes the two agree.)

DICOM WSI: a folder of ``.dcm`` files (one slide, as scanners and PACS export it) is one slide; its
id is the folder's name. OpenSlide 4 reads it from any ``.dcm`` file of the folder.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from weakstil.errors import (
    AnisotropicMppError,
    ConfigError,
    DuplicateSlideIdError,
    EmptySlideFileError,
    MissingMppError,
    MppCsvError,
    NotASlideError,
    SlideNotFoundError,
    UnsupportedFormatError,
    WeakstilError,
)
from weakstil.wsi.backends import (
    TAG_MPP_RANGE,
    ImageReader,
    OpenSlideReader,
    TiffSlideReader,
    check_tiff_structure,
    damaged_file_error,
    has_subifd_pyramid,
    mpp_from_tiff,
    openslide_module,
    parse_positive,
    read_errors,
)

SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".png", ".jpg", ".jpeg",
)
OPENSLIDE_ONLY_SUFFIXES: tuple[str, ...] = (".mrxs", ".vms", ".vmu", ".svslide")
DICOM_SUFFIX = ".dcm"  # a folder of these is one DICOM WSI slide
BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiffslide", "image")
ANISOTROPY_TOLERANCE = 0.02  # relative difference of mpp-x and mpp-y above which a slide is refused
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_THUMB_BAND_BYTES = 64 * 2**20


# --- finding slides ---------------------------------------------------------------------------
def slide_id_from_path(path: str | Path) -> str:
    """The slide id: the file stem (``slides/TCGA-XX.svs`` → ``TCGA-XX``), or the folder name of a
    DICOM WSI folder (``slides/TCGA-YY/*.dcm`` → ``TCGA-YY``)."""
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder that directly holds ``.dcm`` files (one DICOM WSI slide)."""
    path = Path(path)
    return path.is_dir() and any(p.suffix.lower() == DICOM_SUFFIX and p.is_file() for p in path.iterdir())


def dicom_file_of(folder: Path) -> Path:
    """One ``.dcm`` file of a DICOM WSI folder (OpenSlide finds the rest of the slide from it)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == DICOM_SUFFIX and p.is_file())
    if not files:
        raise SlideNotFoundError("the folder holds no .dcm files", path=folder)
    return files[0]


def find_slides(path: str | Path) -> list[Path]:
    """Slides under a folder (recursive, sorted, hidden files skipped) or the one slide given.

    A slide is a file with a slide suffix, or a folder of ``.dcm`` files (DICOM WSI; a ``.dcm`` file
    given alone stands for its folder). Raises SlideNotFoundError when the path is missing or holds no
    slide, and DuplicateSlideIdError when two slides share an id (file stem or DICOM folder name).
    """
    path = Path(path)
    if path.is_file():
        return [path.parent if path.suffix.lower() == DICOM_SUFFIX else path]
    if not path.is_dir():
        raise SlideNotFoundError("no such file or folder", path=path)
    if is_dicom_folder(path):
        return [path]
    visible = [p for p in path.rglob("*") if not any(part.startswith(".") for part in p.relative_to(path).parts)]
    dicom_dirs = {p.parent for p in visible if p.suffix.lower() == DICOM_SUFFIX and p.is_file()}
    found = sorted(dicom_dirs | {
        p for p in visible
        if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file() and not dicom_dirs.intersection(p.parents)
    })
    if not found:
        raise SlideNotFoundError(
            f"the folder holds no slide files (looked for {' '.join(SLIDE_SUFFIXES)}, and for folders of "
            f"{DICOM_SUFFIX} files: DICOM WSI)", path=path
        )
    by_id: dict[str, list[Path]] = {}
    for p in found:
        by_id.setdefault(slide_id_from_path(p), []).append(p)
    dupes = {k: v for k, v in by_id.items() if len(v) > 1}
    if dupes:
        listing = "; ".join(f"{k}: {', '.join(str(p) for p in v)}" for k, v in sorted(dupes.items()))
        raise DuplicateSlideIdError(f"duplicate slide ids: {listing}", path=path)
    return found


def read_mpp_csv(path: str | Path) -> dict[str, float]:
    """Read a ``slide_id,mpp`` CSV (extra columns ignored) into {slide_id: mpp}.

    Every bad row is reported at once (MppCsvError): missing columns, empty ids, duplicate ids,
    values that are not numbers or not a plausible µm-per-pixel (0.01–20).
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            header = [h.strip() for h in reader.fieldnames or []]
    except FileNotFoundError as exc:
        raise MppCsvError("the mpp CSV does not exist", path=path) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MppCsvError(f"the mpp CSV cannot be read as CSV text ({exc})", path=path) from exc
    if not rows or not {"slide_id", "mpp"} <= set(header):
        raise MppCsvError(f"the mpp CSV needs columns slide_id,mpp (found: {','.join(header) or 'nothing'})",
                          path=path)
    out: dict[str, float] = {}
    problems: list[str] = []
    for line, row in enumerate(rows, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}
        sid, raw = row["slide_id"], row["mpp"]
        value = parse_positive(raw)
        if not sid:
            problems.append(f"line {line}: empty slide_id")
        elif sid in out:
            problems.append(f"line {line}: duplicate slide_id {sid!r}")
        elif value is None or not TAG_MPP_RANGE[0] <= value <= TAG_MPP_RANGE[1]:
            problems.append(f"line {line}: mpp {raw!r} for {sid!r} is not a µm-per-pixel value in 0.01-20")
        else:
            out[sid] = value
    if problems:
        raise MppCsvError("bad rows in the mpp CSV:\n    " + "\n    ".join(problems), path=path)
    return out


def open_kwargs_for(path: str | Path, *, backend: str = "auto", mpp: float | None = None,
                    mpp_override: bool = False, mpp_by_slide: Mapping[str, float] | None = None) -> dict:
    """The :func:`open_slide` keywords for one slide of a batch: a per-slide value (from
    :func:`read_mpp_csv`) replaces what the slide states; otherwise ``mpp``/``mpp_override`` apply."""
    per_slide = (mpp_by_slide or {}).get(slide_id_from_path(path))
    if per_slide is not None:
        return {"backend": backend, "mpp": per_slide, "mpp_override": True}
    return {"backend": backend, "mpp": mpp, "mpp_override": mpp_override}


# --- the handle -------------------------------------------------------------------------------
@dataclass
class SlideHandle:
    """An open slide: geometry, resolution and pixel access, whatever the backend.

    ``level_downsamples`` are floats exactly as the backend computes them (e.g. 15.9957, not 16):
    never round them. Use as a context manager or call :meth:`close`.
    """

    path: Path
    slide_id: str
    backend: str  # 'openslide' | 'tiffslide' | 'image'
    vendor: str | None
    mpp: float  # µm per level-0 pixel
    mpp_source: str  # 'openslide.mpp' | 'tiffslide.mpp' | 'ome-xml' | 'tiff-tags' | 'mpp-argument' | 'mpp-override'
    objective_power: float | None
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    _reader: Any = field(repr=False, compare=False, default=None)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The most-reduced level whose downsample is ≤ ``downsample`` × 1.01 (level 0 if none)."""
        limit = float(downsample) * 1.01
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= limit and level_ds >= self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 RGB of ``size`` level pixels from level pixel ``floor(xy_l0 / downsample)``.

        Parts outside the slide are white. A damaged file raises TruncatedSlideError or
        CorruptSlideError, never a backend-specific exception.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        level_ds = self.level_downsamples[level]
        x_lv = math.floor(int(xy_l0[0]) / level_ds)
        y_lv = math.floor(int(xy_l0[1]) / level_ds)
        return self._read_level(level, x_lv, y_lv, int(size[0]), int(size[1]))

    def _read_level(self, level: int, x_lv: int, y_lv: int, width: int, height: int) -> np.ndarray:
        """Like read_region, with the top-left given in level pixels."""
        if self._reader is None:
            raise ValueError(f"{self.path}: the slide is closed")
        if width < 0 or height < 0:
            raise ValueError(f"region size must be non-negative, got {(width, height)}")
        level_w, level_h = self.level_dimensions[level]
        x0, x1 = min(max(x_lv, 0), level_w), min(max(x_lv + width, 0), level_w)
        y0, y1 = min(max(y_lv, 0), level_h), min(max(y_lv + height, 0), level_h)
        if x1 <= x0 or y1 <= y0:
            return np.full((height, width, 3), 255, dtype=np.uint8)
        try:
            block = self._reader.read(level, x0, y0, x1 - x0, y1 - y0)
        except WeakstilError:
            raise
        except read_errors() as exc:
            raise damaged_file_error(self.path, exc, f"reading level {level} at {x0},{y0}") from exc
        if block.shape[:2] == (height, width):
            return block
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        out[y0 - y_lv : y1 - y_lv, x0 - x_lv : x1 - x_lv] = block
        return out

    def get_thumbnail(self, max_px: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB of the whole slide, longer side ``max_px`` (never upscaled), aspect kept.

        Reads the best level in bands (bounded memory), box-reduces each band by a whole factor,
        then resizes once; the result is the same for every backend.
        """
        from PIL import Image

        width, height = self.dimensions
        downsample = max(1.0, max(width, height) / max(1, int(max_px)))
        thumb_size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
        level = self.best_level_for_downsample(downsample)
        level_w, level_h = self.level_dimensions[level]
        factor = max(1, int(min(level_w / thumb_size[0], level_h / thumb_size[1])))
        band_h = factor * max(1, _THUMB_BAND_BYTES // (3 * level_w * factor))
        bands = []
        for y_lv in range(0, level_h, band_h):
            rows = min(band_h, level_h - y_lv)
            band = Image.fromarray(self._read_level(level, 0, y_lv, level_w, rows))
            bands.append(np.asarray(band.reduce(factor) if factor > 1 else band))
        image = Image.fromarray(np.concatenate(bands, axis=0))
        if image.size != thumb_size:
            image = image.resize(thumb_size, Image.Resampling.LANCZOS)
        return np.asarray(image)

    def close(self) -> None:
        """Release the backend (idempotent)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> SlideHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self):
        """Pickles as "open this file again with the resolved mpp" (each process gets its own handle)."""
        return (_reopen, (self.path, self.backend, self.mpp, self.mpp_source))


def _reopen(path: Path, backend: str, mpp: float, mpp_source: str) -> SlideHandle:
    handle = open_slide(path, backend=backend, mpp=mpp, mpp_override=True)
    handle.mpp_source = mpp_source
    return handle


# --- opening ----------------------------------------------------------------------------------
def open_slide(path: str | Path, *, backend: str = "auto", mpp: float | None = None,
               mpp_override: bool = False) -> SlideHandle:
    """Open a slide file and resolve its resolution.

    ``backend``: ``auto`` (OpenSlide if it recognises the file, else TiffSlide for TIFFs, else a
    plain PNG/JPEG image), ``openslide``, ``tiffslide`` or ``image``.
    ``mpp``: µm per pixel used when the slide states none (or states an anisotropic one);
    with ``mpp_override=True`` it replaces whatever the slide states.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown slide backend {backend!r}", fix=f"use one of: {', '.join(BACKENDS)}")
    if mpp is not None and parse_positive(mpp) is None:
        raise ConfigError(f"mpp must be a positive number of µm per pixel, got {mpp!r}",
                          fix="pass --mpp 0.25 (40x scans are ~0.25, 20x ~0.5)")
    if mpp_override and mpp is None:
        raise ConfigError("mpp_override=True needs an mpp value", fix="pass --mpp together with the override")
    if path.suffix.lower() == DICOM_SUFFIX and path.is_file():
        path = path.parent
    kind = "dicom" if is_dicom_folder(path) else _sniff(path)
    if kind != "dicom" and path.suffix.lower() not in SLIDE_SUFFIXES:
        raise UnsupportedFormatError(
            f"unknown slide suffix {path.suffix.lower()!r}; weakstil reads {' '.join(SLIDE_SUFFIXES)}", path=path)
    if kind == "tiff":
        check_tiff_structure(path)
    reader = _open_reader(path, backend, kind)
    try:
        mpp_value, mpp_source = _resolve_mpp(path, reader, kind, mpp=mpp, mpp_override=mpp_override)
        return SlideHandle(
            path=path, slide_id=slide_id_from_path(path), backend=reader.name, vendor=reader.vendor,
            mpp=mpp_value, mpp_source=mpp_source, objective_power=reader.objective_power,
            level_dimensions=reader.level_dimensions, level_downsamples=reader.level_downsamples,
            _reader=reader,
        )
    except BaseException:
        reader.close()
        raise


def _sniff(path: Path) -> str:
    """'tiff', 'image' (PNG/JPEG) or 'other' from the first bytes; missing/empty files raise."""
    if not path.exists():
        raise SlideNotFoundError("no such file", path=path)
    if path.is_dir():
        raise UnsupportedFormatError("this is a folder, not a slide file", path=path)
    if path.stat().st_size == 0:
        raise EmptySlideFileError("the file is empty (0 bytes)", path=path)
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
        return "image"
    return "other"


def _open_reader(path: Path, backend: str, kind: str):
    if kind == "dicom":
        return _open_dicom(path, backend)
    suffix = path.suffix.lower()
    openslide = openslide_module()
    vendor = openslide.OpenSlide.detect_format(str(path)) if openslide is not None else None
    recognised = bool(vendor)
    # OpenSlide reads a TIFF whose pyramid is in SubIFDs (tifffile's layout, OME-TIFFs) as a generic
    # TIFF of one level; TiffSlide reads every level
    subifd_pyramid = backend == "auto" and vendor == "generic-tiff" and has_subifd_pyramid(path)
    if recognised and backend in ("auto", "openslide") and not subifd_pyramid:
        return OpenSlideReader.open(path)
    if kind == "other" and suffix not in OPENSLIDE_ONLY_SUFFIXES:
        with path.open("rb") as fh:
            head = fh.read(16)
        raise NotASlideError(f"the file is not a TIFF, PNG or JPEG image (it starts with {head!r})", path=path)
    if backend == "openslide":
        return OpenSlideReader.open(path)
    if suffix in OPENSLIDE_ONLY_SUFFIXES:
        why = "OpenSlide is not available" if openslide is None else "OpenSlide does not recognise it"
        raise UnsupportedFormatError(
            f"{suffix} slides need OpenSlide ({why}; an .mrxs also needs its data folder beside it)",
            path=path, fix="install openslide-bin, keep the slide's companion files, or convert the slide "
            "to a pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid`)")
    if kind == "tiff" and backend in ("auto", "tiffslide"):
        return TiffSlideReader.open(path)
    if kind == "image" and backend in ("auto", "image") or kind == "tiff" and backend == "image":
        return ImageReader.open(path)
    raise UnsupportedFormatError(f"the {backend} backend reads TIFF-based slides only; this is a "
                                 "PNG/JPEG image", path=path, fix="use --backend auto or image")


def _open_dicom(folder: Path, backend: str):
    """A DICOM WSI folder through OpenSlide 4 (from any of its .dcm files)."""
    if backend not in ("auto", "openslide"):
        raise UnsupportedFormatError(f"the {backend} backend does not read DICOM WSI", path=folder,
                                     fix="use --backend auto or openslide (OpenSlide 4 reads DICOM)")
    openslide = openslide_module()
    dcm = dicom_file_of(folder)
    if openslide is None or openslide.OpenSlide.detect_format(str(dcm)) != "dicom":
        why = "OpenSlide is not available" if openslide is None else f"OpenSlide does not recognise {dcm.name}"
        raise UnsupportedFormatError(
            f"this DICOM folder cannot be read as a whole-slide image ({why})", path=folder,
            fix="install openslide-bin>=4.0 (OpenSlide 4 reads DICOM WSI); the folder must hold the .dcm "
                "files of one slide (VL Whole Slide Microscopy Image objects)")
    return OpenSlideReader.open(dcm)


# --- resolution -------------------------------------------------------------------------------
def _resolve_mpp(path: Path, reader, kind: str, *, mpp: float | None, mpp_override: bool) -> tuple[float, str]:
    """(mpp, source): override > slide properties > OME-XML > TIFF tags > the given fallback; else an error.

    Stated values outside TAG_MPP_RANGE (e.g. 352.8 µm/px from a 72-dpi TIFF) count as not stated.
    """
    if mpp_override:
        return float(mpp), "mpp-override"
    stated, source = reader.stated_mpp(), f"{reader.name}.mpp"
    if stated is None and kind == "tiff":
        stated, source = mpp_from_tiff(path)
    note = ""
    if stated is not None and not all(TAG_MPP_RANGE[0] <= v <= TAG_MPP_RANGE[1] for v in stated):
        note = f"; it states {stated[0]:.4g} µm/px ({source}), which is no scan resolution (a display dpi?)"
        stated = None
    if stated is not None:
        mpp_x, mpp_y = stated
        if abs(mpp_x - mpp_y) <= ANISOTROPY_TOLERANCE * min(mpp_x, mpp_y):
            return (mpp_x + mpp_y) / 2.0, source
        if mpp is None:
            raise AnisotropicMppError(
                f"the pixels are not square: mpp-x {mpp_x:.4g} vs mpp-y {mpp_y:.4g} µm ({source})", path=path)
    if mpp is not None:
        return float(mpp), "mpp-argument"
    looked = f"{reader.name} mpp properties" + (", OME-XML, TIFF resolution tags" if kind == "tiff" else "")
    if reader.name == "image" and kind != "tiff":
        looked = "a plain PNG/JPEG image carries no usable resolution"
    raise MissingMppError(f"the slide states no resolution (looked at: {looked}){note}", path=path)
