"""The Zarr v3 feature cache: one store per (encoder, tiling), one atomic group per slide.

Layout (the contract in DESIGN.md)::

    features/<encoder>-<hash>.zarr/
      zarr.json      attrs: schema_version, encoder, tiling, weakstil_version, created
      slides/<slide_id>/
        features     float16 (N, D), chunked by rows
        coords       int32   (N, 2), level-0 (x, y) of each tile's top-left corner
        zarr.json    attrs: source_path, source_size, source_mtime, slide_mpp, tile_size_l0,
                     embed_dim, n_tiles, seconds, written, complete (set last)
      .staging/      slide groups being written (never listed as slides)

A slide group is written in ``.staging/`` and renamed into ``slides/`` only after every row and
attribute is on disk, so ``slides/`` only ever holds whole groups; a killed writer leaves debris in
``.staging/`` alone, removed by :meth:`FeatureCache.sweep_staging` once its process is gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weakstil.embed.cache_writer import (
    _ACTIVE_STAGING,
    _HOST_TAG,
    SlideWriter,
    _as_coords,
    _staging_is_stale,
    _utc_now,
)
from weakstil.errors import (
    AmbiguousCacheError,
    CacheCorruptError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheWriteError,
)
from weakstil.fingerprint import fingerprint_differences, fingerprint_hash, identity
from weakstil.fs import (
    disk_errors,
    exchange_paths,
    plain_json,
    staging_name,
    sweep_partials,
)

SCHEMA_VERSION = 2  # 2: chunks carry a crc32c checksum (cache_writer.chunk_codecs); 1: zstd only
READABLE_SCHEMA_VERSIONS = (1, 2)  # version 1 stores still open (their chunks have no checksum)
FEATURE_CHUNK_ROWS = 4096
MTIME_TOLERANCE_S = 2.0  # FAT/SMB keep mtimes to 2 s; a replaced slide differs by far more
STAGING = ".staging"
RESERVED_SLIDE_ATTRS = frozenset({"complete", "n_tiles", "embed_dim"})



class CacheWarning(UserWarning):
    """A slide group in the cache is unreadable and is treated as absent."""


@dataclass
class SlideFeatures:
    """One slide's cached tiles: ``features`` float16 (N, D), ``coords_l0`` int32 (N, 2)."""

    features: np.ndarray
    coords_l0: np.ndarray
    attrs: dict[str, Any]

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])


def _sanitise(name: str) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)
    return safe.strip("._-")[:48] or "encoder"


def store_name(encoder_fp: dict, tiling_fp: dict) -> str:
    """``<encoder name>-<10 hex of sha256(canonical JSON of the identity)>.zarr``.

    The hash covers the encoder's weights sha256, so two checkpoints of one architecture never
    share a store, and every tiling/tissue parameter.
    """
    digest = fingerprint_hash(identity(encoder_fp, tiling_fp), 10)
    return f"{_sanitise(str(encoder_fp.get('name', 'encoder')))}-{digest}.zarr"


def source_attrs(path: str | Path) -> dict[str, Any]:
    """Slide attrs that identify the source file: resolved path, size and mtime (seconds)."""
    path = Path(path)
    st = path.stat()
    return {"source_path": str(path.resolve()), "source_size": st.st_size,
            "source_mtime": st.st_mtime}


def source_matches(attrs: dict, path: str | Path) -> bool:
    """Whether ``path`` has the size and mtime recorded in ``attrs`` (False if unknown)."""
    try:
        st = Path(path).stat()
        return (attrs.get("source_size") == st.st_size
                and abs(float(attrs["source_mtime"]) - st.st_mtime) <= MTIME_TOLERANCE_S)
    except (OSError, KeyError, TypeError, ValueError):
        return False


# --- small file helpers -----------------------------------------------------------------------
def _read_group_json(path: Path) -> dict | None:
    """Attributes of the Zarr v3 group at ``path``; None if no folder; CacheCorruptError if broken.

    Reads ``zarr.json`` directly (its layout is fixed by the Zarr v3 spec): 40x faster than opening
    a group with zarr, and one bad file cannot break a listing.
    """
    meta = path / "zarr.json"
    if not path.is_dir():
        return None
    try:
        doc = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CacheCorruptError("the group has no zarr.json", path=path) from exc
    except (OSError, ValueError) as exc:
        raise CacheCorruptError(f"unreadable zarr.json ({exc})", path=path) from exc
    if not (isinstance(doc, dict) and doc.get("zarr_format") == 3
            and doc.get("node_type") == "group" and isinstance(doc.get("attributes", {}), dict)):
        raise CacheCorruptError("zarr.json is not a Zarr v3 group", path=path)
    return doc.get("attributes", {})


def _check_slide_id(slide_id: str) -> None:
    if (not isinstance(slide_id, str) or not slide_id or slide_id.startswith(".")
            or any(c in slide_id for c in "/\\\0")):
        raise CacheWriteError(f"{slide_id!r} cannot name a slide group",
                              fix="slide ids are file stems: no '/', '\\', and no leading '.'")


def _group_stamp(path: Path) -> tuple[int, int] | None:
    """Identity of a group's current version: folder inode + zarr.json mtime."""
    try:
        return os.stat(path).st_ino, os.stat(path / "zarr.json").st_mtime_ns
    except OSError:
        return None


# --- the cache --------------------------------------------------------------------------------
class FeatureCache:
    """One Zarr v3 store of tile features for one (encoder, tiling); open with the classmethods."""

    def __init__(self, path: Path, encoder_fp: dict, tiling_fp: dict, attrs: dict):
        self.path = Path(path)
        self.encoder_fp = encoder_fp
        self.tiling_fp = tiling_fp
        self.attrs = attrs

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r})"

    @property
    def slides_dir(self) -> Path:
        return self.path / "slides"

    @property
    def staging_dir(self) -> Path:
        return self.path / STAGING

    @property
    def embed_dim(self) -> int | None:
        dim = self.encoder_fp.get("embed_dim")
        return int(dim) if dim is not None else None

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, features_dir: str | Path, encoder_fp: dict, tiling_fp: dict, *,
             create: bool = True) -> FeatureCache:
        """The store for (encoder_fp, tiling_fp) in ``features_dir``, created if ``create``.

        ``features_dir`` may also be a ``.zarr`` store itself. An existing store made with another
        encoder or tiling is refused with CacheMismatchError naming the fields that differ.
        """
        features_dir = Path(features_dir)
        if features_dir.suffix == ".zarr" or (features_dir / "zarr.json").is_file():
            path = features_dir
        else:
            path = features_dir / store_name(encoder_fp, tiling_fp)
        if (path / "zarr.json").is_file():
            cache = cls.open_store(path)
            diffs = fingerprint_differences(identity(cache.encoder_fp, cache.tiling_fp),
                                            identity(encoder_fp, tiling_fp))
            if diffs:
                raise CacheMismatchError("this cache was made with another encoder or tiling:"
                                         + "".join(f"\n    {d}" for d in diffs), path=path)
            return cache
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CacheCorruptError("the folder exists but is not a feature cache (no zarr.json)",
                                    path=path,
                                    fix="point --features at another folder, or empty it")
        if not create:
            raise CacheNotFoundError(_not_found_message(path.parent, encoder_fp, tiling_fp),
                                     path=path)
        return cls._create(path, encoder_fp, tiling_fp)

    @classmethod
    def _create(cls, path: Path, encoder_fp: dict, tiling_fp: dict) -> FeatureCache:
        import zarr
        from zarr.storage import LocalStore

        from weakstil import __version__

        attrs = {"schema_version": SCHEMA_VERSION, "encoder": plain_json(encoder_fp),
                 "tiling": plain_json(tiling_fp), "weakstil_version": __version__,
                 "created": _utc_now()}
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(path.parent)  # a killed creator's half-made store
        tmp = path.parent / staging_name(path.name)
        try:
            root = zarr.open_group(LocalStore(tmp), mode="w-", attributes=attrs)
            root.create_group("slides")
            try:
                os.rename(tmp, path)  # atomic: a store is there whole or not at all
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another process created it first (or an empty folder was there)
                if not (path / "zarr.json").is_file():
                    path.rmdir()
                    os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, encoder_fp, tiling_fp, create=False)

    @classmethod
    def open_store(cls, store_path: str | Path) -> FeatureCache:
        """An existing store, with the fingerprints its attributes record."""
        path = Path(store_path)
        try:
            attrs = _read_group_json(path)
        except CacheCorruptError as exc:
            raise CacheCorruptError(
                f"not a readable feature cache: {exc.problem}", path=path,
                fix="delete the store and run `weakstil extract` again") from exc
        if attrs is None:
            raise CacheNotFoundError("no feature cache here", path=path)
        version = attrs.get("schema_version")
        if not isinstance(version, int):
            raise CacheCorruptError("the store has no schema_version: not a weakstil feature cache",
                                    path=path)
        if version not in READABLE_SCHEMA_VERSIONS:
            raise CacheMismatchError(
                f"cache schema version {version}; this weakstil reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}",
                path=path,
                fix="use the weakstil version that made it, or delete it and extract again")
        encoder_fp, tiling_fp = attrs.get("encoder"), attrs.get("tiling")
        if not isinstance(encoder_fp, dict) or not isinstance(tiling_fp, dict):
            raise CacheCorruptError("the store's attrs lack the encoder or tiling fingerprint",
                                    path=path)
        cache = cls(path, encoder_fp, tiling_fp, attrs)
        cache.sweep_staging()
        return cache

    @classmethod
    def find(cls, features_dir: str | Path, encoder: str | None = None) -> FeatureCache:
        """The one store in ``features_dir`` (or ``features_dir`` itself if it is a store).

        ``encoder`` narrows the choice to stores made with that encoder name.
        """
        features_dir = Path(features_dir)
        if (features_dir / "zarr.json").is_file():
            return cls.open_store(features_dir)
        stores = list_stores(features_dir)
        if not stores:
            raise CacheNotFoundError("no feature cache (*.zarr) here", path=features_dir)
        chosen = stores
        if encoder is not None:
            chosen = {p: a for p, a in stores.items()
                      if a.get("encoder", {}).get("name") == encoder
                      or p.name.startswith(_sanitise(encoder) + "-")}
            if not chosen:
                raise CacheNotFoundError(
                    f"no feature cache for encoder {encoder!r}; caches here:\n    "
                    + "\n    ".join(_describe_store(p, a) for p, a in stores.items()),
                    path=features_dir,
                    fix=f"run `weakstil extract SLIDES --encoder {encoder}` or pick a listed one")
        if len(chosen) > 1:
            raise AmbiguousCacheError(
                "several feature caches here:\n    "
                + "\n    ".join(_describe_store(p, a) for p, a in chosen.items()),
                path=features_dir)
        return cls.open_store(next(iter(chosen)))

    # -- staging ---------------------------------------------------------------------------------
    def _new_staging(self, slide_id: str, kind: str = "new", *, create: bool = False) -> Path:
        """A fresh path in ``.staging/`` (made as an empty folder when ``create``). Other writers remove
        ``.staging/`` when empty, so ``mkdir(exist_ok=True)`` can raise FileExistsError: retried."""
        name = f"{slide_id}-{os.getpid()}-{_HOST_TAG}-{uuid.uuid4().hex[:8]}.{kind}"
        path = self.staging_dir / name
        if create:
            _ACTIVE_STAGING.add(name)  # before it exists: a sweep in this process leaves it alone
        for _ in range(20):
            with suppress(FileExistsError):
                os.mkdir(self.staging_dir)
            try:
                if create:
                    os.mkdir(path)  # .staging/ is not empty from here on: nobody tidies it away
                if path.parent.is_dir():
                    return path
            except FileNotFoundError:
                continue  # .staging/ was tidied away meanwhile: make it again
            except NotADirectoryError:
                break  # .staging is a file
        _ACTIVE_STAGING.discard(name)
        raise CacheWriteError("could not make a staging folder", path=self.staging_dir,
                              fix=f"delete {self.staging_dir} if it is not a folder, then rerun")

    def sweep_staging(self) -> list[Path]:
        """Remove staging debris whose writer is gone; returns what was removed.

        An entry is kept while its process is alive (same host), or for a day when it was made on
        another host (its process cannot be checked from here).
        """
        removed: list[Path] = []
        try:
            entries = list(os.scandir(self.staging_dir))
        except OSError:
            return removed
        for entry in entries:
            if _staging_is_stale(entry):
                shutil.rmtree(entry.path, ignore_errors=True)
                if os.path.lexists(entry.path):
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        continue
                removed.append(Path(entry.path))
        self._tidy_staging()
        return removed

    def _tidy_staging(self) -> None:
        try:
            self.staging_dir.rmdir()  # only when empty: zarr warns about the extra folder
        except OSError:
            pass

    # -- writing ---------------------------------------------------------------------------------
    @contextmanager
    def slide_writer(self, slide_id: str, coords_l0: Any, embed_dim: int,
                     attrs: dict | None = None, *, source: str | Path | None = None,
                     chunk_rows: int = FEATURE_CHUNK_ROWS) -> Iterator[SlideWriter]:
        """Write one slide's group atomically: ``with cache.slide_writer(...) as w: w.write(0, f)``.

        ``attrs`` should hold ``slide_mpp`` and ``tile_size_l0``; ``source`` (the slide file) adds
        ``source_path/size/mtime``, which :meth:`is_complete` compares. On a clean exit every row
        must have been written; the group then replaces any old one. On any exception nothing is
        left behind.
        """
        _check_slide_id(slide_id)
        coords = _as_coords(coords_l0)
        embed_dim = int(embed_dim)
        if embed_dim < 1 or (self.embed_dim is not None and embed_dim != self.embed_dim):
            raise CacheWriteError(f"embed_dim {embed_dim} does not fit this cache "
                                  f"(encoder embed_dim {self.embed_dim})", path=self.path)
        extra = dict(attrs or {})
        if RESERVED_SLIDE_ATTRS & extra.keys():
            raise CacheWriteError(f"attrs {sorted(RESERVED_SLIDE_ATTRS & extra.keys())} are set by "
                                  "the cache itself", fix="leave them out of attrs")
        if source is not None:
            extra.update(source_attrs(source))  # stat now: a file changed while reading is redone
        started = time.perf_counter()
        staged = self._new_staging(slide_id, create=True)
        try:
            with disk_errors(self.slides_dir / slide_id):  # a full disk: DiskFullError, old group kept
                writer = SlideWriter(staged, coords, embed_dim, plain_json(extra), chunk_rows)
                yield writer
                writer.finish(seconds=time.perf_counter() - started)
                self._install(staged, slide_id)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)  # clean up only; the error goes on
            raise
        finally:
            _ACTIVE_STAGING.discard(staged.name)
            self._tidy_staging()

    def _install(self, staged: Path, slide_id: str) -> None:
        """Rename the staged group into ``slides/``; an old group there is swapped out first."""
        final = self.slides_dir / slide_id
        self.slides_dir.mkdir(exist_ok=True)
        olds: list[Path] = []
        try:
            for _ in range(5):
                try:
                    os.rename(staged, final)
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if exchange_paths(staged, final):  # the old group now sits at ``staged``
                    olds.append(staged)
                    return
                # renaming onto a non-empty folder fails: move the old group out, then retry
                old = self._move_aside(final, slide_id)
                if old is not None:
                    olds.append(old)
        finally:
            for old in olds:  # deleted only once the new group is in (or on failure)
                shutil.rmtree(old, ignore_errors=True)
        raise CacheWriteError(f"could not install slide group {slide_id!r}: other processes keep "
                              "replacing it", path=final,
                              fix="run one extraction per cache at a time, or use --lock-dir")

    def _move_aside(self, group: Path, slide_id: str) -> Path | None:
        """Rename ``group`` into staging (out of listings at once); None if it is not there."""
        for _ in range(3):
            old = self._new_staging(slide_id, "old")
            try:
                os.rename(group, old)
                return old
            except FileNotFoundError:
                if not os.path.lexists(group):
                    return None
                # else .staging was just tidied away by another process: make it again
        raise CacheWriteError(f"could not move {group} aside", path=self.staging_dir)

    def remove(self, slide_id: str) -> bool:
        """Delete a slide's group (atomically: it disappears from listings at once)."""
        _check_slide_id(slide_id)
        old = self._move_aside(self.slides_dir / slide_id, slide_id)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._tidy_staging()
        return old is not None

    # -- reading ---------------------------------------------------------------------------------
    def _slide_attrs(self, slide_id: str) -> dict | None:
        """The slide group's attrs; None if there is no group; CacheCorruptError if broken."""
        _check_slide_id(slide_id)
        return _read_group_json(self.slides_dir / slide_id)

    def complete_ids(self) -> list[str]:
        """Sorted ids of slides whose group is complete; broken groups are warned about, skipped."""
        try:
            entries = [e for e in os.scandir(self.slides_dir)
                       if e.is_dir() and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        ids = []
        for entry in entries:
            try:
                attrs = _read_group_json(Path(entry.path))
            except CacheCorruptError as exc:
                warnings.warn(f"{exc.problem}: treating slide {entry.name!r} as absent "
                              f"({entry.path})", CacheWarning, stacklevel=2)
                continue
            if attrs is not None and attrs.get("complete") is True:
                ids.append(entry.name)
        return sorted(ids)

    def is_complete(self, slide_id: str, source: str | Path | None = None) -> bool:
        """Whether the slide is cached whole; with ``source``, also made from this very file."""
        try:
            attrs = self._slide_attrs(slide_id)
        except CacheCorruptError as exc:
            warnings.warn(f"{exc.problem}: treating slide {slide_id!r} as absent ({exc.path})",
                          CacheWarning, stacklevel=2)
            return False
        if attrs is None or attrs.get("complete") is not True:
            return False
        return source is None or source_matches(attrs, source)

    def complete_attrs(self, slide_id: str, source: str | Path | None = None) -> dict | None:
        """The attrs of a complete slide group (made from ``source`` when given), else None."""
        if not self.is_complete(slide_id, source=source):
            return None
        try:
            return self._slide_attrs(slide_id)
        except CacheCorruptError:
            return None

    def read(self, slide_id: str) -> SlideFeatures:
        """A complete slide's features, coords and attrs, checked (shape, dtype, finite)."""
        group_path = self.slides_dir / slide_id
        for _ in range(10):
            stamp = _group_stamp(group_path)
            try:
                result = self._read_once(slide_id)
            except CacheCorruptError:
                if _group_stamp(group_path) == stamp:
                    raise
                continue  # replaced while we read it: attrs of one version, arrays of another
            if _group_stamp(group_path) == stamp:
                return result
        raise CacheCorruptError("the slide group kept being replaced while it was read",
                                path=group_path, fix="read it again once extraction has finished")

    def _read_once(self, slide_id: str) -> SlideFeatures:
        group_path = self.slides_dir / slide_id
        attrs = self._slide_attrs(slide_id)
        if attrs is None:
            raise CacheNotFoundError(f"slide {slide_id!r} is not in the cache", path=self.path,
                                     fix=f"run `weakstil extract` for it (cache: {self.path})")
        if attrs.get("complete") is not True:
            raise CacheCorruptError("the slide group is incomplete (no complete=true)",
                                    path=group_path)
        features, coords = _read_arrays(group_path)
        n_tiles, dim = attrs.get("n_tiles"), self.embed_dim
        problems = []
        if features.dtype != np.float16 or features.ndim != 2:
            problems.append(f"features are {features.dtype} {features.shape}, not float16 (N, D)")
        if coords.dtype != np.int32 or coords.ndim != 2 or coords.shape[1:] != (2,):
            problems.append(f"coords are {coords.dtype} {coords.shape}, not int32 (N, 2)")
        if features.shape[:1] != coords.shape[:1] or features.shape[0] != n_tiles:
            problems.append(f"row counts differ: features {features.shape[0]}, coords "
                            f"{coords.shape[0]}, n_tiles attr {n_tiles}")
        if dim is not None and features.ndim == 2 and features.shape[1] != dim:
            problems.append(f"features have {features.shape[1]} columns, encoder embed_dim {dim}")
        if not problems and not np.isfinite(features).all():
            problems.append("features contain NaN/inf (a missing or damaged chunk)")
        if problems:
            raise CacheCorruptError("; ".join(problems), path=group_path)
        return SlideFeatures(features=features, coords_l0=coords, attrs=attrs)


def _read_arrays(group_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import zarr
    from zarr.storage import LocalStore

    try:
        group = zarr.open_group(LocalStore(group_path, read_only=True), mode="r",
                                use_consolidated=False)
        return np.asarray(group["features"][...]), np.asarray(group["coords"][...])
    except Exception as exc:  # any zarr/codec/OS failure on stored bytes means a damaged group
        checksum = "checksum" in str(exc).lower()
        what = ("a chunk failed its crc32c checksum: the slide's stored features were damaged on disk"
                if checksum else f"cannot read the slide's arrays ({type(exc).__name__}: {exc})")
        raise CacheCorruptError(
            f"slide {group_path.name!r}: {what}", path=group_path,
            fix=f"delete {group_path} and run `weakstil extract` (or `weakstil score`) again: the slide "
                "is recomputed") from exc


def list_stores(features_dir: str | Path) -> dict[Path, dict]:
    """Readable ``*.zarr`` stores in ``features_dir`` with their root attrs (others skipped)."""
    features_dir = Path(features_dir)
    stores: dict[Path, dict] = {}
    if not features_dir.is_dir():
        return stores
    for child in sorted(features_dir.iterdir()):
        if child.suffix != ".zarr" or child.name.startswith("."):
            continue
        try:
            attrs = _read_group_json(child)
        except CacheCorruptError as exc:
            warnings.warn(f"skipping unreadable cache {child}: {exc.problem}", CacheWarning,
                          stacklevel=2)
            continue
        if attrs is not None:
            stores[child] = attrs
    return stores


def _describe_store(path: Path, attrs: dict) -> str:
    enc, til = attrs.get("encoder", {}), attrs.get("tiling", {})
    tiling = ", ".join(f"{k}={til[k]}" for k in ("tile_px", "mpp", "overlap") if k in til)
    if til:  # caches made before stain normalisation have no key: their tiles are as scanned
        tiling += f", stain={til.get('stain', 'none')}"
    return f"{path}  (encoder {enc.get('name', '?')}; {tiling or 'tiling ?'})"


def _not_found_message(features_dir: Path, encoder_fp: dict, tiling_fp: dict) -> str:
    text = "no feature cache for this encoder and tiling"
    wanted = identity(encoder_fp, tiling_fp)
    for path, attrs in list_stores(features_dir).items():
        if attrs.get("encoder", {}).get("name") != encoder_fp.get("name"):
            continue
        try:
            diffs = fingerprint_differences(
                identity(attrs.get("encoder", {}), attrs.get("tiling", {})), wanted)
        except TypeError:
            continue
        text += f"\n  {path.name} is for the same encoder but differs in:"
        text += "".join(f"\n    {d}" for d in diffs)
    return text
