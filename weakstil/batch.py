"""The one per-slide job runner: skip if done, lock, run, record the outcome, go on after an error.

``run_batch(items, job, key=..., is_done=..., lock_dir=...)`` runs ``job(item)`` for every item and
returns one :class:`Outcome` per item. One bad slide never stops the batch: a ``WeakstilError`` (or
any other ``Exception``) is recorded with its reason and fix. Ctrl-C and other ``BaseException``\\ s
release the lock and propagate.

Locks let several processes share a folder: ``<lock_dir>/<key>.lock`` is created with
``O_CREAT | O_EXCL`` and holds the owner's pid, host and process start time. A lock whose process is
gone (same host) is stale and taken over; a live one, or one from another host, makes the item
``skipped`` with reason ``locked``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weakstil.errors import DuplicateSlideIdError, WeakstilError

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
ALREADY_DONE, LOCKED = "already_done", "locked"
UNEXPECTED_FIX = "an unexpected error: run again with --verbose for the traceback and report it"
EMPTY_LOCK_GRACE_S = 60.0  # a lock file with no content yet is being written; later it is debris

_HOST = socket.gethostname()
_HELD_TOKENS: set[str] = set()  # tokens of the locks this process holds


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

    @property
    def ok(self) -> bool:
        return self.status != FAILED


def _default_key(item: Any) -> str:
    """A path's stem (the slide id); anything else as a string."""
    if isinstance(item, os.PathLike):
        return Path(item).stem
    return str(item)


# --- locks --------------------------------------------------------------------------------------
def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _holder_alive(holder: dict) -> bool:
    """Whether the process named in a lock may still be running (unknowable on another host)."""
    if holder.get("host") != _HOST:
        return True
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return holder.get("token") in _HELD_TOKENS  # else: a past process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start, now = holder.get("start"), _proc_start(pid)
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


class Lock:
    """An acquired lock file; :meth:`release` removes it if it is still ours."""

    def __init__(self, path: Path, token: str):
        self.path, self.token = path, token

    def release(self) -> None:
        _HELD_TOKENS.discard(self.token)
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
            if _holder_alive(holder):
                return None, holder_text
            log.info("taking over stale lock %s (%s)", path, holder_text)
            _take_over(path, raw)
            continue
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        content = {"pid": os.getpid(), "host": _HOST, "start": _proc_start(os.getpid()),
                   "token": token, "since": since}
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        _HELD_TOKENS.add(token)
        return Lock(path, token), ""
    return None, holder_text


# --- running ------------------------------------------------------------------------------------
def _failed(key: str, exc: Exception, seconds: float) -> Outcome:
    if isinstance(exc, WeakstilError):
        log.warning("%s failed: %s: %s", key, exc.reason, exc.problem)
        return Outcome(key, FAILED, seconds, error=exc.problem, reason=exc.reason, fix=exc.fix)
    tb = traceback.format_exc()
    log.warning("%s failed: %s: %s", key, type(exc).__name__, exc)
    log.debug("%s traceback:\n%s", key, tb)
    return Outcome(key, FAILED, seconds, error=str(exc) or repr(exc), reason=type(exc).__name__,
                   fix=UNEXPECTED_FIX, traceback=tb)


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
    outcomes: list[Outcome] = []
    with _make_progress(progress) as bar:
        task = bar.add_task(desc, total=len(items), stats="", rate="")
        job_seconds = 0.0
        for item, k in zip(items, keys):
            bar.update(task, description=f"{desc} {k}")
            outcome = run_one(item, job, key=k, is_done=is_done, lock_dir=lock_dir)
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
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

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
