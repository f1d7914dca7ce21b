"""Cross-validated training of the MIL regressor and the model directory it leaves behind.

``cross_validate`` runs K outer folds (patient-grouped, stratified on binned sTIL%; by center on
request); inside each, a patient-grouped validation split drives early stopping on R². Every slide
gets one out-of-fold prediction, from the model that never saw its patient.

``train_model`` writes ``models/<name>/`` (see DESIGN.md). The deployed model is, by default, the
**ensemble of the K fold models** (``seeds`` of them per fold, three by default) rather than a refit
on all slides:

* it costs nothing more: the fold models exist once cross-validation has run;
* its cross-validated estimate is honest about what was deployed: each member was trained exactly
  as evaluated (a refit would be a new, unvalidated model trained for a guessed number of epochs,
  with no validation set left for early stopping);
* averaging K models trained on different 80 % subsets reduces the variance that dominates small
  cohorts, so the ensemble is expected to be at least as good as each member.

``deploy="final"`` refits on all slides (one model per seed) for the median number of epochs the
folds chose, for users who prefer not to deploy the fold models.

Speed: see :mod:`weakstil.mil.fit` and :mod:`weakstil.mil.cv`. Lightning's per-step overhead dominates a model this small, so several bags are padded into
one batch with a mask (``bags_per_step``); at most ``max_tiles`` random tiles of each bag are used
per training step, the full bag at evaluation. Bags stay in the dtype they come in (float16 from the
cache: half the memory) and become float32 one batch at a time. On a multi-core CPU, large
cross-validations run their folds in parallel forked processes (``fold_processes``): a model this
small gains little from a second thread inside one fold, and one thread per fold is immune to the
stalls OpenMP threads suffer when other programs share the cores (measured: benchmarks/bench_train).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from weakstil import __version__
from weakstil.errors import ConfigError, ModelExistsError
from weakstil.fs import plain_json, staging_dir
from weakstil.mil.cv import SEED_STRIDE, CVResult
from weakstil.mil.fit import (
    TrainConfig,
    fit_one,
)
from weakstil.mil.model import (
    MILRegressor,
    TrainedModel,
)


# --- the model directory --------------------------------------------------------------------------
def resolve_stroma_prior(cfg: TrainConfig, fingerprint: Mapping) -> TrainConfig:
    """``stroma_prior=None`` becomes on exactly when the cache's encoder gives a stroma estimate;
    asking for it without one is a ConfigError."""
    from weakstil.embed.encoders import MORPH_ARCH, has_stroma_estimate

    available = has_stroma_estimate((fingerprint or {}).get("encoder"))
    if cfg.stroma_prior is None:
        return replace(cfg, stroma_prior=available)
    if cfg.stroma_prior and not available:
        raise ConfigError("the stroma prior needs a stroma estimate in the features, and this cache's "
                          "encoder has none", fix=f"extract with a +stainmorph encoder ({MORPH_ARCH}), or "
                          "train with --no-stroma-prior")
    return cfg


def train_model(bags: Mapping[str, np.ndarray], table, cfg: TrainConfig, *, out_dir: str | Path,
                fingerprint: Mapping, progress: bool = True, overwrite: bool = False,
                run_info: Mapping | None = None, init_state: dict | None = None,
                folds: np.ndarray | None = None, extras=None) -> Path:
    """Cross-validate, pick the deployed model (see the module docstring) and write ``out_dir``
    (``models/<name>/``) atomically: model.ckpt, config.yaml, metrics.json, cv_predictions.csv,
    plots/. ``fingerprint`` is the cache's ``{"encoder": ..., "tiling": ...}``; ``run_info``
    (e.g. the resolved command-line config) is saved under ``run:`` in config.yaml.
    ``init_state`` and ``folds`` go to :func:`cross_validate` (warm start, caller's folds);
    ``extras(tmp_dir, cv, metrics, model)`` writes more files into the model folder before it is
    moved into place and may add keys to ``metrics`` (the model card, QC reference: mil.cohort).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelExistsError("a model already exists here", path=out_dir)
    from weakstil.mil.labels import check_trainable

    check_trainable(getattr(table, "df", table), path=getattr(table, "path", None))
    cfg = resolve_stroma_prior(cfg, fingerprint)
    t0 = time.perf_counter()
    from weakstil.mil.select import cross_validate_columns

    cv, cfg, selection = cross_validate_columns(bags, table, cfg, fingerprint, progress=progress,
                                                init_state=init_state, folds=folds)
    members = cv.models if cfg.deploy == "ensemble" else _final_fits(bags, table, cfg, cv)
    probe = _probe_section(bags, cv, cfg)
    blend, probe_head, deployed, honest = _blend(bags, cv, cfg, probe)
    from weakstil.mil.calibration import fit_line

    fitted = fit_line(deployed, cv.labels)  # reported always; applied with cfg.calibrate
    line = fitted if cfg.calibrate else None
    config = {
        "weakstil_version": __version__, "deploy": cfg.deploy, "n_members": len(members),
        "train": asdict(cfg), "model": dict(members[0].config), "fingerprint": dict(fingerprint),
        "run": dict(run_info or {}), "calibration": line,
        "blend": None if blend is None else {"weight": blend["weight"], "fold_weights": blend["fold_weights"],
                                             "alpha": probe_head["alpha"]},
    }
    model = TrainedModel(members, fingerprint=dict(fingerprint), config=plain_json(config), probe=probe_head)
    with staging_dir(out_dir) as tmp:  # renamed into place whole; a full disk is a DiskFullError
        model.save(tmp / "model.ckpt")
        _write_text(tmp / "config.yaml", _yaml(model.config))
        cv.to_frame().to_csv(tmp / "cv_predictions.csv", index=False, float_format="%.4f")
        _write_plots(tmp / "plots", cv, cfg)
        metrics = _metrics_doc(cv, cfg, seconds=time.perf_counter() - t0)
        metrics.update(plain_json(_baselines(cv, cfg, probe, blend, honest, fitted), finite=True))
        if selection is not None:
            metrics["columns"] = plain_json(selection.report(), finite=True)
        if extras is not None:
            extras(tmp, cv, metrics, model)
        _write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return out_dir


def _probe_section(bags, cv: CVResult, cfg: TrainConfig) -> dict:
    """The linear probe on the MIL's folds (issue #14): metrics and out-of-fold predictions."""
    from weakstil.mil.probe import probe_report

    return probe_report(bags, cv.slide_ids, cv.labels, cv.folds, cutoffs=cfg.cutoffs)


def _blend(bags, cv: CVResult, cfg: TrainConfig, probe: dict):
    """(metrics section, probe head, deployed out-of-fold predictions, cross-fitted ones) of the
    MIL–probe blend (:mod:`weakstil.mil.blend`); the MIL's own predictions without ``cfg.blend``."""
    if not cfg.blend:
        return None, None, cv.predictions, cv.predictions
    from weakstil.mil.blend import blend_report, choose_weight, fit_probe

    oof = np.asarray(probe["predictions"], np.float64)
    weight = choose_weight(cv.predictions, oof, cv.labels)
    section, honest = blend_report(cv.predictions, oof, cv.labels, cv.folds, weight, cutoffs=cfg.cutoffs)
    deployed = weight * cv.predictions + (1 - weight) * oof
    return section, fit_probe(bags, cv.slide_ids, cv.labels), deployed, honest


def _baselines(cv: CVResult, cfg: TrainConfig, probe: dict, blend: dict | None, honest: np.ndarray,
               line: dict) -> dict:
    """metrics.json sections beside the MIL's: the linear probe on the same folds (issue #14) with the
    deployed model's lead over it (``mil_minus_probe``: R² and MAE differences, 95 % paired bootstrap
    intervals), the blend of both, and the calibration's line and cross-fitted estimate (of the blend), with
    ``applied`` saying whether the model uses it (``cfg.calibrate``)."""
    from weakstil.mil.calibration import calibration_report, crossfit
    from weakstil.mil.metrics import paired_difference

    calibrated = crossfit(honest, cv.labels, cv.folds)  # each fold by the line fitted on the others
    out = {"linear_probe": {k: v for k, v in probe.items() if k != "predictions"}}
    # does the MIL earn its keep on this cohort? What is deployed (honestly estimated: blend and line
    # cross-fitted) minus the probe, with a paired bootstrap interval over the slides
    # (mil.cohort.probe_verdict says it in words)
    out["linear_probe"]["mil_minus_probe"] = paired_difference(
        cv.labels, calibrated if cfg.calibrate else honest, np.asarray(probe["predictions"], np.float64),
        n_boot=cfg.n_boot, seed=cfg.seed)
    if blend is not None:
        out["blend"] = blend
    # the line is reported whether or not the model applies it (``--calibrate``): what it would do
    out["calibration"] = calibration_report(calibrated, cv.labels, line, applied=cfg.calibrate, cutoffs=cfg.cutoffs)
    deployed = out["calibration"] if cfg.calibrate else out.get("blend")
    if deployed is not None:  # the one figure for what model.ckpt does, estimated honestly
        parts = (["blend with the linear probe"] if blend is not None else []) + (
            ["calibration line"] if cfg.calibrate else [])
        out["deployed"] = {"pooled": deployed["pooled"],
                           "note": "MIL + " + " + ".join(parts) + ", each cross-fitted (chosen on the other folds)"}
    return out


def deployed_pooled(metrics: Mapping) -> dict:
    """The pooled out-of-fold metrics of what a model folder deploys (``deployed``; the MIL's own
    ``pooled`` for models trained without blend and calibration)."""
    return dict((metrics.get("deployed") or {}).get("pooled") or metrics["pooled"])


def _final_fits(bags, table, cfg: TrainConfig, cv: CVResult) -> list[MILRegressor]:
    """``deploy="final"``: ``cfg.seeds`` models on all slides, shared among the column sets of
    ``cfg.columns`` as the folds' models are (mil.select)."""
    from weakstil.mil.fit import column_members, seeds_per_set

    sets = column_members(cfg.columns)
    per_set = seeds_per_set(cfg.seeds, len(sets))
    return [_final_fit(bags, table, replace(cfg, columns=name), cv, j) for name in sets for j in range(per_set)]


def _final_fit(bags, table, cfg: TrainConfig, cv: CVResult, j: int = 0) -> MILRegressor:
    """One model on all slides (the ``j``-th seed of ``cfg.seeds``), for the median number of epochs
    the folds' models kept (no validation; 0 when most kept their starting point, the probe of
    ``head="probe"``)."""
    epochs = [h.best_epoch + 1 for h in cv.histories if h.best_epoch is not None]
    n_epochs = int(np.median(epochs)) if epochs else cfg.max_epochs
    all_bags = [(bags[s], y) for s, y in zip(cv.slide_ids, cv.labels)]
    module, _ = fit_one(all_bags, None, replace(cfg, seed=cfg.seed + j * SEED_STRIDE), max_epochs=n_epochs)
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
    if cfg.deploy == "ensemble":  # model.ckpt's members, in its order (warm starts pick one)
        doc["members"] = [dict(info) for info in cv.member_info]
    return plain_json(doc, finite=True)


def _write_plots(plot_dir: Path, cv: CVResult, cfg: TrainConfig) -> None:
    from weakstil.mil.plots import calibration_plot, roc_plot, scatter_plot

    plot_dir.mkdir()
    title = f"{cfg.aggregation} MIL, {cfg.n_folds}-fold CV (out-of-fold)"
    scatter_plot(cv.labels, cv.predictions, plot_dir / "scatter.png", title=title, folds=cv.folds)
    roc_plot(cv.labels, cv.predictions, plot_dir / "roc.png", cutoffs=cfg.cutoffs, title=title)
    calibration_plot(cv.labels, cv.predictions, plot_dir / "calibration.png", title=title)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(plain_json(obj), sort_keys=False, allow_unicode=True)
