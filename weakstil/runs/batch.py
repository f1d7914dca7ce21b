"""The batch commands: a folder of slides through one job and the one runner.

:func:`extract_slides` fills the feature cache, :func:`score_slides` writes ``results/``,
:func:`regenerate` rewrites the review bundle of a results folder. Each builds its job
(:mod:`weakstil.runs.jobs`), hands it to :func:`weakstil.runs.runner.run_batch` with an executor
(here, or Dask: :mod:`weakstil.runs.executors`), and records what the run did.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from weakstil.runs.jobs import ExtractJob, RegenerateJob, ScoreJob
from weakstil.runs.runner import run_batch

SCORES_EVERY_S = 5.0  # rebuild scores.csv at most this often while outcomes arrive (and at the end)


@dataclass
class ExtractResult:
    cache: object  # FeatureCache
    outcomes: list
    n_tiles: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class ScoreResult:
    out_dir: Path
    outcomes: list
    scores_csv: Path
    run_json: Path
    seconds: float = 0.0

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]


def _is_local(executor: Any) -> bool:
    return executor is None or getattr(executor, "local", False)


def extract_slides(sources: list, features_dir: Path, *, encoder, spec, tissue, opts=None,
                   roi_dir: Path | None = None, qc: bool = True, lock: bool = True, on_outcome=None,
                   executor: Any = None, wait: bool = False, weights: str | None = None) -> ExtractResult:
    """Fill the feature cache for every slide; finished slides are skipped, bad ones recorded.

    ``encoder`` is an Encoder from :func:`weakstil.embed.encoders.create_encoder` (or its name, with
    ``weights``). One slide's failure never stops the others: each gets an Outcome (done / skipped /
    failed with reason and fix).
    """
    from weakstil.embed.extract import ExtractOptions
    from weakstil.progress import progress as progress_display

    opts = opts or ExtractOptions()
    job = ExtractJob(Path(features_dir), encoder, spec, tissue, opts, weights=weights, roi_dir=roi_dir, qc=qc,
                     lock=lock)
    started = time.perf_counter()
    local = _is_local(executor)
    with progress_display(opts.progress and local) as progress:
        slides_task = progress.add_task("extract", total=len(sources), unit="slides")
        tiles_task = progress.add_task("tiles", total=None, unit="tiles")
        job.tiles_task = lambda n: progress.update(tiles_task, advance=n)
        # here: the encoder on its device; for workers: only the cache (the encoder stays on the CPU)
        here = job if local else dataclasses.replace(job, opts=dataclasses.replace(opts, device="cpu"))
        here.prepare()

        def record(outcome):
            progress.update(slides_task, advance=1)
            if on_outcome is not None:
                on_outcome(outcome)

        try:
            outcomes = run_batch(sources, job, desc="extract", progress=opts.progress and not local,
                                 on_outcome=record, executor=executor, wait=wait, lock_dir=here.lock_dir)
        finally:
            here.close()  # the reader pool and the QC thread end with the run, not at garbage collection
    n_tiles = sum(int(o.result or 0) for o in outcomes if o.status == "done")
    return ExtractResult(here.cache, outcomes, n_tiles, time.perf_counter() - started)


def score_slides(sources: list, model_dir: Path, *, features_dir: Path, out_dir: Path, weights: str | None = None,
                 opts=None, roi_dir: Path | None = None, formats=("csv", "png", "tif", "geojson", "top"),
                 cutoff: float = 30.0, lock: bool = True, executor: Any = None, wait: bool = False,
                 on_outcome=None, run_info: dict | None = None) -> ScoreResult:
    """Score every slide (extracting what is missing); one bad slide never stops the others.

    ``scores.csv`` is merged (by slide id, this run's rows win) as outcomes arrive and at the end;
    ``runs/<run_id>.json`` says what this run did to each slide.
    """
    from weakstil.embed.extract import ExtractOptions
    from weakstil.progress import progress as progress_display
    from weakstil.fs import sweep_partials
    from weakstil.outputs.score import check_out_dir, write_run_json, write_scores_csv

    opts = opts or ExtractOptions()
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    for folder in (out_dir, out_dir / "slides"):  # leftovers of killed runs
        sweep_partials(folder)
    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    local = _is_local(executor)
    job = ScoreJob(Path(model_dir), Path(features_dir), out_dir, opts, weights=weights, roi_dir=roi_dir,
                   formats=tuple(formats), cutoff=cutoff, lock=lock)
    by_id: dict = {}
    last_write = [0.0]
    with progress_display(opts.progress and local) as progress:
        slides_task = progress.add_task("score", total=len(sources), unit="slides")
        tiles_task = progress.add_task("tiles", total=None, unit="tiles")
        if local:
            job.tiles_task = lambda n: progress.update(tiles_task, advance=n)
            job.prepare()
        else:  # fail fast here (exit 2), before any worker starts: model readable, matching the cache
            dataclasses.replace(job, opts=dataclasses.replace(opts, device="cpu", progress=False)).prepare()

        def record(outcome):  # scores.csv at most every 5 s (it is rebuilt from every slide folder)
            by_id[outcome.key] = outcome
            progress.update(slides_task, advance=1)
            if on_outcome is not None:
                on_outcome(outcome)
            if time.perf_counter() - last_write[0] >= SCORES_EVERY_S:
                write_scores_csv(out_dir, sources, by_id, job_model_sha(job, model_dir))
                last_write[0] = time.perf_counter()

        try:
            outcomes = run_batch(sources, job, desc="score", progress=opts.progress and not local,
                                 on_outcome=record, executor=executor, wait=wait)
        finally:  # also on Ctrl-C / SIGTERM: what finished is recorded
            if by_id:
                model_sha = job_model_sha(job, model_dir)
                write_scores_csv(out_dir, sources, by_id, model_sha)
                done = [by_id[s.slide_id] for s in sources if s.slide_id in by_id]
                write_run_json(out_dir, done, run_id=run_id,
                               info={"run_id": run_id, "model": str(model_dir), "model_sha256": model_sha,
                                     "features": str(features_dir), "host": os.uname().nodename,
                                     "pid": os.getpid(), **(run_info or {})})
    scores_csv = write_scores_csv(out_dir, sources, by_id, job_model_sha(job, model_dir))
    return ScoreResult(out_dir, outcomes, scores_csv, out_dir / "runs" / f"{run_id}.json",
                       time.perf_counter() - started)


def job_model_sha(job: ScoreJob, model_dir: Path) -> str:
    """The model's sha256 (from the built scorer here, or hashed from the file on a Dask client)."""
    if job._built is not None:
        return job.model_sha256
    from weakstil.fingerprint import file_sha256

    model_dir = Path(model_dir)
    return file_sha256(model_dir if model_dir.is_file() else model_dir / "model.ckpt")


def regenerate(results_dir: str | Path, slides_dir: str | Path | None = None, *, backend: str = "auto",
               mpp: float | None = None, formats=None, cmap: str | None = None, cutoff: float | None = None,
               slide_ids=None, progress: bool = False, lock: bool = True, wait: bool = False):
    """Rewrite the review files of every scored slide under ``results_dir``
    (see :mod:`weakstil.outputs.bundle`).

    ``formats``: any of ``weakstil.outputs.heatmap.FILENAMES`` (``csv`` rewrites tiles.csv from itself).
    ``cutoff``: the sTIL-high cutoff of tiles.geojson (default: the one the slide was written with).
    ``lock``: take the same per-slide lock as ``weakstil score`` (``results/.locks``), so a running
    score and this never write one slide at once. Returns one ``Outcome`` per slide (``result`` =
    {format: path} when done); a slide that fails is recorded and the others go on.
    """
    from weakstil.errors import ConfigError
    from weakstil.outputs.bundle import REGENERATE_FORMATS, scored_slides
    from weakstil.outputs.heatmap import FILENAMES
    from weakstil.wsi.slide import find_slides, slide_id_from_path

    formats = tuple(REGENERATE_FORMATS if formats is None else formats)
    unknown = sorted(set(formats) - set(FILENAMES))
    if unknown or not formats:
        raise ConfigError(f"unknown or no output format(s) {unknown or list(formats)}",
                          fix=f"choose from {', '.join(FILENAMES)}")
    results_dir = Path(results_dir)
    items = scored_slides(results_dir, slide_ids)
    slide_files = None
    if slides_dir is not None:
        slides_dir = Path(slides_dir)
        slide_files = {slide_id_from_path(p): p for p in find_slides(slides_dir)}
    job = RegenerateJob(results_dir, slide_files, slides_dir, backend, mpp, formats, cmap, cutoff, lock)
    return run_batch(items, job, desc="heatmap", progress=progress, wait=wait)
