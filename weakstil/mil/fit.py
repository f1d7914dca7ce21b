"""One MIL fit: the training configuration, bags as Lightning data, and ``fit_one``.

Speed: Lightning's per-step overhead dominates a model this small, so several bags are padded into
one batch with a mask (``bags_per_step``); at most ``max_tiles`` random tiles of each bag are used
per training step, the full bag at evaluation. Bags stay in the dtype they come in (float16 from the
cache: half the memory) and become float32 one batch at a time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from weakstil.errors import ConfigError, EmptyBagError
from weakstil.mil import STROMA_FLOOR
from weakstil.mil.model import AGGREGATIONS, HEADS, MILRegressor
from weakstil.mil.start import Bag, initialise
from weakstil.progress import progress as progress_display

# TrainConfig.columns; "-wide": the measured block under the wide nest rule (stainmorph.v7 and later)
COLUMN_SETS = ("auto", "all", "measured", "measured-dark", "measured-wide", "measured-dark-wide")


# --- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (saved as config.yaml next to the model)."""

    # The defaults are the recipe chosen on both synthetic families (docs/accuracy.md, issue #14).
    aggregation: str = "weighted"  # "weighted" (sigmoid tile weights) | "attention" (ECTIL) | "mean" (WeakSTIL)
    hidden: int = 128
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.1
    max_tiles: int = 512  # random tiles per bag per training step; full bags at evaluation
    bags_per_step: int = 4  # bags padded into one batch (Lightning overhead dominates tiny steps)
    max_epochs: int = 100
    patience: int = 15  # epochs without a better validation R² before stopping
    min_delta: float = 0.002  # val R² gain that resets patience (the best weights are kept anyway)
    n_folds: int = 5
    # models per fold, each with its own seed (inner validation split, start, tile draws); a held-out
    # slide's prediction is their mean, and the deployed ensemble holds all of them. Averaging three
    # cuts the variance of a model trained on a few dozen noisy labels (docs/accuracy.md, twenty-third
    # run); the column candidates are compared on one model per fold, the chosen one gets the rest.
    seeds: int = 3
    folds_by: str = "patient"  # "patient" | "center"
    val_fraction: float = 0.2  # of each training fold's patients, for early stopping
    seed: int = 0
    cutoffs: tuple[float, ...] = (10, 30, 50)  # sTIL% thresholds for the AUCs
    high_cutoff: float = 30  # sTIL-high vs -low threshold for the headline AUC (added to cutoffs)
    deploy: str = "ensemble"  # "ensemble" of the fold models | "final" refits on all slides (one per seed)
    n_boot: int = 1000  # bootstrap resamples for the 95 % intervals
    num_workers: int = 0
    accelerator: str = "auto"
    # folds trained at once in forked processes (one torch thread each on a CPU); None: automatic,
    # all folds at once on a CPU with >= 2 cores when the bags hold >= PARALLEL_FOLDS_MIN_TILES
    # tiles; 1: one fold after another.
    fold_processes: int | None = None
    # issue #14: pull the predictions of tiles the pooling ignores toward 0 (see
    # mil.module.background_penalty), and calibrate the deployed scores with a line fitted on the
    # out-of-fold predictions (mil.calibration). The line and its cross-fitted estimate are always
    # reported in metrics.json; applying it is off since the tenth accuracy run: with the probe
    # start the predictions are no longer compressed, and over four runs × six cohorts the
    # cross-fitted line never raised R² and cost up to 0.017 (docs/accuracy.md).
    background_penalty: float = 0.0
    calibrate: bool = False
    # deploy w · MIL + (1 − w) · linear probe, w chosen out of fold (mil.blend); off since the probe
    # head, which starts from the probe and keeps it unless validation says otherwise (docs/accuracy.md)
    blend: bool = False
    # the tile head: "probe" (linear on standardised features, started at the linear probe) |
    # "linear" (on the LayerNorm'd features) | "mlp" (on the hidden layer)
    head: str = "probe"
    # weight each tile by its estimated stroma fraction when pooling (the features' last column,
    # from a +stainmorph encoder): sTIL% is lymphocytes over stroma. None: on when the features have
    # the estimate (train_model decides from the cache's encoder); the benchmark sets it itself.
    stroma_prior: bool | None = None
    # the prior's floor: a tile of no estimated stroma weighs this, one of all stroma 1 + this (0.1 until run 35)
    stroma_floor: float = STROMA_FLOOR
    # which feature columns the MIL reads: "all", "measured" (only the stain morphometry's five
    # measurements of sTIL%: lymphocyte share of the estimated stroma, size-aware, strict and loose,
    # of the nests, and the stroma estimate), "measured-dark" (the same without the size-aware share),
    # the two again with nests marked by the wide band of nuclei ("measured-wide", "measured-dark-wide")
    # or "auto" (train_model cross-validates them and deploys every set within one standard error of
    # the best by out-of-fold R² vs labels, their models averaged: mil.select; "all" where the
    # features have no morphometry). Resolved, several sets are joined by "+" ("measured-dark+all").
    columns: str = "auto"
    # how much the probe start weights the morphometry's measured columns when the MIL reads all
    # columns: their standardised values × this, so the start's ridge penalises them 1/w² as much
    # (the network's hundreds of texture columns otherwise share the fit equally with the five numbers
    # that measure sTIL%). None: MEASURED_EMPHASIS when the features end with the morphometry
    # (resolved by mil.select.cross_validate_columns), else 1 (no emphasis).
    measured_emphasis: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.aggregation in AGGREGATIONS, f"aggregation must be one of {AGGREGATIONS}"),
            (self.folds_by in ("patient", "center"), "folds_by must be 'patient' or 'center'"),
            (self.deploy in ("ensemble", "final"), "deploy must be 'ensemble' or 'final'"),
            (0.0 < self.val_fraction < 1.0, "val_fraction must be between 0 and 1"),
            (self.n_folds >= 2, "n_folds must be at least 2"),
            (self.seeds >= 1, "seeds must be at least 1"),
            (self.max_epochs >= 1 and self.patience >= 1, "max_epochs and patience must be >= 1"),
            (self.max_tiles >= 1 and self.bags_per_step >= 1, "max_tiles, bags_per_step >= 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.background_penalty >= 0.0, "background_penalty must be >= 0"),
            (self.stroma_floor > 0.0, "stroma_floor must be > 0"),
            (self.head in HEADS, f"head must be one of {HEADS}"),
            (self.fold_processes is None or self.fold_processes >= 1, "fold_processes must be >= 1"),
            (self.columns in COLUMN_SETS or _is_column_set_list(self.columns),
             f"columns must be one of {COLUMN_SETS} (or several but auto, joined by '+')"),
            (self.measured_emphasis is None or self.measured_emphasis > 0, "measured_emphasis must be > 0"),
        ]
        bad = [text for ok, text in checks if not ok]
        if bad:
            raise ConfigError("invalid training config: " + "; ".join(bad),
                              fix="correct those training options (`weakstil train --help` lists them)")
        cutoffs = sorted({float(c) for c in self.cutoffs} | {float(self.high_cutoff)})
        object.__setattr__(self, "cutoffs", tuple(cutoffs))

    def model_kwargs(self) -> dict:
        return dict(aggregation=self.aggregation, hidden=self.hidden, dropout=self.dropout,
                    lr=self.lr, weight_decay=self.weight_decay, max_tiles=self.max_tiles,
                    background_penalty=self.background_penalty, head=self.head,
                    stroma_prior=bool(self.stroma_prior), stroma_floor=self.stroma_floor,
                    **column_inputs(self.columns))

    def inputs(self) -> int:
        """The model's ``inputs`` (feature columns it reads; 0: all) for :attr:`columns`
        ("auto" not yet resolved reads all)."""
        return column_inputs(self.columns)["inputs"]


def _column_sets() -> dict:
    from weakstil.embed.encoders import DARK_MEASURED_DIM, MEASURED_DIM

    return {"measured": (MEASURED_DIM, 0), "measured-dark": (DARK_MEASURED_DIM, 0),
            "measured-wide": (MEASURED_DIM, MEASURED_DIM), "measured-dark-wide": (DARK_MEASURED_DIM, MEASURED_DIM)}


def column_members(columns: str) -> tuple[str, ...]:
    """The column sets of a resolved ``TrainConfig.columns``: one, or several joined by "+" (their
    models averaged: mil.select)."""
    return tuple(columns.split("+"))


def seeds_per_set(seeds: int, n_sets: int) -> int:
    """How many of ``seeds`` models per fold each of ``n_sets`` averaged column sets trains: its share,
    rounded up (one set keeps them all; as many sets as seeds or more, one each)."""
    return -(-int(seeds) // int(n_sets))


def _is_column_set_list(columns: str) -> bool:
    parts = columns.split("+")
    return len(parts) > 1 and len(set(parts)) == len(parts) and all(p in COLUMN_SETS[1:] for p in parts)


def column_inputs(columns: str) -> dict:
    """The model's ``inputs`` and ``skip`` for a column set: it reads ``inputs`` columns that end
    ``skip`` columns before the last (0 inputs: all). Several sets joined by "+" are a ValueError: one
    model per set (:func:`column_members`)."""
    if "+" in columns:
        raise ValueError(f"columns {columns!r} name several sets: one model per set (column_members)")
    inputs, skip = _column_sets().get(columns, (0, 0))
    return {"inputs": inputs, "skip": skip}


def columns_of(inputs: int | None, skip: int | None = 0) -> str:
    """The column set of a model that reads ``inputs`` columns ending ``skip`` before the last (0 or
    None inputs: all)."""
    if not inputs:
        return "all"
    names = {v: k for k, v in _column_sets().items()}
    key = (int(inputs), int(skip or 0))
    if key not in names:
        raise ValueError(f"no column set reads {inputs} columns ending {skip or 0} before the last")
    return names[key]


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
            if r2 is not None and math.isfinite(r2) and (  # (1e-6: rounding, e.g. the probe head's start)
                history.best_val_r2 is None or r2 > history.best_val_r2 + 1e-6
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
    init_state: dict | None = None,
) -> tuple[MILRegressor, FitHistory]:
    """Train one model on ``(features, sTIL%)`` bags; early-stop on the validation bags' R².

    Returns the model (a plain :class:`MILRegressor`) with the weights of its best validation epoch (the last epoch when
    ``val_bags`` is None, which trains exactly ``max_epochs``) and its history. Deterministic for a
    given seed on the CPU. ``progress_bar`` shows the epochs in weakstil's display (Lightning's own
    bar stays off: it writes carriage-return runs into logs). ``init_state``: a MILRegressor state
    dict to start from (warm start, see :func:`weakstil.mil.cohort.parent_state`) instead of a fresh
    initialisation.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping

    from weakstil.mil.module import MILModule

    if not train_bags:
        raise ValueError("fit_one needs at least one training bag")
    t0 = time.perf_counter()
    history = FitHistory()
    epochs = cfg.max_epochs if max_epochs is None else max_epochs  # 0: the initial model (probe head)
    with progress_display(progress_bar) as bar, _quiet_lightning(), _deterministic(), _cpu_threads(cfg):
        on_epoch = _epoch_progress(bar, bar.add_task("epochs", total=epochs, unit="epochs"), on_epoch)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = MILModule(train_bags[0][0].shape[1], **cfg.model_kwargs())
        initialise(module.model, train_bags, init_state, emphasis=cfg.measured_emphasis or 1.0)
        recorder = _callbacks(history, on_epoch)
        if val_bags and module.model.config.get("head") == "probe" and init_state is None:
            # the starting point (the probe) competes with the epochs: training that does not beat
            # the probe on the validation slides keeps it (best_epoch -1)
            history.best_val_r2, history.best_epoch = _val_r2(module.model, val_bags), -1
            recorder.best_state = copy.deepcopy(module.state_dict())
        callbacks = [recorder]
        if epochs == 0:  # nothing to train: the initial model (the probe, for head="probe")
            history.seconds = time.perf_counter() - t0
            return module.model.cpu().eval(), history
        if val_bags:
            callbacks.append(EarlyStopping("val_r2", mode="max", patience=cfg.patience,
                                           min_delta=cfg.min_delta, check_finite=False))
        with tempfile.TemporaryDirectory(prefix="weakstil-fit-") as tmp:
            trainer = pl.Trainer(
                max_epochs=epochs, accelerator=cfg.accelerator, devices=1,
                deterministic=True, logger=False, enable_checkpointing=False,
                enable_model_summary=False, enable_progress_bar=False,
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
    model = module.model.cpu().eval()
    history.seconds = time.perf_counter() - t0
    return model, history


def _epoch_progress(bar, task: int, on_epoch=None):
    """``on_epoch`` that also advances the display by one epoch, showing the validation R²."""

    def update(row: dict) -> None:
        r2 = row.get("val_r2")
        bar.update(task, advance=1, stats="" if r2 is None else f"val R² {r2:.3f}")
        if on_epoch is not None:
            on_epoch(row)

    return update


def _val_r2(model: MILRegressor, val_bags: Sequence[Bag]) -> float:
    """R² of ``model`` on the validation bags (the same figure as ``val_r2`` of an epoch)."""
    import torch

    from weakstil.mil.module import validation_r2

    pred = torch.stack([model.predict_bag(torch.as_tensor(np.asarray(f, np.float32)))[0] for f, _ in val_bags])
    label = torch.tensor([y for _, y in val_bags], dtype=torch.float64) / 100.0
    return float(validation_r2(pred, label)[0])


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


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _gpu_available(torch) -> bool:
    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
