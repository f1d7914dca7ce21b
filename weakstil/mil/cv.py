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
    """Out-of-fold predictions (sTIL% 0-100, one per slide in table order) and the fold models.

    With ``seeds`` > 1 each fold holds several models (:data:`SEED_STRIDE`): ``models`` lists them
    fold by fold, ``member_folds[i]`` is the fold of ``models[i]``, and a slide's prediction is the
    mean of its fold's models' scores."""

    slide_ids: list[str]
    patient_ids: list[str]
    folds: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    fold_metrics: list[dict]  # regression_metrics of each fold's held-out slides
    fold_info: list[dict]  # sizes, best epoch, epochs run, seconds per fold (over its models)
    pooled: dict  # regression_metrics over all out-of-fold predictions
    pooled_ci: dict  # 95 % bootstrap interval of each pooled metric
    summary: dict  # mean and SD of each metric over folds
    models: list[MILRegressor]
    histories: list[FitHistory]
    n_tiles: int
    seconds: float
    member_folds: np.ndarray  # the fold of each of ``models``
    member_scores: np.ndarray  # (models, slides): each model's scores on its fold, NaN elsewhere
    member_info: list[dict]  # each model's fold, seed, sizes, best epoch, epochs run, seconds

    def fold_models(self, k: int) -> list[MILRegressor]:
        """The models of fold ``k`` (those that scored its held-out slides)."""
        return [m for m, f in zip(self.models, self.member_folds) if int(f) == k]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"slide_id": self.slide_ids, "patient_id": self.patient_ids,
                             "fold": self.folds, "label": self.labels,
                             "prediction": self.predictions})


SEED_STRIDE = 1000  # model j of a fold trains with seed + fold + j × this (inner split: seed + j × this)


def cross_validate(bags: Mapping[str, np.ndarray], table, cfg: TrainConfig, *,
                   progress: bool = True, init_state: dict | None = None,
                   folds: np.ndarray | None = None, title: str = "cross-validation",
                   seeds: Sequence[int] | None = None) -> CVResult:
    """K-fold CV over the labelled slides of ``table`` (a labels.LabelTable or its DataFrame).

    ``init_state``: every fold starts from these weights (warm start); ``folds``: a fold index per
    row given by the caller (e.g. leave-one-center-out) instead of :func:`make_folds`; ``title``: the
    progress line's name. Each fold trains ``cfg.seeds`` models (``seeds``: which of them, by index
    j; default all), each with its own inner validation split, start and tile draws, and a held-out
    slide's prediction is the mean of its fold's models (:func:`combine` joins runs on the same folds)."""
    from weakstil.mil.labels import LabelTable, inner_split, make_folds

    t0 = time.perf_counter()
    df = table.df if isinstance(table, LabelTable) else table
    slide_ids = [str(s) for s in df["slide_id"]]
    _check_bags(bags, slide_ids)
    labels = df["stil"].to_numpy(dtype=np.float64)
    if folds is None:
        folds = make_folds(df, n_folds=cfg.n_folds, by=cfg.folds_by, seed=cfg.seed)
    seeds = list(range(cfg.seeds) if seeds is None else seeds)

    def bags_at(rows: np.ndarray) -> list[Bag]:
        return [(bags[slide_ids[i]], labels[i]) for i in rows]

    plans = []
    for k in range(cfg.n_folds):
        test = np.flatnonzero(folds == k)
        for j in seeds:
            train, val = inner_split(np.flatnonzero(folds != k), df, val_fraction=cfg.val_fraction,
                                     seed=cfg.seed + j * SEED_STRIDE)
            plans.append((k, train, val, test, replace(cfg, seed=cfg.seed + k + j * SEED_STRIDE), init_state))
    n_tiles = int(sum(bags[s].shape[0] for s in slide_ids))
    processes, threads = fold_parallelism(cfg, n_tiles)
    results: dict[int, tuple] = {}
    with progress_display(progress) as bar:
        unit = "folds" if len(seeds) == 1 else "models"
        task = bar.add_task(title, total=len(plans), unit=unit)
        if processes > 1:
            for i, module, history, scores in _parallel_folds(plans, bags_at, bags, slide_ids,
                                                              processes, threads):
                results[i] = (module, history, scores)
                bar.update(task, advance=1, stats=f"{unit[:-1]} {len(results)}/{len(plans)} done")
        else:
            for i, (k, train, val, test, fold_cfg, init) in enumerate(plans):
                module, history = fit_one(bags_at(train), bags_at(val), fold_cfg,
                                          on_epoch=_epoch_stats(bar, task, k, cfg.n_folds), init_state=init)
                member = TrainedModel([module], fingerprint={})
                with _cpu_threads(cfg):
                    scores = [member.predict(bags[slide_ids[row]]).score for row in test]
                results[i] = (module, history, scores)
                bar.update(task, advance=1)
    member_scores = np.full((len(plans), len(slide_ids)), np.nan)
    infos = []
    for i, (k, train, val, test, fold_cfg, _) in enumerate(plans):
        member_scores[i, test] = results[i][2]
        history = results[i][1]
        infos.append({"fold": k, "seed": fold_cfg.seed, "columns": cfg.columns, "n_train": len(train), "n_val": len(val), "n_test": len(test),
                      "best_epoch": history.best_epoch, "best_val_r2": history.best_val_r2,
                      "epochs_run": len(history.epochs), "seconds": round(history.seconds, 3)})
    return _assemble(slide_ids, [str(p) for p in df["patient_id"]], folds, labels, cfg,
                     models=[results[i][0] for i in range(len(plans))],
                     histories=[results[i][1] for i in range(len(plans))],
                     member_folds=np.array([p[0] for p in plans]), member_scores=member_scores,
                     member_info=infos, n_tiles=n_tiles, seconds=time.perf_counter() - t0)


def _assemble(slide_ids, patient_ids, folds, labels, cfg: TrainConfig, *, models, histories, member_folds,
              member_scores, member_info, n_tiles: int, seconds: float) -> CVResult:
    """A :class:`CVResult` from each model's fold, held-out scores and training record, its models
    ordered fold by fold."""
    from weakstil.mil.metrics import bootstrap_intervals, fold_summary, regression_metrics

    order = np.argsort(member_folds, kind="stable")
    models, histories = [models[i] for i in order], [histories[i] for i in order]
    member_folds, member_scores = member_folds[order], member_scores[order]
    member_info = [member_info[i] for i in order]
    predictions = np.full(len(slide_ids), np.nan)
    fold_metrics, fold_info = [], []
    for k in range(int(folds.max()) + 1 if len(folds) else 0):
        test, mine = folds == k, np.flatnonzero(member_folds == k)
        if not mine.size:
            continue
        predictions[test] = member_scores[mine][:, test].mean(0)
        fold_metrics.append(regression_metrics(labels[test], predictions[test], cutoffs=cfg.cutoffs))
        info = [member_info[i] for i in mine]
        first = {key: value for key, value in info[0].items() if key not in ("seed", "columns")}
        if len(info) > 1:  # several models: the fold's typical one, and its total time
            epochs = [x["best_epoch"] for x in info if x["best_epoch"] is not None]
            r2s = [x["best_val_r2"] for x in info if x["best_val_r2"] is not None]
            first.update(best_epoch=int(np.median(epochs)) if epochs else None,
                         best_val_r2=float(np.mean(r2s)) if r2s else None,
                         epochs_run=int(np.median([x["epochs_run"] for x in info])),
                         seconds=round(sum(x["seconds"] for x in info), 3), models=len(info))
        fold_info.append(first)
    return CVResult(
        slide_ids=slide_ids, patient_ids=patient_ids, folds=folds, labels=labels, predictions=predictions,
        fold_metrics=fold_metrics, fold_info=fold_info,
        pooled=regression_metrics(labels, predictions, cutoffs=cfg.cutoffs),
        pooled_ci=bootstrap_intervals(labels, predictions, cutoffs=cfg.cutoffs, n_boot=cfg.n_boot,
                                      seed=cfg.seed),
        summary=fold_summary(fold_metrics), models=models, histories=histories,
        n_tiles=n_tiles, seconds=seconds, member_folds=member_folds, member_scores=member_scores,
        member_info=member_info,
    )


def combine(runs: Sequence[CVResult], cfg: TrainConfig) -> CVResult:
    """Several cross-validations on the same folds (other seeds of each fold's models) as one: every
    model of every run, a slide predicted by the mean of its fold's models."""
    first = runs[0]
    if any(not np.array_equal(r.folds, first.folds) for r in runs[1:]):
        raise ValueError("only cross-validations on the same folds can be combined")
    return _assemble(first.slide_ids, first.patient_ids, first.folds, first.labels, cfg,
                     models=[m for r in runs for m in r.models], histories=[h for r in runs for h in r.histories],
                     member_folds=np.concatenate([r.member_folds for r in runs]),
                     member_scores=np.concatenate([r.member_scores for r in runs]),
                     member_info=[x for r in runs for x in r.member_info], n_tiles=first.n_tiles,
                     seconds=sum(r.seconds for r in runs))


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
    """Runs in a forked process: train one fold's model, score its held-out slides, return plain data."""
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
    return index, dict(module.config), state, history, scores


def _parallel_folds(plans, bags_at, bags, slide_ids, processes: int, threads: int):
    """Yield ``(plan index, module, history, held-out scores)`` as models finish in ``processes``
    forked processes of ``threads`` torch threads each."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    _FORKED.update(plans=plans, bags_at=bags_at, bags=bags, slide_ids=slide_ids, threads=threads)
    try:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = [pool.submit(_fold_in_child, i) for i in range(len(plans))]
            for future in as_completed(futures):
                index, hparams, state, history, scores = future.result()
                module = MILRegressor(**hparams)
                module.load_state_dict({name: torch.from_numpy(v) for name, v in state.items()})
                yield index, module.cpu().eval(), history, scores
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


