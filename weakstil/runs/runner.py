"""The one per-slide job runner: skip if done, lock, run, record the outcome, go on after an error.

``run_batch(items, job, key=..., is_done=..., lock_dir=...)`` runs ``job(item)`` for every item and
returns one :class:`Outcome` per item. One bad slide never stops the batch: a ``WeakstilError`` (or
any other ``Exception``) is recorded with its reason and fix. Ctrl-C and other ``BaseException``\\ s
release the lock and propagate.

Locks let several processes share a folder: ``<lock_dir>/<key>.lock`` is created with
``O_CREAT | O_EXCL`` and holds the owner's pid, host and process start time. While held, a
background thread touches it every :data:`HEARTBEAT_S` seconds. A lock is stale, and taken over,
when its process is gone (same host: the pid is dead, a zombie, or reused by another process) or,
for a lock from another host, when it has not been touched for :data:`STALE_AFTER_S` seconds (the
age is measured on the shared folder's own clock). A live lock makes the item ``skipped`` with
reason ``locked``.

A full disk or a read-only results folder (ENOSPC, EDQUOT, EROFS, or an ``OutputWriteError`` from a
permission error) is *fatal*: every further item would fail the same way, so the batch stops there
and the items not started are ``skipped`` with reason ``stopped``. SIGTERM, while :func:`run_batch`
runs in the main thread, raises ``SystemExit(143)`` there so that every lock is released on the way
out, as with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weakstil.errors import DuplicateSlideIdError, WeakstilError

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
ALREADY_DONE, LOCKED, STOPPED = "already_done", "locked", "stopped"
UNEXPECTED_FIX = "an unexpected error: run again with --verbose for the traceback and report it"
EMPTY_LOCK_GRACE_S = 60.0  # a lock file with no content yet is being written; later it is debris
HEARTBEAT_S = 30.0  # a held lock file is touched this often
STALE_AFTER_S = 300.0  # a lock from another host not touched for this long is stale
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # every further write would fail too
MMAP_THRESHOLD_BYTES = 4 << 20  # glibc: buffers from this size up are mmapped and returned when freed
STALE_PARTIAL_S = 6 * 3600.0  # a staging leftover untouched this long is debris, whoever left it
_PARTIAL_NAME = re.compile(r"^\..+\.(?:(?P<host>[A-Za-z0-9_]+)-)?(?P<pid>\d+)-[0-9a-f]{4,}\.(?:partial|old)$")

_HOST = socket.gethostname()
_SAFE_HOST = re.sub(r"[^A-Za-z0-9_]", "_", _HOST) or "_"
_HELD: dict[str, Path] = {}  # token → path of every lock this process holds
_HELD_GUARD = threading.Lock()
_heartbeat_thread: threading.Thread | None = None
_heap_limited = False


@dataclass
class Outcome:
    """What happened to one item. ``reason`` is the exception class name, or why it was skipped."""

    key: str
    status: str  # "done" | "skipped" | "failed"
    seconds: float = 0.0
    error: str = ""
    reason: str = ""
    fix: str = ""
    traceback: str = ""  # only for unexpected (non-WeakstilError) failures
    result: Any = field(default=None, repr=False)  # what job() returned
    fatal: bool = False  # a failure that every further item would repeat (full disk, read-only)

    @property
    def ok(self) -> bool:
        return self.status != FAILED


def _default_key(item: Any) -> str:
    """A path's stem (the slide id); anything else as a string."""
    if isinstance(item, os.PathLike):
        return Path(item).stem
    return str(item)


# --- locks --------------------------------------------------------------------------------------
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
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


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


def acquire_lock(lock_dir: str | Path, key: str) -> tuple[Lock | None, str]:
    """``(Lock, "")`` or ``(None, who holds it)``. Stale locks (owner gone) are taken over."""
    path = _lock_path(Path(lock_dir), key)
    holder_text = "another process"
    for _ in range(4):
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
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
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        content = {"pid": os.getpid(), "host": _HOST, "start": _proc_start(os.getpid()),
                   "token": token, "since": since}
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        with _HELD_GUARD:
            _HELD[token] = path
        _start_heartbeat()
        return Lock(path, token), ""
    return None, holder_text


# --- running ------------------------------------------------------------------------------------
def is_fatal(exc: BaseException) -> bool:
    """Whether every further item would fail the same way: a full disk or quota, a read-only file
    system, or results that may not be written (an ``OutputWriteError`` caused by EACCES/EPERM)."""
    from weakstil.errors import OutputWriteError

    seen: set[int] = set()
    current: BaseException | None = exc
    output = False
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        output = output or isinstance(current, OutputWriteError)
        code = getattr(current, "errno", None)
        if code in FATAL_ERRNOS or (output and code in (errno.EACCES, errno.EPERM)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _failed(key: str, exc: Exception, seconds: float) -> Outcome:
    fatal = is_fatal(exc)
    if isinstance(exc, WeakstilError):
        log.warning("%s failed: %s: %s", key, exc.reason, exc.problem)
        return Outcome(key, FAILED, seconds, error=exc.problem, reason=exc.reason, fix=exc.fix, fatal=fatal)
    tb = traceback.format_exc()
    log.warning("%s failed: %s: %s", key, type(exc).__name__, exc)
    log.debug("%s traceback:\n%s", key, tb)
    fix = "free some space (or fix the folder's permissions), then run again" if fatal else UNEXPECTED_FIX
    return Outcome(key, FAILED, seconds, error=str(exc) or repr(exc), reason=type(exc).__name__,
                   fix=fix, traceback=tb, fatal=fatal)


def stopped_outcome(key: str, cause: Outcome) -> Outcome:
    """The outcome of an item not started because ``cause`` stopped the batch."""
    return Outcome(key, SKIPPED, reason=STOPPED,
                   error=f"not started: the run stopped when {cause.key} failed ({cause.reason}: {cause.error})",
                   fix=cause.fix)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` in the main thread (so ``finally`` blocks
    release locks and remove staging folders). Does nothing outside the main thread or when
    another handler is installed already."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        previous = None
    if previous not in (signal.SIG_DFL,):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def staging_name(name: str, suffix: str = "partial") -> str:
    """A hidden staging name for ``name`` that :func:`sweep_partials` can attribute to this process:
    ``.<name>.<host>-<pid>-<hex>.<suffix>``."""
    return f".{name}.{_SAFE_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}"


def sweep_partials(folder: str | Path, *, max_age_s: float = STALE_PARTIAL_S) -> list[Path]:
    """Remove the staging leftovers of killed processes from ``folder``; returns what was removed.

    Staging entries are hidden and named ``.<name>.[<host>-]<pid>-<hex>.partial`` (or ``.old``).
    One is debris when its name carries this host and its pid is gone, or, whatever its name, when
    nothing touched it for ``max_age_s`` seconds (the only safe test for another host's leftovers).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = _fs_now(Path(folder)) if entries else time.time()
    for entry in entries:
        match = _PARTIAL_NAME.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead_here = match["host"] == _SAFE_HOST and not _pid_alive(int(match["pid"]))
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


def run_one(item: Any, job: Callable[[Any], Any], *, key: str,
            is_done: Callable[[Any], bool] | None = None,
            lock_dir: str | Path | None = None) -> Outcome:
    """Skip if done, lock, run ``job(item)``, unlock; one item's :class:`Outcome`."""
    started = time.perf_counter()
    lock: Lock | None = None
    try:
        if is_done is not None and is_done(item):
            return Outcome(key, SKIPPED, reason=ALREADY_DONE)
        if lock_dir is not None:
            lock, holder = acquire_lock(lock_dir, key)
            if lock is None:
                return Outcome(key, SKIPPED, reason=LOCKED, error=f"locked by {holder}",
                               fix=f"another run is working on it; if none is, delete "
                                   f"{_lock_path(Path(lock_dir), key)}")
            if is_done is not None and is_done(item):  # finished while we waited for the lock
                return Outcome(key, SKIPPED, reason=ALREADY_DONE)
        result = job(item)
        return Outcome(key, DONE, time.perf_counter() - started, result=result)
    except Exception as exc:  # one bad item is recorded; the batch goes on
        return _failed(key, exc, time.perf_counter() - started)
    finally:  # also on KeyboardInterrupt, which then propagates
        if lock is not None:
            lock.release()


def limit_heap_fragmentation(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep a long batch's memory from creeping up with the number of tiles (glibc only).

    Tile reading and the encoder allocate and free buffers of many sizes between 1 and 32 MB
    (block regions, tile batches, normalised float batches). glibc serves the first ones from
    mmap, then raises its mmap threshold to the largest size freed, so later ones come from the
    heap, which fragments and is not given back: measured +0.46 GB of peak RSS extracting a
    60,000² px slide against a 10,000² px one, +0.17 GB with this (mostly the tissue mask of the
    bigger thumbnail). A fixed threshold (4 MiB; 16 MiB does not help) makes those buffers mmapped
    and returned to the OS when freed, at the cost of more page faults (about 5 % more CPU time
    per tile, measured on 2 cores).
    Applies once per process (forked tile readers inherit it); ``MALLOC_MMAP_THRESHOLD_`` in the
    environment wins (set it to 33554432 for glibc's usual behaviour). Returns whether the setting
    is in effect.
    """
    global _heap_limited
    if _heap_limited:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _heap_limited = bool(mallopt(m_mmap_threshold, int(threshold))) and bool(mallopt(m_trim_threshold, int(threshold)))
    return _heap_limited


def run_batch(items: Iterable[Any], job: Callable[[Any], Any], *,
              key: Callable[[Any], str] = _default_key,
              is_done: Callable[[Any], bool] | None = None, desc: str = "extract",
              lock_dir: str | Path | None = None, progress: bool = True,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run ``job`` on every item (in order) with a progress bar; one Outcome per item.

    ``key(item)`` names the item (default: a path's stem); keys must be unique. ``is_done(item)``
    true means skip. ``lock_dir`` enables per-item lock files so processes can share the work.
    ``on_outcome`` is called after each item (e.g. to write results as they come).
    """
    items = list(items)
    keys = [key(item) for item in items]
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise DuplicateSlideIdError(f"items share a key: {', '.join(dupes)}")
    if lock_dir is not None:
        Path(lock_dir).mkdir(parents=True, exist_ok=True)
    limit_heap_fragmentation()
    outcomes: list[Outcome] = []
    stop: Outcome | None = None
    with sigterm_raises(), _make_progress(progress) as bar:
        task = bar.add_task(desc, total=len(items), stats="", rate="")
        job_seconds = 0.0
        for item, k in zip(items, keys):
            if stop is not None:
                outcome = stopped_outcome(k, stop)
            else:
                bar.update(task, description=f"{desc} {k}")
                outcome = run_one(item, job, key=k, is_done=is_done, lock_dir=lock_dir)
                if outcome.fatal:
                    log.error("stopping: %s failed with %s: %s", k, outcome.reason, outcome.error)
                    stop = outcome
            outcomes.append(outcome)
            n = counts(outcomes)
            if outcome.status != SKIPPED:
                job_seconds += outcome.seconds
            ran = n[DONE] + n[FAILED]
            bar.update(task, advance=1, description=desc, rate=_rate_text(ran, job_seconds),
                       stats=f"{n[DONE]} done, {n[SKIPPED]} skipped, {n[FAILED]} failed")
            if on_outcome is not None:
                on_outcome(outcome)
    return outcomes


def _rate_text(n: int, seconds: float) -> str:
    if n == 0 or seconds <= 0:
        return ""
    per = seconds / n
    return f"{per:.1f} s/slide" if per >= 1 else f"{1 / per:.1f} slides/s"


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None


def _make_progress(enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[stats]}"), console=Console(stderr=True))


# --- reporting ----------------------------------------------------------------------------------
def counts(outcomes: Iterable[Outcome]) -> Counter:
    """Outcomes per status (``done``, ``skipped``, ``failed`` always present)."""
    n = Counter({DONE: 0, SKIPPED: 0, FAILED: 0})
    n.update(o.status for o in outcomes)
    return n


def summarize(outcomes: list[Outcome]) -> Any:
    """A rich renderable: counts per status with their reasons, then each failure and its fix."""
    from rich.console import Group
    from rich.table import Table

    n = counts(outcomes)
    table = Table(title=f"{len(outcomes)} items", title_justify="left")
    table.add_column("status")
    table.add_column("count", justify="right")
    table.add_column("reasons")
    for status, style in ((DONE, "green"), (SKIPPED, "yellow"), (FAILED, "red")):
        reasons = Counter(o.reason for o in outcomes if o.status == status and o.reason)
        text = ", ".join(f"{r} {c}" for r, c in reasons.most_common())
        table.add_row(f"[{style}]{status}[/]", str(n[status]), text)
    failed = [o for o in outcomes if o.status == FAILED]
    if not failed:
        return table
    details = Table(title="failures", title_justify="left")
    for column in ("key", "reason", "error", "fix"):
        details.add_column(column, overflow="fold")
    for o in failed:
        details.add_row(o.key, o.reason, o.error, o.fix)
    return Group(table, details)


def write_outcomes_csv(outcomes: Iterable[Outcome], path: str | Path) -> Path:
    """``key,status,seconds,reason,error,fix`` per item, written to a temp name then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["key", "status", "seconds", "reason", "error", "fix"])
            for o in outcomes:
                writer.writerow([o.key, o.status, f"{o.seconds:.3f}", o.reason, o.error, o.fix])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
