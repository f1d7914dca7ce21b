"""The one per-slide loop: skip if done, lock, run, record the outcome, go on after an error.

``run_batch(items, job, executor=...)`` runs a job (a :mod:`weakstil.runs.jobs` object with
``key``, ``is_done``, ``run`` and ``lock_dir``, or a plain callable) on every item and returns one
:class:`Outcome` per item, in order. Where the items run is the executor's business
(:class:`LocalExecutor`: here, in order; :class:`weakstil.runs.executors.DaskExecutor`: as Dask
tasks); the recording (progress, stop on a fatal error, ``on_outcome``) is written once, here.

One bad slide never stops the batch: a ``WeakstilError`` (or any other ``Exception``) is recorded
with its reason and fix. Ctrl-C and other ``BaseException``\\ s release the lock and propagate.
A slide locked by another live process (see :mod:`weakstil.fs`) is ``skipped`` with reason
``locked`` (the command line exits 3 then), unless ``wait`` is set: then the run waits for the lock
and skips the slide as done when the other process finished it.

A full disk or a read-only results folder (ENOSPC, EDQUOT, EROFS, or an ``OutputWriteError`` from a
permission error) is *fatal*: every further item would fail the same way, so the batch stops there
and the items not started are ``skipped`` with reason ``stopped``. SIGTERM, while :func:`run_batch`
runs in the main thread, raises ``SystemExit(143)`` there so that every lock is released on the way
out, as with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakstil.errors import DuplicateSlideIdError, WeakstilError
from weakstil.fs import (  # noqa: F401  (the lock API, re-exported for callers of the runner)
    EMPTY_LOCK_GRACE_S,
    HEARTBEAT_S,
    STALE_AFTER_S,
    STALE_PARTIAL_S,
    Lock,
    _lock_path,
    acquire_lock,
    clear_stale_lock,
    sweep_partials,
    write_csv,
)
from weakstil.progress import progress as progress_display
from weakstil.progress import rate_text

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
ALREADY_DONE, LOCKED, STOPPED = "already_done", "locked", "stopped"
UNEXPECTED_FIX = "an unexpected error: run again with --verbose for the traceback and report it"
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}  # every further write would fail too
WAIT_POLL_S = 2.0  # how often a waiting run looks at a lock held by another process

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


def _output_gone(outcome: Outcome, job: Any) -> Outcome:
    """A failure explained by an output folder that vanished mid-run (deleted, moved, unmounted):
    every further item would fail the same way, so it becomes one fatal, typed error that names the
    folder instead of the same FileNotFoundError on every slide left."""
    missing = getattr(job, "outputs_missing", None)
    gone = missing() if callable(missing) else []
    if not gone:
        return outcome
    from weakstil.errors import OutputFolderGoneError

    exc = OutputFolderGoneError(f"the output folder {gone[0]} disappeared during the run (deleted, moved or "
                                f"unmounted); {outcome.key} failed on it ({outcome.reason}: {outcome.error})",
                                path=gone[0])
    return Outcome(outcome.key, FAILED, outcome.seconds, error=exc.problem, reason=exc.reason, fix=exc.fix,
                   traceback=outcome.traceback, fatal=True)


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


def _acquire(lock_dir: str | Path, key: str, wait: bool) -> tuple[Lock | None, str]:
    """The item's lock; with ``wait``, poll until the other process lets go of it."""
    while True:
        lock, holder = acquire_lock(lock_dir, key)
        if lock is not None or not wait:
            return lock, holder
        log.info("%s is locked by %s: waiting", key, holder)
        time.sleep(WAIT_POLL_S)


def run_one(item: Any, job: Callable[[Any], Any], *, key: str,
            is_done: Callable[[Any], bool] | None = None,
            lock_dir: str | Path | None = None, wait: bool = False) -> Outcome:
    """Skip if done, lock, run ``job(item)``, unlock; one item's :class:`Outcome`."""
    started = time.perf_counter()
    lock: Lock | None = None
    try:
        if is_done is not None and is_done(item):
            if lock_dir is not None:  # a run killed after finishing it may have left its lock
                clear_stale_lock(lock_dir, key)
            return Outcome(key, SKIPPED, reason=ALREADY_DONE)
        if lock_dir is not None:
            lock, holder = _acquire(lock_dir, key, wait)
            if lock is None:
                return Outcome(key, SKIPPED, reason=LOCKED, error=f"locked by {holder}",
                               fix=f"another run is working on it (rerun with --wait to wait for it); if none "
                                   f"is, delete {_lock_path(Path(lock_dir), key)}")
            if is_done is not None and is_done(item):  # finished while we waited for the lock
                return Outcome(key, SKIPPED, reason=ALREADY_DONE)
        result = job(item)
        return Outcome(key, DONE, time.perf_counter() - started, result=result)
    except Exception as exc:  # one bad item is recorded; the batch goes on
        return _failed(key, exc, time.perf_counter() - started)
    finally:  # also on KeyboardInterrupt, which then propagates
        if lock is not None:
            lock.release()


_UNSET: Any = object()


def job_parts(job: Any, *, key=None, is_done=None, lock_dir=_UNSET) -> tuple[Callable, Callable, Any, Any]:
    """(run, key, is_done, lock_dir) of a job object (``.run``, ``.key``, ``.is_done``,
    ``.lock_dir``) or a plain callable; explicit arguments win."""
    if hasattr(job, "run"):
        return (job.run, key or job.key, is_done if is_done is not None else job.is_done,
                job.lock_dir if lock_dir is _UNSET else lock_dir)
    return job, key or _default_key, is_done, None if lock_dir is _UNSET else lock_dir


class LocalExecutor:
    """Runs the items here, one after the other, in order."""

    width = 1

    def __init__(self) -> None:
        self._stopped: Outcome | None = None

    def outcomes(self, items: list, keys: list[str], job: Any, *, is_done=None, lock_dir=None,
                 wait: bool = False) -> Iterator[Outcome]:
        run = job.run if hasattr(job, "run") else job
        for item, k in zip(items, keys):
            if self._stopped is not None:
                yield stopped_outcome(k, self._stopped)
            else:
                yield run_one(item, run, key=k, is_done=is_done, lock_dir=lock_dir, wait=wait)

    def stop(self, cause: Outcome) -> None:
        """Start no further item (they become ``skipped``, reason ``stopped``)."""
        self._stopped = cause


def run_batch(items: Iterable[Any], job: Any, *, key: Callable[[Any], str] | None = None,
              is_done: Callable[[Any], bool] | None = None, desc: str = "extract",
              lock_dir: str | Path | None = _UNSET, progress: bool = True,
              on_outcome: Callable[[Outcome], None] | None = None, executor: Any = None,
              wait: bool = False) -> list[Outcome]:
    """Run ``job`` on every item with a progress bar; one Outcome per item, in the items' order.

    ``job`` is a job object (see :mod:`weakstil.runs.jobs`) or a callable; ``key(item)`` names the
    item (default: the job's key, or a path's stem); keys must be unique. ``is_done(item)`` true
    means skip. ``lock_dir`` enables per-item lock files so processes can share the work; ``wait``
    waits for items another process holds instead of leaving them to it. ``executor`` decides
    where items run (default :class:`LocalExecutor`). ``on_outcome`` is called after each item
    (e.g. to write results as they come).
    """
    _, key, is_done, lock_dir = job_parts(job, key=key, is_done=is_done, lock_dir=lock_dir)
    items = list(items)
    keys = [key(item) for item in items]
    dupes = sorted(k for k, n in Counter(keys).items() if n > 1)
    if dupes:
        raise DuplicateSlideIdError(f"items share a key: {', '.join(dupes)}")
    if lock_dir is not None:
        Path(lock_dir).mkdir(parents=True, exist_ok=True)
        sweep_partials(lock_dir)  # staging copies of locks a killed run was taking
    executor = executor if executor is not None else LocalExecutor()
    by_key: dict[str, Outcome] = {}
    stop: Outcome | None = None
    with sigterm_raises(), progress_display(progress) as bar:
        task = bar.add_task(desc, total=len(items), unit="slides")
        job_seconds = 0.0
        for outcome in executor.outcomes(items, keys, job, is_done=is_done, lock_dir=lock_dir, wait=wait):
            if outcome.status == FAILED and not outcome.fatal:
                outcome = _output_gone(outcome, job)
            if outcome.fatal and stop is None:
                log.error("stopping: %s failed with %s: %s", outcome.key, outcome.reason, outcome.error)
                stop = outcome
                executor.stop(stop)
            by_key[outcome.key] = outcome
            n = counts(by_key.values())
            if outcome.status != SKIPPED:
                job_seconds += outcome.seconds
            ran = n[DONE] + n[FAILED]
            bar.update(task, advance=1, description=desc,
                       rate=rate_text(ran, job_seconds / max(1, getattr(executor, "width", 1)), "slides"),
                       stats=f"{n[DONE]} done, {n[SKIPPED]} skipped, {n[FAILED]} failed")
            if on_outcome is not None:
                on_outcome(outcome)
    return [by_key[k] for k in keys]


def left_to_others(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """The items skipped because another live process holds their lock."""
    return [o for o in outcomes if o.status == SKIPPED and o.reason == LOCKED]


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
    """``key,status,seconds,reason,error,fix`` per item, written atomically."""
    return write_csv(path, ["key", "status", "seconds", "reason", "error", "fix"],
                     ([o.key, o.status, f"{o.seconds:.3f}", o.reason, o.error, o.fix] for o in outcomes))
