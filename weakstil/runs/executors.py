"""Where the items of a batch run: here (:class:`weakstil.runs.runner.LocalExecutor`) or as Dask
tasks (:class:`DaskExecutor`: ``weakstil extract|score --workers N`` or ``--scheduler ADDRESS``; in
Python any ``distributed.Client``, a cluster object such as dask-jobqueue's ``SLURMCluster``, or an
address, through :func:`dask_client`).

The client sends one task per slide; each task runs the same per-slide job (a
:mod:`weakstil.runs.jobs` object, pickled without its heavy state) as the in-process run, through
:func:`weakstil.runs.runner.run_one`, so the same skip-if-done check,
the same per-slide lock files and the same atomic outputs apply. Several clients, machines, or a
client and an in-process run may therefore share one folder without doing a slide twice.

Each worker process builds the job once (encoder on its device, model, feature cache) and keeps it
in :data:`_JOBS` for every further slide of the same run. A task whose worker dies (killed, out of
memory) is rerun by Dask on another worker; the dead worker's lock is stale (its pid is gone, or
its heartbeat stops on another host) and is taken over. A slide that kills
``distributed.scheduler.allowed-failures`` + 1 workers (default 4) is recorded as failed.

Outcomes come back to the client's :func:`weakstil.runs.runner.run_batch` loop, the same one as for
an in-process run: progress, stop on a fatal error, ``scores.csv`` and ``runs/<run>.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from weakstil.errors import ConfigError, WeakstilError
from weakstil.runs.runner import (
    FAILED,
    Outcome,
    _failed,
    run_one,
    stopped_outcome,
)

log = logging.getLogger(__name__)

KINDS = ("extract", "score")
CONNECT_TIMEOUT_S = 20

# worker side: {job token: job}; one entry, replaced when a run with other arguments comes
_JOBS: dict[str, Any] = {}
_JOBS_GUARD = threading.Lock()


class SchedulerError(WeakstilError, ConnectionError):
    fix = ("check the address (tcp://host:port, as `dask scheduler` prints it) and that the scheduler is "
           "running and reachable from this machine; or use --workers N for a cluster on this machine")


class WorkerCrashError(WeakstilError, RuntimeError):
    fix = ("the slide crashed every worker that tried it (out of memory? a crash in a decoder?); "
           "check it with `weakstil check`, give the workers more memory, or score it alone in-process")


# --- worker side -------------------------------------------------------------------------------
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


def _worker_job(job: Any, token: str, hints: dict) -> Any:
    """This worker process's copy of ``job``, adapted and built on its first slide and kept."""
    with _JOBS_GUARD:
        if token not in _JOBS:
            _JOBS.clear()  # a long-lived worker moving on to another run: free the old model first
            if getattr(job, "opts", None) is not None:
                job = job.for_worker(_worker_options(job.opts, hints))
            job.prepare()
            if job.lock_dir is not None:
                Path(job.lock_dir).mkdir(parents=True, exist_ok=True)
            _JOBS[token] = job
        return _JOBS[token]


def run_slide_task(job: Any, token: str, item: Any, hints: dict | None = None, wait: bool = False) -> Outcome:
    """The Dask task: one slide's Outcome (skip if done, lock, run, unlock), never an exception."""
    key = job.key(item)
    try:
        job = _worker_job(job, token, hints or {})
    except Exception as exc:  # e.g. weights not readable on this machine: that slide fails, the run goes on
        return _failed(key, exc, 0.0)
    return run_one(item, job.run, key=key, is_done=job.is_done, lock_dir=job.lock_dir, wait=wait)


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


# --- client side -------------------------------------------------------------------------------
@contextmanager
def dask_client(workers: int | None = None, scheduler: Any = None) -> Iterator[Any]:
    """A Client of a new LocalCluster on loopback (``workers`` processes) or of ``scheduler``: an
    address (``tcp://host:port``), a running cluster object (LocalCluster, a dask-jobqueue
    SLURMCluster/PBSCluster …) or a Client, which is used as it is."""
    import dask
    from distributed import Client, LocalCluster

    with ExitStack() as stack:
        if scheduler is not None and hasattr(scheduler, "submit"):  # a Client already
            yield scheduler
            return
        if scheduler is not None and not isinstance(scheduler, str):  # a cluster object
            yield stack.enter_context(Client(scheduler))
            return
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


def _crash_outcome(key: str, exc: BaseException, seconds: float) -> Outcome:
    """A task that ended in a Dask error (its workers died, or it was cancelled)."""
    name = type(exc).__name__
    if name == "KilledWorker":
        err = WorkerCrashError(f"the workers scoring {key} died while working on it ({exc})")
        return Outcome(key, FAILED, seconds, error=err.problem, reason=err.reason, fix=err.fix)
    return Outcome(key, FAILED, seconds, error=str(exc) or repr(exc), reason=name,
                   fix="run again; if it repeats, run with --workers 1 to see the error in-process")


def _cluster_text(client, workers: int | None) -> str:
    try:
        n = len(client.nthreads())
    except Exception:  # purely cosmetic
        n = workers or 0
    return f"{n} Dask worker{'s' if n != 1 else ''}"


class DaskExecutor:
    """Runs the items as Dask tasks on ``client`` (a ``distributed.Client``), yielding outcomes as they
    complete. Each worker process builds the job once (:func:`run_slide_task`); a worker that dies
    has its task rerun elsewhere, and its lock is stale and taken over."""

    local = False

    def __init__(self, client: Any):
        self.client = client
        self._futures: dict = {}
        self._stopped: Outcome | None = None
        try:
            self.width = max(1, len(client.nthreads()))
        except Exception:  # purely for the rate shown
            self.width = 1

    def outcomes(self, items: list, keys: list[str], job: Any, *, is_done=None, lock_dir=None,
                 wait: bool = False) -> Iterator[Outcome]:
        from distributed import as_completed

        if not hasattr(job, "run"):
            raise TypeError("a Dask run needs a job object (weakstil.runs.jobs), not a plain function")
        hints = {"workers_per_host": _workers_per_host(self.client)}
        token = uuid.uuid4().hex[:8]
        self._futures = {self.client.submit(run_slide_task, job, token, item, hints, wait, pure=False,
                                            key=f"weakstil-{token}-{i}-{k}"): k
                         for i, (item, k) in enumerate(zip(items, keys))}
        submitted = time.perf_counter()
        for future in as_completed(list(self._futures)):
            key = self._futures[future]
            try:
                yield future.result()
            except Exception as exc:  # KilledWorker, CancelledError, a lost connection
                if self._stopped is not None and type(exc).__name__ == "CancelledError":
                    yield stopped_outcome(key, self._stopped)
                else:
                    yield _crash_outcome(key, exc, time.perf_counter() - submitted)

    def stop(self, cause: Outcome) -> None:
        """Cancel the tasks not finished yet (they become ``skipped``, reason ``stopped``)."""
        self._stopped = cause
        self.client.cancel([f for f in self._futures if not f.done()])


def run_on_dask(kind: str, sources: list, job_args: dict, *, workers: int | None = None,
                scheduler: Any = None, on_outcome=None, wait: bool = False) -> list[Outcome]:
    """Run ``kind`` ("extract" or "score") on every source as Dask tasks; one Outcome per source, in order.

    ``workers``: start a LocalCluster of that many processes on 127.0.0.1; ``scheduler``: use that
    cluster instead (an address, a cluster object such as a dask-jobqueue ``SLURMCluster``, or a
    Client). ``job_args`` are the CLI's. The batch itself is :mod:`weakstil.runs.batch`'s, with a
    :class:`DaskExecutor`.
    """
    from weakstil.runs.batch import extract_slides, score_slides

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {KINDS}")
    if not workers and scheduler is None:
        raise ValueError("give workers (a local cluster) or scheduler (an address, cluster or client)")
    a = job_args
    with dask_client(workers, scheduler) as client:
        executor = DaskExecutor(client)
        if kind == "extract":
            return extract_slides(sources, a["features"], encoder=a["encoder"], weights=a.get("weights"),
                                  spec=a["spec"], tissue=a["tissue"], opts=a["opts"], roi_dir=a.get("roi_dir"),
                                  lock=a.get("lock", True), executor=executor, on_outcome=on_outcome,
                                  wait=wait).outcomes
        where = {"dask": {"workers": workers, "scheduler": scheduler if isinstance(scheduler, str) else None}}
        return score_slides(sources, a["model"], features_dir=a["features"], out_dir=a["out"],
                            weights=a.get("weights"), opts=a["opts"], roi_dir=a.get("roi_dir"),
                            formats=a.get("formats", ("csv", "png", "tif", "geojson", "top")),
                            **({"cutoff": a["cutoff"]} if "cutoff" in a else {}), lock=a.get("lock", True),
                            executor=executor, on_outcome=on_outcome, wait=wait, run_info=where).outcomes
# --- one worker per GPU -------------------------------------------------------------------------
def device_worker_specs(devices: list[str]) -> tuple[str, dict]:
    """``(device for the encoder, {worker name: Nanny spec})``: one single-threaded worker process per
    entry of ``devices`` (``cuda:0,cuda:1`` or ``cpu,cpu``), each seeing only its own GPU through
    ``CUDA_VISIBLE_DEVICES`` (so ``cuda`` inside it is that GPU). Pure."""
    from distributed import Nanny

    devices = [d.strip() for d in devices if d.strip()]
    kinds = {"cpu" if d == "cpu" else "cuda" if d == "cuda" or d.startswith("cuda:") else None for d in devices}
    if not devices or None in kinds or len(kinds) > 1:
        raise ConfigError(f"--devices {','.join(devices) or '(empty)'}: expected a list of cuda:N, or of cpu",
                          fix="e.g. --devices cuda:0,cuda:1 (one worker per GPU)")
    indices = [d.split(":", 1)[1] if ":" in d else "0" for d in devices]
    if "cuda" in kinds and (len(set(indices)) != len(indices) or not all(i.isdigit() for i in indices)):
        raise ConfigError(f"--devices {','.join(devices)}: each GPU once, as cuda:N",
                          fix="e.g. --devices cuda:0,cuda:1")
    specs = {}
    for k, index in enumerate(indices):
        env = {"CUDA_VISIBLE_DEVICES": index if "cuda" in kinds else "", "WEAKSTIL_DEVICE_SLOT": str(k)}
        specs[f"device-{k}"] = {"cls": Nanny, "options": {"nthreads": 1, "host": "127.0.0.1", "name": k,
                                                          "env": env, "silence_logs": logging.ERROR}}
    return kinds.pop(), specs


@contextmanager
def device_cluster(devices: list[str]) -> Iterator[Any]:
    """A local Dask cluster with one worker per device (:func:`device_worker_specs`); yields it."""
    import dask
    from distributed import Scheduler, SpecCluster

    _, workers = device_worker_specs(devices)
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    with (dask.config.set({"distributed.worker.daemon": False}),  # workers may start reader processes
          SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR) as cluster):
        yield cluster


def run_on_devices(kind: str, sources: list, job_args: dict, devices: list[str], **kwargs) -> list[Outcome]:
    """:func:`run_on_dask` on a cluster of one worker per device (``--devices cuda:0,cuda:1``): the same
    per-slide locks, skips and outcomes; each worker runs its encoder on its own GPU."""
    device, _ = device_worker_specs(devices)
    opts = job_args.get("opts")
    if opts is not None:
        job_args = {**job_args, "opts": dataclasses.replace(opts, device=device)}
    with device_cluster(devices) as cluster:
        return run_on_dask(kind, sources, job_args, scheduler=cluster.scheduler_address, **kwargs)
