"""Slides as Dask tasks: ``weakstil extract|score --workers N`` or ``--scheduler tcp://host:port``.

The client (the ``weakstil`` command) sends one task per slide; each task runs the same per-slide
job as the in-process run, through :func:`weakstil.runs.runner.run_one`, so the same skip-if-done check,
the same per-slide lock files and the same atomic outputs apply. Several clients, machines, or a
client and an in-process run may therefore share one folder without doing a slide twice.

Each worker process builds the job once (encoder on its device, model, feature cache) and keeps it
in :data:`_JOBS` for every further slide of the same run. A task whose worker dies (killed, out of
memory) is rerun by Dask on another worker; the dead worker's lock is stale (its pid is gone, or
its heartbeat stops on another host) and is taken over. A slide that kills
``distributed.scheduler.allowed-failures`` + 1 workers (default 4) is recorded as failed.

Outcomes come back to the client, which shows progress with a rate, rebuilds ``scores.csv`` (score)
and writes ``runs/<run>.json`` with the score.py functions, and returns the outcomes (one per source,
in order) to the command line, which prints the summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from weakstil.errors import DuplicateSlideIdError, WeakstilError
from weakstil.runs.runner import (
    DONE,
    FAILED,
    SKIPPED,
    Outcome,
    _failed,
    _make_progress,
    _rate_text,
    counts,
    limit_heap_fragmentation,
    run_one,
    sigterm_raises,
    stopped_outcome,
    sweep_partials,
)

log = logging.getLogger(__name__)

KINDS = ("extract", "score")
CSV_EVERY_S = 5.0  # rebuild scores.csv at most this often while outcomes arrive (and at the end)
CONNECT_TIMEOUT_S = 20

# worker side: {job key: (job, lock_dir)}; one entry, replaced when a run with other arguments comes
_JOBS: dict[str, tuple[Any, Path | None]] = {}
_JOBS_GUARD = threading.Lock()


class SchedulerError(WeakstilError, ConnectionError):
    fix = ("check the address (tcp://host:port, as `dask scheduler` prints it) and that the scheduler is "
           "running and reachable from this machine; or use --workers N for a cluster on this machine")


class WorkerCrashError(WeakstilError, RuntimeError):
    fix = ("the slide crashed every worker that tried it (out of memory? a crash in a decoder?); "
           "check it with `weakstil check`, give the workers more memory, or score it alone in-process")


# --- worker side -------------------------------------------------------------------------------
def _job_key(kind: str, job_args: dict) -> str:
    return hashlib.sha256(repr((kind, sorted(job_args.items()))).encode()).hexdigest()


def _worker_name() -> Any:
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):
        return None


def _worker_device(device: str) -> str:
    """The device of this worker: on a machine with several GPUs, LocalCluster worker ``i`` takes
    GPU ``i % n`` (an external worker is pinned with CUDA_VISIBLE_DEVICES)."""
    from weakstil.embed.extract import resolve_device

    device = resolve_device(device)
    if device != "cuda":
        return device
    import torch

    n_gpus = torch.cuda.device_count()
    name = _worker_name()
    if n_gpus > 1 and isinstance(name, int):
        return f"cuda:{name % n_gpus}"
    return device


def _worker_options(opts, hints: dict):
    """The client's ExtractOptions adapted to this worker process: its device, no progress bars,
    torch threads shared among the workers of this host, and tile-reading processes only where a
    worker may start child processes."""
    import multiprocessing

    import torch

    device = _worker_device(opts.device)
    changes: dict[str, Any] = {"device": device, "progress": False}
    if multiprocessing.current_process().daemon and (opts.workers is None or opts.workers > 0):
        log.warning("this Dask worker is a daemon process, which may not start tile-reading processes: "
                    "reading in the worker itself (start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False)")
        changes["workers"] = 0
    if device == "cpu":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cpus // max(1, int(hints.get("workers_per_host", 1)))))
    return dataclasses.replace(opts, **changes)


def build_job(kind: str, job_args: dict, hints: dict | None = None) -> tuple[Any, Path | None]:
    """(per-slide job, lock folder) for ``kind`` from the CLI's ``job_args``; loads encoder/model."""
    hints = hints or {}
    limit_heap_fragmentation()
    opts = _worker_options(job_args["opts"], hints)
    if kind == "extract":
        from weakstil.embed.encoders import create_encoder
        from weakstil.embed.extract import SlideExtractor, TileEmbedder, open_cache

        encoder = create_encoder(job_args["encoder"], job_args.get("weights"))
        cache = open_cache(job_args["features"], encoder, job_args["spec"], job_args["tissue"])
        job = SlideExtractor(cache, TileEmbedder(encoder, opts.device), job_args["spec"], job_args["tissue"],
                             opts, roi_dir=job_args.get("roi_dir"))
        lock_dir = cache.path / ".locks" if job_args.get("lock", True) else None
    elif kind == "score":
        from weakstil.outputs.score import make_scorer

        job = make_scorer(job_args["model"], job_args["features"], job_args["out"], weights=job_args.get("weights"),
                          opts=opts, roi_dir=job_args.get("roi_dir"),
                          formats=job_args.get("formats", ("csv", "png", "tif", "geojson", "top")),
                          **({"cutoff": job_args["cutoff"]} if "cutoff" in job_args else {}))
        lock_dir = Path(job_args["out"]) / ".locks" if job_args.get("lock", True) else None
    else:
        raise ValueError(f"unknown kind {kind!r}: use one of {KINDS}")
    if lock_dir is not None:
        lock_dir.mkdir(parents=True, exist_ok=True)
    return job, lock_dir


def _cached_job(kind: str, job_args: dict, hints: dict) -> tuple[Any, Path | None]:
    """This worker process's job for these arguments, built on its first slide and kept."""
    key = _job_key(kind, job_args)
    with _JOBS_GUARD:
        if key not in _JOBS:
            _JOBS.clear()  # a long-lived worker moving on to another run: free the old model first
            _JOBS[key] = build_job(kind, job_args, hints)
        return _JOBS[key]


def run_slide_task(kind: str, job_args: dict, source, hints: dict | None = None) -> Outcome:
    """The Dask task: one slide's Outcome (skip if done, lock, run, unlock), never an exception."""
    key = source.slide_id
    try:
        job, lock_dir = _cached_job(kind, job_args, hints or {})
    except Exception as exc:  # e.g. weights not readable on this machine: that slide fails, the run goes on
        return _failed(key, exc, 0.0)
    return run_one(source, job, key=key, is_done=job.is_done, lock_dir=lock_dir)


# --- client side -------------------------------------------------------------------------------
@contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None) -> Iterator[Any]:
    """A Client of a new LocalCluster on loopback (``workers`` processes) or of ``scheduler``."""
    import dask
    from distributed import Client, LocalCluster

    with ExitStack() as stack:
        if scheduler:
            try:
                client = stack.enter_context(Client(scheduler, timeout=CONNECT_TIMEOUT_S))
            except (OSError, TimeoutError) as exc:
                raise SchedulerError(f"cannot reach the Dask scheduler at {scheduler} ({exc})") from exc
            yield client
            return
        # worker processes may start tile-reading processes (weakstil.embed.loader); must hold while the
        # nannies restart killed workers, so for the whole run
        stack.enter_context(dask.config.set({"distributed.worker.daemon": False}))
        cluster = stack.enter_context(LocalCluster(
            n_workers=int(workers or 1), threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR))
        yield stack.enter_context(Client(cluster))


def _workers_per_host(client) -> int:
    """The most worker processes on one host (to share its CPU cores among them)."""
    from collections import Counter
    from urllib.parse import urlparse

    hosts = Counter(urlparse(address).hostname for address in client.nthreads())
    return max(hosts.values(), default=1)


def _validate_score(job_args: dict) -> str:
    """Fail fast on the client (exit 2), before any worker starts: results folder writable, model
    readable, its encoder and tiling rebuildable and matching the cache. Returns the model's sha256."""
    from weakstil.embed.extract import ExtractOptions
    from weakstil.outputs.score import check_out_dir, make_scorer

    out = Path(job_args["out"])
    check_out_dir(out)
    opts = dataclasses.replace(job_args.get("opts") or ExtractOptions(), device="cpu", progress=False)
    scorer = make_scorer(job_args["model"], job_args["features"], out, weights=job_args.get("weights"), opts=opts,
                         roi_dir=job_args.get("roi_dir"), formats=job_args.get("formats", ("csv",)))
    return scorer.model_sha256


def _crash_outcome(key: str, exc: BaseException, seconds: float) -> Outcome:
    """A task that ended in a Dask error (its workers died, or it was cancelled)."""
    name = type(exc).__name__
    if name == "KilledWorker":
        err = WorkerCrashError(f"the workers scoring {key} died while working on it ({exc})")
        return Outcome(key, FAILED, seconds, error=err.problem, reason=err.reason, fix=err.fix)
    return Outcome(key, FAILED, seconds, error=str(exc) or repr(exc), reason=name,
                   fix="run again; if it repeats, run with --workers 1 to see the error in-process")


def run_on_dask(kind: str, sources: list, job_args: dict, *, workers: int | None = None,
                scheduler: str | None = None, progress: bool | None = None,
                on_outcome=None) -> list[Outcome]:
    """Run ``kind`` ("extract" or "score") on every source as Dask tasks; one Outcome per source, in order.

    ``workers``: start a LocalCluster of that many processes on 127.0.0.1; ``scheduler``: use the
    cluster at that address instead. ``job_args`` are the CLI's (see :func:`build_job`). For
    ``score`` the client writes ``scores.csv`` (as outcomes arrive, and at the end) and
    ``runs/<run_id>.json``. A fatal failure (full disk, read-only results) cancels the slides not
    started yet (``skipped``, reason ``stopped``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {KINDS}")
    if not workers and not scheduler:
        raise ValueError("give workers (a local cluster) or scheduler (an address)")
    sources = list(sources)
    keys = [s.slide_id for s in sources]
    seen: set[str] = set()
    dupes = sorted({k for k in keys if k in seen or seen.add(k)})
    if dupes:
        raise DuplicateSlideIdError(f"slides share an id: {', '.join(dupes)}")
    opts = job_args.get("opts")
    if progress is None:
        progress = bool(getattr(opts, "progress", True))
    model_sha = _validate_score(job_args) if kind == "score" else None
    out_dir = Path(job_args["out"]) if kind == "score" else None
    if out_dir is not None:  # staging folders left by killed runs
        sweep_partials(out_dir)
        sweep_partials(out_dir / "slides")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    by_id: dict[str, Outcome] = {}
    last_csv = 0.0

    def write_csv(force: bool = False) -> None:
        nonlocal last_csv
        if out_dir is None or (not force and time.perf_counter() - last_csv < CSV_EVERY_S):
            return
        from weakstil.outputs.score import write_scores_csv

        write_scores_csv(out_dir, sources, by_id, model_sha)  # takes the scores.csv file lock itself
        last_csv = time.perf_counter()

    with sigterm_raises(), dask_client(workers, scheduler) as client:
        hints = {"workers_per_host": _workers_per_host(client)}
        token = uuid.uuid4().hex[:8]
        futures = {client.submit(run_slide_task, kind, job_args, source, hints, pure=False,
                                 key=f"weakstil-{kind}-{token}-{i}-{source.slide_id}"): (i, source.slide_id)
                   for i, source in enumerate(sources)}
        submitted = {k: time.perf_counter() for k in keys}
        stop: Outcome | None = None
        first_at: float | None = None  # when the first slide came back: the rate excludes start-up
        try:
            with _make_progress(progress) as bar:
                task = bar.add_task(f"{kind} ({_cluster_text(client, workers)})", total=len(sources), stats="",
                                    rate="")
                from distributed import as_completed

                for future in as_completed(list(futures)):
                    _, key = futures[future]
                    try:
                        outcome = future.result()
                    except Exception as exc:  # KilledWorker, CancelledError, a lost connection
                        if stop is not None and type(exc).__name__ == "CancelledError":
                            outcome = stopped_outcome(key, stop)
                        else:
                            outcome = _crash_outcome(key, exc, time.perf_counter() - submitted[key])
                    by_id[key] = outcome
                    if outcome.fatal and stop is None:
                        log.error("stopping: %s failed with %s: %s", key, outcome.reason, outcome.error)
                        stop = outcome
                        client.cancel([f for f in futures if not f.done()])
                    n = counts(by_id.values())
                    ran = n[DONE] + n[FAILED]
                    if ran == 1 and first_at is None:
                        first_at = time.perf_counter()
                    rate = _rate_text(ran - 1, time.perf_counter() - first_at) if first_at is not None else ""
                    bar.update(task, advance=1, rate=rate,
                               stats=f"{n[DONE]} done, {n[SKIPPED]} skipped, {n[FAILED]} failed")
                    if on_outcome is not None:
                        on_outcome(outcome)
                    write_csv()
        finally:  # also on Ctrl-C / SIGTERM: what finished is recorded
            if out_dir is not None and by_id:
                _write_score_records(out_dir, sources, by_id, model_sha, run_id, job_args, workers, scheduler,
                                     write_csv)
    return [by_id[k] for k in keys]


def _write_score_records(out_dir: Path, sources, by_id: dict, model_sha: str, run_id: str, job_args: dict,
                         workers, scheduler, write_csv) -> None:
    from weakstil.outputs.score import write_run_json

    write_csv(force=True)
    ordered = [by_id[s.slide_id] for s in sources if s.slide_id in by_id]
    write_run_json(out_dir, ordered, run_id=run_id,
                   info={"run_id": run_id, "model": str(job_args["model"]), "model_sha256": model_sha,
                         "features": str(job_args["features"]), "host": os.uname().nodename, "pid": os.getpid(),
                         "dask": {"workers": workers, "scheduler": scheduler}})


def _cluster_text(client, workers: int | None) -> str:
    try:
        n = len(client.nthreads())
    except Exception:  # purely cosmetic
        n = workers or 0
    return f"{n} Dask worker{'s' if n != 1 else ''}"
