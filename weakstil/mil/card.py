"""The model card: what a model was trained on, how well it did, and when not to trust it.

Every model folder gets ``model_card.json`` (the facts) and ``MODEL_CARD.md`` (the same facts for a
reader), written at training by :func:`write_card`. ``weakstil evaluate`` appends each external
validation to the card's ``evaluations`` list with :func:`append_evaluation` (under a lock, written to
a temporary name and renamed, the Markdown regenerated), so the card is the model's history.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from weakstil import __version__
from weakstil.fs import file_lock, plain_json, write_json, write_text
from weakstil.mil import column_choice_phrase

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
HISTOGRAM = "plots/label_histogram.png"
CARD_VERSION = 1
INTENDED_USE = (
    "Research use: estimating the stromal TIL percentage (0-100) of H&E breast-cancer whole-slide images "
    "like the training cohort(s) below, for review by a pathologist with the heatmaps. Not a diagnostic "
    "device; a score whose qc column is not empty needs a pathologist's look before use.")


# --- facts ---------------------------------------------------------------------------------------
def git_commit() -> str:
    """The commit of the weakstil checkout this code runs from, or "unknown" (e.g. an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if len(commit) == 40 else "unknown"


def hardware() -> dict:
    """CPU, core count and GPU (if torch sees one) of this machine."""
    info = {"machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    with contextlib.suppress(ImportError, RuntimeError, AssertionError):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def label_summary(stil: np.ndarray, *, bins: int = 10) -> dict:
    stil = np.asarray(stil, dtype=np.float64)
    counts, edges = np.histogram(stil, bins=bins, range=(0.0, 100.0))
    return {"mean": float(stil.mean()), "sd": float(stil.std(ddof=1)) if stil.size > 1 else None,
            "min": float(stil.min()), "median": float(np.median(stil)), "max": float(stil.max()),
            "n_high_30": int((stil >= 30).sum()),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def cohort_summaries(df) -> list[dict]:
    """One entry per cohort of a labels frame (column ``cohort``; one cohort "all" without it)."""
    groups = df.groupby("cohort", sort=False) if "cohort" in df.columns else [("all", df)]
    return [{"name": str(name), "n_slides": len(part), "n_patients": int(part["patient_id"].nunique()),
             "stil_mean": float(part["stil"].mean()), "stil_median": float(part["stil"].median())}
            for name, part in groups]


def known_limits(*, fingerprint: Mapping, n_slides: int, n_cohorts: int, cv: str) -> list[str]:
    enc = fingerprint.get("encoder", {})
    weights = str(enc.get("weights") or "")
    limits = []
    if "random" in str(enc.get("name", "")) or weights in ("", "random-init", "None"):
        limits.append("random-init encoder: synthetic data only (its features carry no learnt histology)")
    if n_slides < 100:
        limits.append(f"trained on {n_slides} slides: the confidence intervals are wide")
    if n_cohorts < 2:
        limits.append("one cohort: the CV estimate says nothing about a new hospital, scanner or stain "
                      "(train on several with --cv leave-center-out)")
    elif cv != "leave-center-out":
        limits.append("folds mix cohorts: the CV estimate is optimistic for a new hospital "
                      "(--cv leave-center-out is the honest one)")
    limits.append("breast cancer H&E only; sTIL% as scored on the training labels' protocol")
    return limits


def build_card(*, name: str, df, metrics: Mapping, fingerprint: Mapping, train: Mapping, seconds: float,
               parent: Mapping | None = None, qc: Mapping | None = None, cv: str = "kfold") -> dict:
    """The card's facts. ``df``: the training labels (slide_id, patient_id, stil[, cohort])."""
    cohorts = cohort_summaries(df)
    enc = dict(fingerprint.get("encoder", {}))
    return plain_json({
        "card_version": CARD_VERSION, "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weakstil_version": __version__, "git_commit": git_commit(),
        "cohorts": cohorts, "n_slides": len(df), "n_patients": int(df["patient_id"].nunique()),
        "labels": {**label_summary(df["stil"].to_numpy()), "plot": HISTOGRAM},
        "encoder": {k: enc.get(k) for k in ("name", "weights", "weights_sha256", "embed_dim")},
        "tiling": dict(fingerprint.get("tiling", {})),
        "aggregation": train.get("aggregation"), "deploy": train.get("deploy"),
        "columns": metrics.get("columns") or {"chosen": train.get("columns")},
        "training": {"cv": cv, "n_folds": metrics.get("n_folds"), "seeds": train.get("seeds", 1),
                     "folds_by": train.get("folds_by"),
                     "lr": train.get("lr"), "max_epochs": train.get("max_epochs"), "seed": train.get("seed"),
                     "seconds": round(float(seconds), 1), "hardware": hardware()},
        "cv_metrics": {"pooled": metrics.get("pooled"), "pooled_ci95": metrics.get("pooled_ci95"),
                       "per_cohort": metrics.get("per_cohort")},
        "linear_probe": metrics.get("linear_probe"),
        "blend": metrics.get("blend"),
        "parent": dict(parent) if parent else None,
        "intended_use": INTENDED_USE,
        "limits": known_limits(fingerprint=fingerprint, n_slides=len(df), n_cohorts=len(cohorts), cv=cv),
        "qc": {"thresholds": qc.get("thresholds"), "rules": qc.get("rules")} if qc else None,
        "evaluations": [],
    }, finite=True)


# --- files ---------------------------------------------------------------------------------------
def write_card(model_dir: str | Path, card: Mapping, *, stil=None) -> Path:
    """Write model_card.json, MODEL_CARD.md and (given the labels) the label histogram."""
    model_dir = Path(model_dir)
    if stil is not None:
        from weakstil.mil.plots import label_histogram

        label_histogram(stil, model_dir / HISTOGRAM, title=f"{card.get('name', '')}: training labels")
    _write(model_dir, card)
    return model_dir / CARD_JSON


def read_card(model_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(model_dir) / CARD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def append_evaluation(model_dir: str | Path, entry: Mapping) -> Path:
    """Add one external validation to the card's history (a model without a card gets a minimal one)."""
    model_dir = Path(model_dir)
    with file_lock(model_dir / f".{CARD_JSON}.lock"):
        card = read_card(model_dir) or {"card_version": CARD_VERSION, "name": model_dir.name,
                                        "note": "this model predates model cards: no training record",
                                        "evaluations": []}
        card.setdefault("evaluations", []).append(plain_json(dict(entry), finite=True))
        _write(model_dir, card)
    return model_dir / CARD_JSON


def _write(model_dir: Path, card: Mapping) -> None:
    write_json(model_dir / CARD_JSON, card)
    write_text(model_dir / CARD_MD, render_markdown(card))


# --- Markdown ------------------------------------------------------------------------------------
def _f(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _columns_line(columns: dict) -> str:
    """The MIL's input columns, and how they were chosen (weakstil.mil.select)."""
    chosen = columns.get("chosen") or "all"
    if not columns.get("candidates"):
        return f"- input columns: {chosen}"
    r2s = ", ".join(f"{k} {_f(v.get('r2'))}" for k, v in columns["candidates"].items())
    return (f"- input columns: {chosen}, {column_choice_phrase(columns)} out-of-fold R² vs "
            f"labels ({r2s}; the choice cross-fitted "
            f"{_f((columns.get('crossfit') or {}).get('r2'))})")


def _metric_rows(pooled: Mapping | None, ci: Mapping | None) -> list[str]:
    if not pooled:
        return ["(none)"]
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for key in ("r2", "pearson", "spearman", "mae", "rmse", "auc@10", "auc@30", "auc@50"):
        if key in pooled:
            lo, hi = (ci or {}).get(key) or (None, None)
            rows.append(f"| {key} | {_f(pooled[key])} | {_f(lo)} – {_f(hi)} |")
    return rows


def render_markdown(card: Mapping) -> str:
    """MODEL_CARD.md from the card's facts."""
    lines = [f"# Model card: {card.get('name', '?')}", ""]
    if card.get("note"):
        lines += [f"_{card['note']}_", ""]
    if "cohorts" in card:
        lines += _training_section(card)
    evaluations = card.get("evaluations") or []
    lines += ["## External validations", ""]
    if not evaluations:
        lines += ["None yet (`weakstil evaluate LABELS --model DIR` adds one).", ""]
    else:
        lines += ["| date | labels | slides | R² [95% CI] | AUC@30 | MAE | QC-flagged |", "|---|---|---|---|---|---|---|"]
        for e in evaluations:
            p, ci = e.get("pooled", {}), (e.get("pooled_ci95") or {}).get("r2") or [None, None]
            lines.append(f"| {e.get('date', '')} | {e.get('labels', '')} | {e.get('n_slides', '')} | "
                         f"{_f(p.get('r2'))} [{_f(ci[0])}, {_f(ci[1])}] | {_f(p.get('auc@30'))} | "
                         f"{_f(p.get('mae'), 1)} | {e.get('n_flagged', '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _training_section(card: Mapping) -> list[str]:
    enc, labels, train = card.get("encoder", {}), card.get("labels", {}), card.get("training", {})
    hw = train.get("hardware") or {}
    lines = [(f"Trained {card.get('created', '')} with weakstil {card.get('weakstil_version', '')} "
             f"(git {card.get('git_commit', 'unknown')})."), "",
             "## Intended use", "", card.get("intended_use", ""), "", "## Known limits", ""]
    lines += [f"- {limit}" for limit in card.get("limits", [])] + ["", "## Training data", ""]
    lines += [f"{card.get('n_slides')} slides of {card.get('n_patients')} patients.", "",
              "| cohort | slides | patients | mean sTIL% | median sTIL% |", "|---|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['n_slides']} | {c['n_patients']} | {_f(c['stil_mean'], 1)} | "
              f"{_f(c['stil_median'], 1)} |" for c in card.get("cohorts", [])]
    lines += ["", (f"Labels: mean {_f(labels.get('mean'), 1)}, median {_f(labels.get('median'), 1)}, range "
              f"{_f(labels.get('min'), 1)}–{_f(labels.get('max'), 1)}; {labels.get('n_high_30')} slides ≥ 30 %."), "",
              f"![label histogram]({labels.get('plot', HISTOGRAM)})", "", "## Model", "",
              f"- encoder: {enc.get('name')} (weights {enc.get('weights')}, sha256 {enc.get('weights_sha256')})",
              f"- tiling: {json.dumps(card.get('tiling', {}), sort_keys=True)}",
              f"- aggregation: {card.get('aggregation')}; deployed: {card.get('deploy')}",
              _columns_line(card.get("columns") or {}),
              (f"- training: {train.get('cv')} CV, {train.get('n_folds')} folds by {train.get('folds_by')} "
              f"({train.get('seeds') or 1} model(s) per fold, their mean the fold's prediction), "
              f"lr {train.get('lr')}, seed {train.get('seed')}, {_f(train.get('seconds'), 0)} s on "
              f"{hw.get('cores')} cores ({hw.get('cpu')}){', GPU ' + hw['gpu'] if hw.get('gpu') else ''}")]
    parent = card.get("parent")
    if parent:
        lines.append(f"- warm start from {parent.get('name')} ({parent.get('path')}, model.ckpt sha256 "
                     f"{parent.get('sha256')}; {parent.get('member')})")
    cv = card.get("cv_metrics", {})
    lines += ["", "## Cross-validation (out-of-fold)", ""] + _metric_rows(cv.get("pooled"), cv.get("pooled_ci95"))
    for name, m in (cv.get("per_cohort") or {}).items():
        lines.append(f"\n{name}: R² {_f(m.get('r2'))}, AUC@30 {_f(m.get('auc@30'))}, MAE {_f(m.get('mae'), 1)}, "
                     f"n {m.get('n')}")
    probe = card.get("linear_probe")
    if probe:
        pooled = probe.get("pooled", probe) if isinstance(probe, Mapping) else {}
        lead = probe.get("mil_minus_probe") if isinstance(probe, Mapping) else None
        lead = (f" The deployed model's lead over it: R² {lead['r2']:+.2f} (95 % paired bootstrap interval "
                f"{lead['r2_lo']:+.2f} to {lead['r2_hi']:+.2f})." if lead and all(
                    isinstance(lead.get(k), (int, float)) for k in ("r2", "r2_lo", "r2_hi")) else "")
        lines += ["", f"Linear-probe baseline: R² {_f(pooled.get('r2'))}, AUC@30 {_f(pooled.get('auc@30'))}.{lead}"]
    blend = card.get("blend")
    if blend:
        w, pooled = float(blend.get("weight", 1.0)), blend.get("pooled") or {}
        lines += ["", f"Deployed score: {w:.1f} × MIL + {1 - w:.1f} × linear probe (weight chosen out of fold); "
                      f"cross-fitted R² {_f(pooled.get('r2'))}, AUC@30 {_f(pooled.get('auc@30'))}."]
    qc = card.get("qc")
    lines += ["", "## QC thresholds (the `qc` column of scores.csv)", ""]
    if qc:
        for key, value in (qc.get("thresholds") or {}).items():
            lines.append(f"- {key}: {value}")
        from weakstil.mil.qc_reference import fixed_rules

        stored = dict(qc.get("rules") or {})
        rules = {**stored, **{k: v for k, v in fixed_rules().items() if k not in stored}}
        lines += [f"- rule {k}: {v}" for k, v in rules.items()]
    else:
        lines.append("No QC reference: scores are marked `no-reference`.")
    return lines + [""]
