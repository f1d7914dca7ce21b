"""The only door for outputs: atomic writes and folder replaces, staging names, locks, the sweep.

Every module that writes a result goes through here, so that one scheme names temp files
(:func:`staging_name`: ``.<name>.<host>-<pid>-<hex>.partial``), one sweep (:func:`sweep_partials`)
recognises and removes what a killed process left behind, and one place turns a full disk
(ENOSPC, EDQUOT) into a :class:`~weakstil.errors.DiskFullError` that names the path and the free
space, after removing the temp file (the earlier output stays as it was).

Locks let several processes share a folder: ``<lock_dir>/<key>.lock`` is created whole (its content
hard-linked into place: :func:`_create_lock_file`) and holds the owner's pid, host and process start time. While held, a
background thread touches it every :data:`HEARTBEAT_S` seconds. A lock is stale, and taken over,
when its process is gone (same host: the pid is dead, a zombie, or reused by another process), or,
for a lock from another host, when it has not been touched for :data:`STALE_AFTER_S` seconds (the
age is measured on the shared folder's own clock). A lock file that is empty or not a lock (no
JSON object naming a holder) is being written for :data:`EMPTY_LOCK_GRACE_S` seconds; after that
it is debris and is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import enum
import errno
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
EMPTY_LOCK_GRACE_S = 60.0  # a lock file with no content yet is being written; later it is debris
HEARTBEAT_S = 30.0  # a held lock file is touched this often
STALE_AFTER_S = 300.0  # a lock from another host not touched for this long is stale
STALE_PARTIAL_S = 6 * 3600.0  # a staging leftover untouched this long is debris, whoever left it

_HOST = socket.gethostname()
_SAFE_HOST = re.sub(r"[^A-Za-z0-9_]", "_", _HOST) or "_"
# Every temp name weakstil makes or made: staging_name's (host and pid: removed once that pid is
# gone), and the older schemes (no host: removed by age only): ``<name>.<pid>.partial``,
# ``.<name>.<pid>.tmp``, ``.<name>-<random>.partial`` (mkdtemp), ``.<name>-<ns>.old.partial``,
# ``<name>.partial``, ``.<name>.<pid>-<hex>.creating``, ``.write-test.<pid>``, ``.clock-...``.
_STAGING = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{4,}\.(?:partial|old)$")
_LEGACY = re.compile(r"^(?:.+\.partial|\..+\.\d+\.tmp|\..+\.(?P<pid>\d+)-[0-9a-f]+\.creating"
                     r"|\.write-test\.\d+|\.clock-.+-\d+-[0-9a-f]+)$")  # .creating: by pid too, as before
_HELD: dict[str, Path] = {}  # token → path of every lock this process holds
_HELD_GUARD = threading.Lock()
_heartbeat_thread: threading.Thread | None = None


# --- plain JSON -------------------------------------------------------------------------------
def plain_json(value: Any, *, finite: bool = False) -> Any:
    """``value`` as plain JSON/YAML types: dicts with str keys, lists, str, int, float, bool, None.

    Converts tuples, numpy arrays and scalars, Paths, dataclasses and enums; anything else is a
    TypeError (it would not survive JSON, YAML or ``torch.load(weights_only=True)``). ``finite``:
    NaN and ±inf become None (JSON has no NaN).
    """
    if isinstance(value, dict):
        return {str(k): plain_json(v, finite=finite) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v, finite=finite) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_json(getattr(value, f.name), finite=finite) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return plain_json(value.value, finite=finite)
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "numpy":  # arrays and scalars, without importing numpy here
        return plain_json(value.tolist() if hasattr(value, "ndim") and value.ndim else value.item(),
                          finite=finite)
    if isinstance(value, float):
        return None if finite and not math.isfinite(value) else value
    if value is None or isinstance(value, (str, bool, int)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} as plain JSON: {value!r}")


# --- disk full ----------------------------------------------------------------------------------
def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path)
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def disk_full_error(path: str | Path, exc: OSError):
    """The :class:`DiskFullError` for ``exc`` (ENOSPC/EDQUOT) while writing ``path``."""
    from weakstil.errors import DiskFullError

    what = "the disk quota is used up" if exc.errno == errno.EDQUOT else "the disk is full"
    err = DiskFullError(f"{what} while writing this ({_human(free_bytes(path))} free); "
                        "nothing half-written was left behind", path=path)
    err.errno = exc.errno  # (strerror left unset: OSError would print it instead of the message)
    return err


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and getattr(exc, "errno", None) in DISK_FULL_ERRNOS


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn an ENOSPC/EDQUOT inside into a :class:`DiskFullError` naming ``path``."""
    from weakstil.errors import DiskFullError

    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise disk_full_error(path, exc) from exc


# --- temp names and atomic writes -----------------------------------------------------------------
def staging_name(name: str, suffix: str = "partial") -> str:
    """A hidden temp name for ``name`` that :func:`sweep_partials` can attribute to this process:
    ``.<name>.<host>-<pid>-<hex>.<suffix>`` (suffix ``partial`` or ``old``)."""
    return f".{name}.{_SAFE_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp sibling of ``path``; rename it into place on success, remove it on failure.

    A full disk raises :class:`DiskFullError` naming ``path`` (the temp file removed, an earlier
    ``path`` untouched).
    """
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(staging_name(path.name))
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, doc: Any, *, indent: int | None = 1) -> Path:
    """Write ``doc`` as JSON (NaN → null) to ``path`` atomically."""
    return write_text(path, json.dumps(plain_json(doc, finite=True), indent=indent, allow_nan=False) + "\n")


def write_csv(path: str | Path, header: Iterable[str], rows: Iterable[Iterable[Any]], *,
              only_if_changed: bool = False) -> Path:
    """Write a CSV (header, then rows) to ``path`` atomically; ``only_if_changed`` leaves an
    identical file untouched (its mtime too)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(list(header))
    writer.writerows(rows)
    data = buf.getvalue().encode("utf-8")
    path = Path(path)
    if only_if_changed:
        try:
            if path.read_bytes() == data:
                return path
        except OSError:
            pass
    return write_bytes(path, data)


# --- folders ------------------------------------------------------------------------------------
_RENAMEAT2: Any = None  # libc renameat2, False where there is none


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        try:
            import ctypes

            func = ctypes.CDLL(None, use_errno=True).renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint]
            _RENAMEAT2 = func
        except (OSError, AttributeError):
            _RENAMEAT2 = False
    if _RENAMEAT2 is False:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or filesystem (NFS, some FUSE) without it: two-step swap instead
    if err == errno.ENOENT:
        return False  # ``b`` vanished meanwhile: a plain rename will do
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: Path, final: Path) -> None:
    """Rename a finished folder ``staging`` to ``final``; an old ``final`` is swapped out, then deleted.

    Readers see the old folder or the new one, never a mix (with ``renameat2`` never neither).
    """
    staging, final = Path(staging), Path(final)
    if final.exists() and exchange_paths(staging, final):  # the old folder now sits at ``staging``
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = None
    if final.exists():
        old = final.with_name(staging_name(final.name, "old"))
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(staging, final)
    except OSError:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the old folder back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_dir(final: str | Path) -> Iterator[Path]:
    """A hidden folder beside ``final`` to fill; on success it replaces ``final`` (see
    :func:`replace_dir`), on failure it is removed. A full disk raises :class:`DiskFullError`."""
    final = Path(final)
    staging = final.with_name(staging_name(final.name))
    try:
        with disk_errors(final):
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            yield staging
            replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # clean up only; the error goes on
        raise


def sweep_partials(folder: str | Path, *, max_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the temp files and staging folders of killed processes from ``folder``.

    One is debris when its name (:func:`staging_name`) carries this host and its pid is gone, or,
    whatever its name (any temp scheme weakstil uses or used), when nothing touched it for
    ``max_age_s`` seconds (the only safe test for another host's leftovers).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = _fs_now(Path(folder)) if entries else time.time()
    for entry in entries:
        match = _STAGING.match(entry.name) or _LEGACY.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        here = match.re is _LEGACY or match["host"] == _SAFE_HOST
        dead_here = here and match["pid"] is not None and not _pid_alive(int(match["pid"]))
        if not (dead_here or age > max_age_s):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted run", path)
        removed.append(path)
    return removed


# --- processes ----------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process (Linux), or None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


def _fs_now(folder: Path) -> float:
    """The current time on ``folder``'s file system (a shared folder's server may keep its own)."""
    probe = folder / f".clock-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink(missing_ok=True)
    except OSError:
        return time.time()


# --- locks ------------------------------------------------------------------------------------
def _holder_alive(holder: dict, *, age: float | None = None) -> bool:
    """Whether the process named in a lock may still be running.

    On this host: its pid is alive (not a zombie) with the start time the lock recorded. On another
    host, where the pid cannot be checked: the lock was touched (heartbeat) less than
    :data:`STALE_AFTER_S` ago; ``age`` is seconds since the lock file's last modification.
    """
    if holder.get("host") != _HOST:
        return age is None or age < STALE_AFTER_S
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return holder.get("token") in _HELD  # else: a past process that had our pid
    if not _pid_alive(pid):  # gone, or killed and not yet reaped by its parent (a zombie)
        return False
    stat = _proc_stat(pid)
    start, now = holder.get("start"), None if stat is None else stat[1]
    return start is None or now is None or start == now


def _lock_path(lock_dir: Path, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key).lstrip(".")
    return lock_dir / f"{safe or '_'}.lock"


def _read_lock(path: Path) -> tuple[bytes, dict | None]:
    raw = path.read_bytes()
    try:
        holder = json.loads(raw)
    except ValueError:
        return raw, None
    return raw, holder if isinstance(holder, dict) else None


def _take_over(path: Path, stale_raw: bytes) -> None:
    """Move a stale lock away, checking it is still the one judged stale (not a fresh one)."""
    moved = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # someone else took it over first
    try:
        if moved.read_bytes() != stale_raw:  # raced: that was a new live lock; put it back
            os.link(moved, path)
    except OSError:
        pass
    finally:
        moved.unlink(missing_ok=True)


def _touch_held_locks() -> None:
    """One heartbeat: bump the mtime of every lock this process still holds."""
    with _HELD_GUARD:
        held = list(_HELD.items())
    for token, path in held:
        try:
            _, holder = _read_lock(path)
            if holder is not None and holder.get("token") == token:
                os.utime(path)
        except OSError as exc:
            log.debug("heartbeat of %s failed: %s", path, exc)


def _heartbeat_loop() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        _touch_held_locks()


def _start_heartbeat() -> None:
    global _heartbeat_thread
    with _HELD_GUARD:
        if _heartbeat_thread is not None and _heartbeat_thread.is_alive():
            return
        _heartbeat_thread = threading.Thread(target=_heartbeat_loop, name="weakstil-lock-heartbeat",
                                             daemon=True)
        _heartbeat_thread.start()


class Lock:
    """An acquired lock file; :meth:`release` removes it if it is still ours."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token

    def release(self) -> None:
        with _HELD_GUARD:
            _HELD.pop(self.token, None)
        try:
            _, holder = _read_lock(self.path)
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink()
            else:
                log.warning("lock %s was taken over by another process", self.path)
        except FileNotFoundError:
            log.warning("lock %s vanished while held", self.path)


def _create_lock_file(path: Path, content: dict) -> None:
    """Create ``path`` holding ``content``, or raise FileExistsError; never a moment without it.

    The content is written to a staging file first and hard-linked into place (``link`` fails if
    the name exists, as ``O_EXCL`` does, and is atomic on NFS too), so a process killed while taking
    a lock leaves either no lock or one naming its (dead) pid — never an empty file that would hold
    the slide for :data:`EMPTY_LOCK_GRACE_S`. Where the file system has no hard links, it falls
    back to ``O_CREAT | O_EXCL`` and a write.
    """
    data = json.dumps(content).encode()
    staging = path.with_name(staging_name(path.name))
    try:
        with open(staging, "xb") as f:
            f.write(data)
        try:
            os.link(staging, path)
            return
        except FileExistsError:
            raise
        except OSError as exc:  # no hard links here (some SMB/FAT mounts): the old way
            log.debug("no hard link for %s (%s): creating it in place", path, exc)
    finally:
        Path(staging).unlink(missing_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def acquire_lock(lock_dir: str | Path, key: str) -> tuple[Lock | None, str]:
    """``(Lock, "")`` or ``(None, who holds it)``. Stale locks (owner gone) are taken over."""
    path = _lock_path(Path(lock_dir), key)
    holder_text = "another process"
    for _ in range(4):
        token = uuid.uuid4().hex
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        content = {"pid": os.getpid(), "host": _HOST, "start": _proc_start(os.getpid()),
                   "token": token, "since": since}
        try:
            _create_lock_file(path, content)
        except FileExistsError:
            try:
                raw, holder = _read_lock(path)
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            if holder is None:
                if age < EMPTY_LOCK_GRACE_S:
                    return None, "a process that is just taking the lock"
                _take_over(path, raw)
                continue
            holder_text = (f"pid {holder.get('pid')} on {holder.get('host')} "
                           f"since {holder.get('since')}")
            if holder.get("host") != _HOST:  # judge by heartbeat age, on the folder's own clock
                try:
                    age = _fs_now(path.parent) - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                holder_text += f", last heartbeat {age:.0f} s ago"
            if _holder_alive(holder, age=age):
                return None, holder_text
            log.info("taking over stale lock %s (%s)", path, holder_text)
            _take_over(path, raw)
            continue
        with _HELD_GUARD:
            _HELD[token] = path
        _start_heartbeat()
        return Lock(path, token), ""
    return None, holder_text


def clear_stale_lock(lock_dir: str | Path, key: str) -> None:
    """Remove ``key``'s lock if its holder is gone; a live holder's stays. A run killed between
    finishing an item and releasing its lock leaves one behind, which the next run, finding the item
    done, would otherwise never touch. Costs one ``stat`` when there is no lock."""
    if not _lock_path(Path(lock_dir), key).exists():
        return
    try:
        lock, _ = acquire_lock(lock_dir, key)  # takes a stale lock over
    except OSError as exc:  # a read-only lock folder: the item is done all the same
        log.debug("could not clear the lock of %s: %s", key, exc)
        return
    if lock is not None:
        lock.release()


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An advisory exclusive lock (``flock``) on ``path`` for a short critical section, e.g.
    rebuilding ``scores.csv`` from the slide folders so that the last writer saw the latest state."""
    import fcntl

    path = Path(path)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
