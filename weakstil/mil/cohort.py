"""Glue between the command line and the library: train from a feature cache, show metrics tables."""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    name: str
    path: Path
    metrics: dict


def train_from_cache(labels: Path, features: Path, *, encoder: str | None = None, models_dir: Path = Path("models"),
                     name: str = "stil", aggregations=("attention",), progress: bool = True,
                     overwrite: bool = False, run_info: dict | None = None, **train_kwargs) -> list[TrainedRun]:
    """Read labels and the cache's bags, cross-validate each aggregation, write ``models/<name>``.

    With several aggregations each model is named ``<name>-<aggregation>``.
    """
    from weakstil.embed.cache import FeatureCache
    from weakstil.mil.labels import read_labels
    from weakstil.mil.fit import TrainConfig, load_bags
    from weakstil.mil.train import train_model

    cache = FeatureCache.find(features, encoder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_labels(labels, cached_ids=cache.complete_ids())
    for w in caught:  # among them the cached slides without a label (table.unlabelled), listed once
        log.warning("%s", w.message)
    bags = load_bags(cache, table.slide_ids)
    fingerprint = {"encoder": cache.encoder_fp, "tiling": cache.tiling_fp}
    runs = []
    for aggregation in aggregations:
        cfg = TrainConfig(aggregation=aggregation, **train_kwargs)
        model_name = name if len(aggregations) == 1 else f"{name}-{aggregation}"
        out = train_model(bags, table, cfg, out_dir=Path(models_dir) / model_name, fingerprint=fingerprint,
                          progress=progress, overwrite=overwrite,
                          run_info={**(run_info or {}), "labels": str(labels), "features": str(cache.path)})
        runs.append(TrainedRun(model_name, out, json.loads((out / "metrics.json").read_text())))
    return runs


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def metrics_table(runs: list[TrainedRun], *, title: str = "cross-validation (out-of-fold)"):
    """A rich table: one row per model; pooled metrics with 95 % CIs, and per-fold mean ± SD of R²."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("model", "slides", "tiles", "R² pooled [95% CI]", "R² folds", "r", "MAE", "AUC @10/30/50", "CV s"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for run in runs:
        m = run.metrics
        pooled, ci, folds = m["pooled"], m.get("pooled_ci95", {}), m.get("fold_mean_sd", {})
        r2_ci = ci.get("r2") or [None, None]
        r2_f = folds.get("r2") or {}
        aucs = "/".join(_fmt(pooled.get(f"auc@{c}")) for c in (10, 30, 50))
        table.add_row(
            run.name, str(m.get("n_slides", "")), f"{m.get('n_tiles', 0):,}",
            f"{_fmt(pooled.get('r2'))} [{_fmt(r2_ci[0])}, {_fmt(r2_ci[1])}]",
            f"{_fmt(r2_f.get('mean'))}±{_fmt(r2_f.get('sd'))}",
            _fmt(pooled.get("pearson")), _fmt(pooled.get("mae"), 1), aucs, _fmt(m.get("cv_seconds"), 0))
    return table
