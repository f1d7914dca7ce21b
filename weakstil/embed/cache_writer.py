"""Writing one slide's features into a staging group of the Zarr cache (see :mod:`weakstil.embed.cache`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from weakstil.errors import (
    CacheWriteError,
)
from weakstil.fs import _pid_alive

FOREIGN_STAGING_MAX_AGE_S = 24 * 3600  # staging debris of another host: kept this long
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_ACTIVE_STAGING: set[str] = set()  # staging dir names this process is writing right now


def _staging_is_stale(entry: os.DirEntry) -> bool:
    parts = entry.name.rsplit(".", 1)[0].rsplit("-", 3)
    try:
        pid, host = int(parts[1]), parts[2]
    except (IndexError, ValueError):
        pid, host = -1, ""
    if host == _HOST_TAG and pid > 0:
        if pid == os.getpid():
            return entry.name not in _ACTIVE_STAGING  # a previous process that had our pid
        return not _pid_alive(pid)
    try:
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return age > FOREIGN_STAGING_MAX_AGE_S


class SlideWriter:
    """Rows of one slide's features, buffered per chunk so each chunk is compressed once."""

    def __init__(self, path: Path, coords_l0: np.ndarray, embed_dim: int, attrs: dict,
                 chunk_rows: int):
        import zarr
        from zarr.storage import LocalStore

        self.path = path
        self.n_tiles = int(coords_l0.shape[0])
        self.embed_dim = embed_dim
        self._attrs = attrs
        self._chunk_rows = max(1, min(int(chunk_rows), self.n_tiles or 1))
        self._group = zarr.open_group(LocalStore(path), mode="w-", attributes=attrs)
        coords = self._group.create_array("coords", shape=coords_l0.shape, dtype="int32",
                                          chunks=(max(1, self.n_tiles), 2), fill_value=0,
                                          compressors=chunk_codecs())
        if self.n_tiles:
            coords[...] = coords_l0
        self._features = self._group.create_array(
            "features", shape=(self.n_tiles, embed_dim), dtype="float16",
            chunks=(self._chunk_rows, embed_dim), fill_value=np.nan,  # unwritten rows read NaN
            compressors=chunk_codecs())
        self._written = np.zeros(self.n_tiles, dtype=bool)
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._flushed: set[int] = set()

    @property
    def rows_written(self) -> int:
        return int(self._written.sum())

    def write(self, start_row: int, feats: Any) -> None:
        """Store ``feats`` (k, D) as rows ``start_row .. start_row + k`` (any order, any size)."""
        values = np.asarray(feats)
        if values.ndim != 2 or values.shape[1] != self.embed_dim:
            raise CacheWriteError(f"features of shape {values.shape}; "
                                  f"expected (k, {self.embed_dim})")
        start, stop = int(start_row), int(start_row) + values.shape[0]
        if start < 0 or stop > self.n_tiles:
            raise CacheWriteError(f"rows {start}:{stop} outside the slide's {self.n_tiles} tiles")
        with np.errstate(over="ignore", invalid="ignore"):
            values = values.astype(np.float16)
        if not np.isfinite(values).all():
            raise CacheWriteError("features contain NaN or inf (or exceed float16's ±65504)",
                                  fix="check the encoder weights and input normalisation")
        row = start
        while row < stop:
            chunk = row // self._chunk_rows
            c0 = chunk * self._chunk_rows
            c1 = min(c0 + self._chunk_rows, self.n_tiles)
            end = min(stop, c1)
            part = values[row - start:end - start]
            if chunk in self._flushed:  # a rewrite of rows already on disk
                self._features[row:end] = part
            else:
                if chunk not in self._pending:
                    self._pending[chunk] = (np.empty((c1 - c0, self.embed_dim), np.float16),
                                            np.zeros(c1 - c0, bool))
                buf, mask = self._pending[chunk]
                buf[row - c0:end - c0] = part
                mask[row - c0:end - c0] = True
                if mask.all():
                    self._features[c0:c1] = buf
                    del self._pending[chunk]
                    self._flushed.add(chunk)
            row = end
        self._written[start:stop] = True

    def finish(self, *, seconds: float) -> None:
        """Check every row is written, then set the attrs, ``complete=True`` last."""
        if not self._written.all():
            missing = np.flatnonzero(~self._written)
            raise CacheWriteError(f"only {self.rows_written} of {self.n_tiles} rows were written "
                                  f"(first missing row {missing[0]})",
                                  fix="a bug in the caller: every tile needs its features")
        self._group.update_attributes({**self._attrs, "n_tiles": self.n_tiles,
                                       "embed_dim": self.embed_dim,
                                       "seconds": round(float(self._attrs.get("seconds",
                                                                              seconds)), 3),
                                       "written": _utc_now()})
        self._group.update_attributes({"complete": True})


# --- module helpers ---------------------------------------------------------------------------
def chunk_codecs() -> list:
    """bytes → zstd → crc32c: every stored chunk ends in a CRC-32C of its compressed bytes, so a
    flipped bit on disk fails the read (zarr raises; the cache reports the group as corrupt) instead
    of decoding into different features. Stores with these codecs have schema version 2."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


def _as_coords(coords_l0: Any) -> np.ndarray:
    coords = np.asarray(coords_l0)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise CacheWriteError(f"coords_l0 of shape {coords.shape}; expected (N, 2) level-0 (x, y)")
    if coords.size and (not np.issubdtype(coords.dtype, np.number)
                        or not np.array_equal(coords, np.round(coords))
                        or coords.min() < 0 or coords.max() > np.iinfo(np.int32).max):
        raise CacheWriteError("coords_l0 must be non-negative integers that fit int32")
    return coords.astype(np.int32)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
