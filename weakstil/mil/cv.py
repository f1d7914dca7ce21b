"""Cross-validation of the MIL regressor.

``cross_validate`` runs K outer folds (patient-grouped, stratified on binned sTIL%; by center on
request); inside each, a patient-grouped validation split drives early stopping on R². Every slide
gets one out-of-fold prediction, from the model that never saw its patient. On a multi-core CPU,
large cross-validations run their folds in parallel forked processes (``fold_processes``): a model
this small gains little from a second thread inside one fold, and one thread per fold is immune to
the stalls OpenMP threads suffer when other programs share the cores (measured: benchmarks/bench_train).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from weakstil.errors import LabelsError
from weakstil.mil.fit import (
    _FIT_THREADS,
    Bag,
    FitHistory,
    TrainConfig,
    _cpu_count,
    _cpu_threads,
    _gpu_available,
    fit_one,
)
from weakstil.mil.model import (
    MILRegressor,
    TrainedModel,
)
from weakstil.progress import progress as progress_display


# --- cross-validation -----------------------------------------------------------------------------
@dataclass
class CVResult:
    """Out-of-fold predictions (sTIL% 0-100, one per slide in table order) and the fold models."""

    slide_ids: list[str]
    patient_ids: list[str]
    folds: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    fold_metrics: list[dict]  # regression_metrics of each fold's held-out slides
    fold_info: list[dict]  # sizes, best epoch, epochs run, seconds per fold
    pooled: dict  # regression_metrics over all out-of-fold predictions
    pooled_ci: dict  # 95 % bootstrap interval of each pooled metric
    summary: dict  # mean and SD of each metric over folds
    models: list[MILRegressor]
    histories: list[FitHistory]
    n_tiles: int
    seconds: float

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"slide_id": self.slide_ids, "patient_id": self.patient_ids,
                             "fold": self.folds, "label": self.labels,
                             "prediction": self.predictions})


def cross_validate(bags: Mapping[str, np.ndarray], table, cfg: TrainConfig, *,
                   progress: bool = True, init_state: dict | None = None,
                   folds: np.ndarray | None = None, title: str = "cross-validation") -> CVResult:
    """K-fold CV over the labelled slides of ``table`` (a labels.LabelTable or its DataFrame).

    ``init_state``: every fold starts from these weights (warm start); ``folds``: a fold index per
    row given by the caller (e.g. leave-one-center-out) instead of :func:`make_folds`; ``title``: the
    progress line's name."""
    from weakstil.mil.labels import LabelTable, inner_split, make_folds
    from weakstil.mil.metrics import (
        bootstrap_intervals,
        fold_summary,
        regression_metrics,
    )

    t0 = time.perf_counter()
    df = table.df if isinstance(table, LabelTable) else table
    slide_ids = [str(s) for s in df["slide_id"]]
    _check_bags(bags, slide_ids)
    labels = df["stil"].to_numpy(dtype=np.float64)
    if folds is None:
        folds = make_folds(df, n_folds=cfg.n_folds, by=cfg.folds_by, seed=cfg.seed)
    predictions = np.full(len(df), np.nan)
    models, histories, fold_metrics, fold_info = [], [], [], []

    def bags_at(rows: np.ndarray) -> list[Bag]:
        return [(bags[slide_ids[i]], labels[i]) for i in rows]

    plans = []
    for k in range(cfg.n_folds):
        test = np.flatnonzero(folds == k)
        train, val = inner_split(np.flatnonzero(folds != k), df, val_fraction=cfg.val_fraction,
                                 seed=cfg.seed)
        plans.append((k, train, val, test, replace(cfg, seed=cfg.seed + k), init_state))
    n_tiles = int(sum(bags[s].shape[0] for s in slide_ids))
    processes, threads = fold_parallelism(cfg, n_tiles)
    results: dict[int, tuple] = {}
    with progress_display(progress) as bar:
        task = bar.add_task(title, total=cfg.n_folds, unit="folds")
        if processes > 1:
            for k, module, history, scores in _parallel_folds(plans, bags_at, bags, slide_ids,
                                                              processes, threads):
                results[k] = (module, history, scores)
                bar.update(task, advance=1, stats=f"fold {k + 1}/{cfg.n_folds} done")
        else:
            for k, train, val, test, fold_cfg, init in plans:
                module, history = fit_one(bags_at(train), bags_at(val), fold_cfg,
                                          on_epoch=_epoch_stats(bar, task, k, cfg.n_folds), init_state=init)
                member = TrainedModel([module], fingerprint={})
                with _cpu_threads(cfg):
                    scores = [member.predict(bags[slide_ids[i]]).score for i in test]
                results[k] = (module, history, scores)
                bar.update(task, advance=1)
    for k, train, val, test, *_ in plans:
        module, history, scores = results[k]
        predictions[test] = scores
        fold_metrics.append(regression_metrics(labels[test], predictions[test], cutoffs=cfg.cutoffs))
        fold_info.append({"fold": k, "n_train": len(train), "n_val": len(val),
                          "n_test": len(test), "best_epoch": history.best_epoch,
                          "best_val_r2": history.best_val_r2,
                          "epochs_run": len(history.epochs),
                          "seconds": round(history.seconds, 3)})
        models.append(module)
        histories.append(history)
    return CVResult(
        slide_ids=slide_ids, patient_ids=[str(p) for p in df["patient_id"]], folds=folds,
        labels=labels, predictions=predictions, fold_metrics=fold_metrics, fold_info=fold_info,
        pooled=regression_metrics(labels, predictions, cutoffs=cfg.cutoffs),
        pooled_ci=bootstrap_intervals(labels, predictions, cutoffs=cfg.cutoffs, n_boot=cfg.n_boot,
                                      seed=cfg.seed),
        summary=fold_summary(fold_metrics), models=models, histories=histories,
        n_tiles=n_tiles, seconds=time.perf_counter() - t0,
    )


# --- folds in parallel processes ------------------------------------------------------------------
PARALLEL_FOLDS_MIN_TILES = 200_000  # below this, process start-up is not worth it


def fold_parallelism(cfg: TrainConfig, n_tiles: int) -> tuple[int, int]:
    """(processes, torch threads per process) for the folds of a cross-validation.

    Folds run in parallel only on the CPU, where ``fork`` exists, with at least two cores; by default
    (``fold_processes=None``) only when the bags hold ``PARALLEL_FOLDS_MIN_TILES`` tiles or more.
    """
    import multiprocessing

    import torch

    cpus = _cpu_count()
    if cfg.fold_processes == 1 or cpus < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return 1, 0
    if cfg.accelerator not in ("auto", "cpu") or (cfg.accelerator == "auto" and _gpu_available(torch)):
        return 1, 0
    if cfg.fold_processes is None and n_tiles < PARALLEL_FOLDS_MIN_TILES:
        return 1, 0
    # All folds at once by default, even on fewer cores: single-threaded processes share cores
    # without stalls, and no fold is left to run alone on one core at the end (5 folds on 2 cores
    # take 2.5 fold-times instead of 3). Bags are shared copy-on-write, so memory grows only by
    # each process's batches and model.
    processes = min(cfg.fold_processes or max(cpus, cfg.n_folds), cfg.n_folds)
    return processes, max(1, cpus // processes)


_FORKED: dict = {}  # what forked fold processes inherit (bags are shared copy-on-write, not pickled)


def _fold_in_child(index: int):
    """Runs in a forked process: train one fold, score its held-out slides, return plain data."""
    import torch

    torch.set_num_threads(_FORKED["threads"])
    _FIT_THREADS[0] = _FORKED["threads"]
    k, train, val, test, fold_cfg, init = _FORKED["plans"][index]
    bags_at, bags, slide_ids = _FORKED["bags_at"], _FORKED["bags"], _FORKED["slide_ids"]
    fold_cfg = replace(fold_cfg, accelerator="cpu")
    module, history = fit_one(bags_at(train), bags_at(val), fold_cfg, init_state=init)
    member = TrainedModel([module], fingerprint={})
    scores = [member.predict(bags[slide_ids[i]]).score for i in test]
    state = {name: value.detach().cpu().numpy() for name, value in module.state_dict().items()}
    return k, dict(module.config), state, history, scores


def _parallel_folds(plans, bags_at, bags, slide_ids, processes: int, threads: int):
    """Yield ``(k, module, history, held-out scores)`` as folds finish in ``processes`` forked
    processes of ``threads`` torch threads each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    _FORKED.update(plans=plans, bags_at=bags_at, bags=bags, slide_ids=slide_ids, threads=threads)
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_fold_in_child, i) for i in range(len(plans))]
            for future in as_completed(futures):
                k, hparams, state, history, scores = future.result()
                module = MILRegressor(**hparams)
                module.load_state_dict({name: torch.from_numpy(v) for name, v in state.items()})
                yield k, module.cpu().eval(), history, scores
    finally:
        _FORKED.clear()


def _check_bags(bags: Mapping[str, np.ndarray], slide_ids: Sequence[str]) -> None:
    missing = [s for s in slide_ids if s not in bags]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise LabelsError(f"{len(missing)} labelled slide(s) have no features: {shown}",
                          fix="run `weakstil extract` on them, or remove their rows from the "
                              "labels")
    dims = {bags[s].shape[1] for s in slide_ids}
    if len(dims) > 1:
        raise LabelsError(f"the slides' features have different sizes {sorted(dims)}",
                          fix="train on features from one encoder (one --features cache)")


def _epoch_stats(bar, task: int, k: int, n_folds: int):
    """An ``on_epoch`` callback showing the fold, epoch and validation R² in the display's stats."""

    def update(row: dict) -> None:
        r2 = row.get("val_r2", math.nan)
        bar.update(task, stats=f"fold {k + 1}/{n_folds} epoch {row['epoch'] + 1} val R² {r2:.3f}")

    return update


