"""Cross-validated training of the MIL regressor and the model directory it leaves behind.

``cross_validate`` runs K outer folds (patient-grouped, stratified on binned sTIL%; by center on
request); inside each, a patient-grouped validation split drives early stopping on R². Every slide
gets one out-of-fold prediction, from the model that never saw its patient.

``train_model`` writes ``models/<name>/`` (see DESIGN.md). The deployed model is, by default, the
**ensemble of the K fold models** rather than a refit on all slides:

* it costs nothing more: the fold models exist once cross-validation has run;
* its cross-validated estimate is honest about what was deployed: each member was trained exactly
  as evaluated (a refit would be a new, unvalidated model trained for a guessed number of epochs,
  with no validation set left for early stopping);
* averaging K models trained on different 80 % subsets reduces the variance that dominates small
  cohorts, so the ensemble is expected to be at least as good as each member.

``deploy="final"`` refits one model on all slides for the median number of epochs the folds
chose, for users who prefer a single model.

Speed: Lightning's per-step overhead dominates a model this small, so several bags are padded into
one batch with a mask (``bags_per_step``); at most ``max_tiles`` random tiles of each bag are used
per training step, the full bag at evaluation. Bags stay in the dtype they come in (float16 from the
cache: half the memory) and become float32 one batch at a time. On a multi-core CPU, large
cross-validations run their folds in parallel forked processes (``fold_processes``): a model this
small gains little from a second thread inside one fold, and one thread per fold is immune to the
stalls OpenMP threads suffer when other programs share the cores (measured: benchmarks/bench_train).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from weakstil import __version__
from weakstil.errors import ConfigError, EmptyBagError, LabelsError, ModelExistsError
# load_model, check_fingerprint and SlidePrediction live in mil.py (scoring needs no training code)
# and are re-exported here as part of the training API.
from weakstil.mil.model import (  # noqa: F401
    AGGREGATIONS,
    MILRegressor,
    SlidePrediction,
    TrainedModel,
    _plain,
    check_fingerprint,
    load_model,
)

Bag = tuple[np.ndarray, float]  # (features (N, D) float32, sTIL% 0-100)


# --- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved as config.yaml next to the model)."""

    aggregation: str = "attention"  # "mean" (WeakSTIL) | "attention" (ECTIL gated attention)
    hidden: int = 128
    dropout: float = 0.25
    lr: float = 1e-3
    weight_decay: float = 1e-2
    max_tiles: int = 512  # random tiles per bag per training step; full bags at evaluation
    bags_per_step: int = 4  # bags padded into one batch (Lightning overhead dominates tiny steps)
    max_epochs: int = 60
    patience: int = 10  # epochs without a better validation R² before stopping
    min_delta: float = 0.002  # val R² gain that resets patience (the best weights are kept anyway)
    n_folds: int = 5
    folds_by: str = "patient"  # "patient" | "center"
    val_fraction: float = 0.2  # of each training fold's patients, for early stopping
    seed: int = 0
    cutoffs: tuple[float, ...] = (10, 30, 50)  # sTIL% thresholds for the AUCs
    high_cutoff: float = 30  # sTIL-high vs -low threshold for the headline AUC (added to cutoffs)
    deploy: str = "ensemble"  # "ensemble" of the fold models | "final" refit on all slides
    n_boot: int = 1000  # bootstrap resamples for the 95 % intervals
    num_workers: int = 0
    accelerator: str = "auto"
    # folds trained at once in forked processes (one torch thread each on a CPU); None: automatic,
    # all folds at once on a CPU with >= 2 cores when the bags hold >= PARALLEL_FOLDS_MIN_TILES
    # tiles; 1: one fold after another.
    fold_processes: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
            (self.folds_by in ("patient", "center"), "folds_by must be 'patient' or 'center'"),
            (self.deploy in ("ensemble", "final"), "deploy must be 'ensemble' or 'final'"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1"),
            (self.n_folds >= 2, "n_folds must be at least 2"),
            (self.max_epochs >= 1 and self.patience >= 1, "max_epochs and patience must be >= 1"),
            (self.max_tiles >= 1 and self.bags_per_step >= 1, "max_tiles, bags_per_step >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.fold_processes is None or self.fold_processes >= 1, "fold_processes must be >= 1"),
        ]
        bad = [text for ok, text in checks if not ok]
        if bad:
            raise ConfigError("invalid training config: " + "; ".join(bad))
        cutoffs = sorted({float(c) for c in self.cutoffs} | {float(self.high_cutoff)})
        object.__setattr__(self, "cutoffs", tuple(cutoffs))

    def model_kwargs(self) -> dict:
        return dict(aggregation=self.aggregation, hidden=self.hidden, dropout=self.dropout,
                    lr=self.lr, weight_decay=self.weight_decay, max_tiles=self.max_tiles)


# --- bags -----------------------------------------------------------------------------------------
def load_bags(cache, slide_ids: Sequence[str], *, dtype=np.float32) -> dict[str, np.ndarray]:
    """Read each slide's features from a FeatureCache as ``dtype`` (N, D).

    ``dtype=np.float16`` keeps the cache's own precision at half the memory (training converts one
    batch at a time): 1,000 slides of 20,000 tiles × 512 take 20 GB instead of 41 GB.
    """
    bags = {}
    for slide_id in slide_ids:
        features = np.asarray(cache.read(slide_id).features, dtype=dtype)
        if features.ndim != 2 or features.shape[0] == 0:
            raise EmptyBagError(f"slide '{slide_id}' has no tile features (shape {features.shape})")
        bags[slide_id] = features
    return bags


class BagDataset:
    """Bags with labels (0-100 in, fractions out). Items are ``(index, draw)``: ``draw`` None means
    the full bag; otherwise at most ``max_tiles`` tiles drawn with a generator seeded by
    ``(seed, draw, index)``, so the draw never depends on worker processes or batch order.

    float16 and float32 bags are kept as they are, without a copy, and items are numpy rows in
    that dtype: :func:`collate_bags` writes them into one float32 batch (numpy's float16 → float32
    is ~5× faster than torch's on the CPU, and the batch is allocated once instead of per bag and
    again by ``torch.stack``); other dtypes are converted to float32 once."""

    def __init__(self, bags: Sequence[Bag], *, max_tiles: int | None = None, seed: int = 0):
        self.features = [_as_float(f) for f, _ in bags]
        self.labels = [float(y) / 100.0 for _, y in bags]
        self.max_tiles, self.seed = max_tiles, seed

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, item: tuple[int, int | None]):
        import torch

        index, draw = item
        x = self.features[index]
        if draw is not None and self.max_tiles is not None and x.shape[0] > self.max_tiles:
            rng = np.random.default_rng([self.seed, draw, index])
            rows = np.sort(rng.choice(x.shape[0], size=self.max_tiles, replace=False))
            x = x[rows]
        return x, self.labels[index]


class BagBatchSampler:
    """Batches of ``(index, draw)`` items. Training: shuffled, ``batch`` bags a step, tiles re-drawn
    each epoch. Evaluation: full bags sorted by size and grouped while the padded batch holds at
    most ``tile_budget`` tiles (one bag alone may exceed it), so memory stays bounded. Small
    batches are also faster on a CPU (they stay in cache): 2,000-tile bags evaluated 32 at a time
    took 12.5 ms each, 4 at a time 7.5 ms."""

    def __init__(self, sizes: Sequence[int], batch: int, *, train: bool, seed: int = 0,
                 tile_budget: int = 8192):
        self.sizes, self.batch, self.train, self.seed = list(sizes), batch, train, seed
        self.tile_budget = tile_budget
        self.epoch = 0
        self._eval_batches = None if train else self._group_by_size()

    def _group_by_size(self) -> list[list[tuple[int, None]]]:
        batches: list[list[tuple[int, None]]] = []
        current: list[tuple[int, None]] = []
        for i in np.argsort(self.sizes, kind="stable"):
            if current and (len(current) + 1) * self.sizes[i] > self.tile_budget:
                batches.append(current)
                current = []
            current.append((int(i), None))
        return batches + ([current] if current else [])

    def __len__(self) -> int:
        if self._eval_batches is not None:
            return len(self._eval_batches)
        return math.ceil(len(self.sizes) / self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        if self._eval_batches is not None:
            yield from self._eval_batches
            return
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.sizes))
        draw = self.epoch
        self.epoch += 1
        for start in range(0, len(order), self.batch):
            yield [(int(i), draw) for i in order[start : start + self.batch]]


def _as_float(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    dtype = features.dtype if features.dtype in (np.float16, np.float32) else np.float32
    return np.ascontiguousarray(features, dtype=dtype)


def collate_bags(items):
    """Pad (features (N_i, D), label) items to float32 ``features (B, N_max, D)`` + ``mask (B, N_max)``.

    Features may be numpy (float16 or float32) or tensors; each is converted while it is copied into
    the batch (one pass, one allocation)."""
    import torch

    n_max = max(x.shape[0] for x, _ in items)
    batch = np.empty((len(items), n_max, items[0][0].shape[1]), dtype=np.float32)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for i, (x, _) in enumerate(items):
        n = x.shape[0]
        batch[i, :n] = x  # numpy converts (float16 → float32) while it copies
        batch[i, n:] = 0.0
        mask[i, :n] = True
    label = torch.tensor([y for _, y in items], dtype=torch.float32)
    return {"features": torch.from_numpy(batch), "mask": mask, "label": label}


def _loader(bags: Sequence[Bag], cfg: TrainConfig, *, train: bool):
    from torch.utils.data import DataLoader

    dataset = BagDataset(bags, max_tiles=cfg.max_tiles if train else None, seed=cfg.seed)
    sampler = BagBatchSampler([f.shape[0] for f, _ in bags], cfg.bags_per_step, train=train,
                              seed=cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_bags,
                      num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)


# --- one fit --------------------------------------------------------------------------------------
@dataclass
class FitHistory:
    """Per-epoch ``train_loss``/``val_r2``/``val_mse``; the epoch whose weights were kept."""

    epochs: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_r2: float | None = None
    seconds: float = 0.0


def _callbacks(history: FitHistory, on_epoch=None):
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        """Records each epoch's metrics; keeps the best weights in memory (no checkpoint files)."""

        best_state: dict | None = None

        def on_train_epoch_end(self, trainer, module):
            row = {"epoch": trainer.current_epoch}
            row.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            history.epochs.append(row)
            r2 = row.get("val_r2")
            if r2 is not None and math.isfinite(r2) and (
                history.best_val_r2 is None or r2 > history.best_val_r2
            ):
                history.best_val_r2, history.best_epoch = r2, trainer.current_epoch
                self.best_state = copy.deepcopy(module.state_dict())
            if on_epoch is not None:
                on_epoch(row)

    return Recorder()


def fit_one(
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag] | None,
    cfg: TrainConfig,
    *,
    max_epochs: int | None = None,
    progress_bar: bool = False,
    on_epoch=None,
) -> tuple[MILRegressor, FitHistory]:
    """Train one model on ``(features, sTIL%)`` bags; early-stop on the validation bags' R².

    Returns the module with the weights of its best validation epoch (the last epoch when
    ``val_bags`` is None, which trains exactly ``max_epochs``) and its history. Deterministic for a
    given seed on the CPU.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    if not train_bags:
        raise ValueError("fit_one needs at least one training bag")
    t0 = time.perf_counter()
    history = FitHistory()
    with _quiet_lightning(), _deterministic(), _cpu_threads(cfg):
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = MILRegressor(train_bags[0][0].shape[1], **cfg.model_kwargs())
        module.init_output_bias(float(np.mean([y for _, y in train_bags])) / 100.0)
        recorder = _callbacks(history, on_epoch)
        callbacks = [recorder]
        if val_bags:
            callbacks.append(EarlyStopping("val_r2", mode="max", patience=cfg.patience,
                                           min_delta=cfg.min_delta, check_finite=False))
        with tempfile.TemporaryDirectory(prefix="weakstil-fit-") as tmp:
            trainer = pl.Trainer(
                max_epochs=max_epochs or cfg.max_epochs, accelerator=cfg.accelerator, devices=1,
                deterministic=True, logger=False, enable_checkpointing=False,
                enable_model_summary=False, enable_progress_bar=progress_bar,
                num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=tmp,
                log_every_n_steps=1,
            )
            trainer.fit(
                module,
                train_dataloaders=_loader(train_bags, cfg, train=True),
                val_dataloaders=_loader(val_bags, cfg, train=False) if val_bags else None,
            )
        if recorder.best_state is not None:
            module.load_state_dict(recorder.best_state)
        elif history.epochs:
            history.best_epoch = history.epochs[-1]["epoch"]
    module.cpu().eval()
    history.seconds = time.perf_counter() - t0
    return module, history


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's banner ("GPU available: ...") and its few-workers hints."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric",
                                              "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*(smaller than the logging interval|LeafSpec|"
                                                  r"Trying to infer the `batch_size`|"
                                                  r"but have no `val_dataloader`).*")
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


_FIT_THREADS = [1]  # torch threads of one fit on the CPU (a fold process may get more on many cores)


@contextlib.contextmanager
def _cpu_threads(cfg: TrainConfig, threads: int | None = None):
    """Train on ``threads`` torch threads when training runs on the CPU (restored afterwards).

    This model's operations are too small for a second OpenMP thread to pay its way: measured on 2
    cores, a second thread gains at most ~1.5× per step on an idle machine, and makes training 15-20×
    slower when other programs share the cores (OpenMP threads then wait for each other at every
    operation; the test cohort's CV: 60 s with 2 threads, 3 s with 1). Cross-validation uses the
    other cores by training folds in parallel (``fold_processes``).
    """
    import torch

    threads = threads or _FIT_THREADS[0]
    on_cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not _gpu_available(torch))
    before = torch.get_num_threads()
    if on_cpu and before > threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _deterministic():
    """``Trainer(deterministic=True)`` switches torch to deterministic algorithms process-wide;
    restore the previous setting afterwards, so that later GPU work (extraction) is unaffected."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


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
                   progress: bool = True) -> CVResult:
    """K-fold CV over the labelled slides of ``table`` (a labels.LabelTable or its DataFrame)."""
    from weakstil.mil.labels import LabelTable, inner_split, make_folds
    from weakstil.mil.metrics import bootstrap_intervals, fold_summary, regression_metrics

    t0 = time.perf_counter()
    df = table.df if isinstance(table, LabelTable) else table
    slide_ids = [str(s) for s in df["slide_id"]]
    _check_bags(bags, slide_ids)
    labels = df["stil"].to_numpy(dtype=np.float64)
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
        plans.append((k, train, val, test, replace(cfg, seed=cfg.seed + k)))
    n_tiles = int(sum(bags[s].shape[0] for s in slide_ids))
    processes, threads = fold_parallelism(cfg, n_tiles)
    results: dict[int, tuple] = {}
    with _progress(cfg.n_folds, progress) as bar:
        if processes > 1:
            for k, module, history, scores in _parallel_folds(plans, bags_at, bags, slide_ids,
                                                              processes, threads):
                results[k] = (module, history, scores)
                if bar is not None:
                    bar.update(1)
        else:
            for k, train, val, test, fold_cfg in plans:
                module, history = fit_one(bags_at(train), bags_at(val), fold_cfg,
                                          on_epoch=_bar_update(bar, k, cfg.n_folds))
                member = TrainedModel([module], fingerprint={})
                with _cpu_threads(cfg):
                    scores = [member.predict(bags[slide_ids[i]]).score for i in test]
                results[k] = (module, history, scores)
                if bar is not None:
                    bar.update(1)
    for k, train, val, test, _ in plans:
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


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _gpu_available(torch) -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


_FORKED: dict = {}  # what forked fold processes inherit (bags are shared copy-on-write, not pickled)


def _fold_in_child(index: int):
    """Runs in a forked process: train one fold, score its held-out slides, return plain data."""
    import torch

    torch.set_num_threads(_FORKED["threads"])
    _FIT_THREADS[0] = _FORKED["threads"]
    k, train, val, test, fold_cfg = _FORKED["plans"][index]
    bags_at, bags, slide_ids = _FORKED["bags_at"], _FORKED["bags"], _FORKED["slide_ids"]
    fold_cfg = replace(fold_cfg, accelerator="cpu")
    module, history = fit_one(bags_at(train), bags_at(val), fold_cfg)
    member = TrainedModel([module], fingerprint={})
    scores = [member.predict(bags[slide_ids[i]]).score for i in test]
    state = {name: value.detach().cpu().numpy() for name, value in module.state_dict().items()}
    return k, dict(module.hparams), state, history, scores


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


@contextlib.contextmanager
def _progress(n_folds: int, enabled: bool):
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=n_folds, desc="cross-validation", unit="fold", dynamic_ncols=True) as bar:
        yield bar


def _bar_update(bar, k: int, n_folds: int):
    if bar is None:
        return None

    def update(row: dict) -> None:
        r2 = row.get("val_r2", math.nan)
        bar.set_postfix_str(f"fold {k + 1}/{n_folds} epoch {row['epoch'] + 1} val R² {r2:.3f}")

    return update


# --- the model directory --------------------------------------------------------------------------
def train_model(bags: Mapping[str, np.ndarray], table, cfg: TrainConfig, *, out_dir: str | Path,
                fingerprint: Mapping, progress: bool = True, overwrite: bool = False,
                run_info: Mapping | None = None) -> Path:
    """Cross-validate, pick the deployed model (see the module docstring) and write ``out_dir``
    (``models/<name>/``) atomically: model.ckpt, config.yaml, metrics.json, cv_predictions.csv,
    plots/. ``fingerprint`` is the cache's ``{"encoder": ..., "tiling": ...}``; ``run_info``
    (e.g. the resolved command-line config) is saved under ``run:`` in config.yaml.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelExistsError("a model already exists here", path=out_dir)
    t0 = time.perf_counter()
    cv = cross_validate(bags, table, cfg, progress=progress)
    members = cv.models if cfg.deploy == "ensemble" else [_final_fit(bags, table, cfg, cv)]
    config = {
        "weakstil_version": __version__, "deploy": cfg.deploy, "n_members": len(members),
        "train": asdict(cfg), "model": dict(members[0].hparams), "fingerprint": dict(fingerprint),
        "run": dict(run_info or {}),
    }
    model = TrainedModel(members, fingerprint=dict(fingerprint), config=_plain(config))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", suffix=".partial", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model dir is an ordinary folder
        model.save(tmp / "model.ckpt")
        _write_text(tmp / "config.yaml", _yaml(model.config))
        cv.to_frame().to_csv(tmp / "cv_predictions.csv", index=False, float_format="%.4f")
        _write_plots(tmp / "plots", cv, cfg)
        metrics = _metrics_doc(cv, cfg, seconds=time.perf_counter() - t0)
        _write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _final_fit(bags, table, cfg: TrainConfig, cv: CVResult) -> MILRegressor:
    """One model on all slides, for the median number of epochs the folds kept (no validation)."""
    epochs = [h.best_epoch + 1 for h in cv.histories if h.best_epoch is not None]
    n_epochs = int(np.median(epochs)) if epochs else cfg.max_epochs
    all_bags = [(bags[s], y) for s, y in zip(cv.slide_ids, cv.labels)]
    module, _ = fit_one(all_bags, None, cfg, max_epochs=n_epochs)
    return module


def _metrics_doc(cv: CVResult, cfg: TrainConfig, *, seconds: float) -> dict:
    folds = [dict(info, metrics=m) for info, m in zip(cv.fold_info, cv.fold_metrics)]
    high = f"auc@{cfg.high_cutoff:g}"
    doc = {
        "weakstil_version": __version__, "aggregation": cfg.aggregation, "deploy": cfg.deploy,
        "n_slides": len(cv.slide_ids), "n_patients": len(set(cv.patient_ids)),
        "n_tiles": cv.n_tiles, "n_folds": cfg.n_folds, "folds_by": cfg.folds_by,
        "seconds": round(seconds, 2), "cv_seconds": round(cv.seconds, 2),
        "headline": {"r2": cv.pooled["r2"], high: cv.pooled.get(high)},
        "pooled": cv.pooled,
        "pooled_ci95": {k: list(v) for k, v in cv.pooled_ci.items()},
        "fold_mean_sd": cv.summary,
        "folds": folds,
    }
    return _json_safe(doc)


def _write_plots(plot_dir: Path, cv: CVResult, cfg: TrainConfig) -> None:
    from weakstil.mil.plots import calibration_plot, roc_plot, scatter_plot

    plot_dir.mkdir()
    title = f"{cfg.aggregation} MIL, {cfg.n_folds}-fold CV (out-of-fold)"
    scatter_plot(cv.labels, cv.predictions, plot_dir / "scatter.png", title=title, folds=cv.folds)
    roc_plot(cv.labels, cv.predictions, plot_dir / "roc.png", cutoffs=cfg.cutoffs, title=title)
    calibration_plot(cv.labels, cv.predictions, plot_dir / "calibration.png", title=title)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished temp dir to ``out_dir``; an existing one is swapped out, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-{time.time_ns()}.old.partial")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(_plain(obj), sort_keys=False, allow_unicode=True)


def _json_safe(obj):
    """NaN/inf to None (JSON has no NaN), tuples to lists, numpy scalars to Python."""
    obj = _plain(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
