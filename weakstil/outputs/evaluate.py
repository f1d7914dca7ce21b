"""External validation: a trained model on a new labelled cohort (``weakstil evaluate``).

The model's own encoder and tiling are rebuilt from its fingerprint and the matching cache opened
(a cache with other features is refused); slides missing from it are extracted when a slides
folder is given. Each slide is scored and QC-flagged as ``weakstil score`` does, then ``OUT/`` gets:

* ``predictions.csv``: slide_id, patient_id, label, prediction (sTIL% 0-100), qc;
* ``metrics.json``: the layout of training's (``headline``, ``pooled`` with r2, pearson, spearman,
  mae, rmse, auc@10/30/50, ``pooled_ci95`` bootstrap intervals) plus the same on the slides without
  QC flags (``pooled_qc_ok``), the model and labels it came from, and ``scale`` (:func:`scale_check`):
  whether the model reads this cohort on its labels' scale, ranks it but on another scale, or does
  not rank it — with what to do about it;
* ``plots/``: predicted vs label with the identity line and the metrics on it, ROC curves at the
  cut-offs, Bland–Altman;
* ``report.md``: the same for a pathologist to read.

The model card's ``evaluations`` list gets one entry per run (:func:`weakstil.mil.card.append_evaluation`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from weakstil.errors import LabelsError, WeakstilError
from weakstil.fs import atomic_path

log = logging.getLogger(__name__)
PREDICTION_COLUMNS = ("slide_id", "patient_id", "label", "prediction", "qc")


@dataclass
class EvaluationResult:
    out_dir: Path
    metrics: dict
    predictions_csv: Path
    report: Path
    failed: dict  # {slide_id: error} of slides that could not be extracted


def evaluate_model(labels: Path, model_dir: Path, *, features_dir: Path = Path("features"),
                   out_dir: Path = Path("evaluation"), slides=None, weights: str | None = None,
                   opts=None, n_boot: int = 1000, seed: int = 0) -> EvaluationResult:
    """Score the labelled slides with the model and write ``out_dir`` (see the module docstring).

    ``slides``: SlideSource objects (e.g. from ``slide_sources(find_slides(DIR))``) used to extract the
    labelled slides the cache lacks; without them every labelled slide must already be cached.
    """
    from weakstil.mil.card import append_evaluation
    from weakstil.mil.labels import read_labels
    from weakstil.outputs.score import make_scorer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    table = read_labels(labels)
    scorer = make_scorer(model_dir, features_dir, out_dir, weights=weights, opts=opts)
    failed = _extract_missing(scorer, table.slide_ids, slides or [])
    df = table.df[~table.df["slide_id"].isin(failed)].reset_index(drop=True)
    _check_cached(scorer.extractor.cache, df["slide_id"].tolist(), labels)
    scores, qc = score_cached(scorer, df["slide_id"].tolist())
    df = df.assign(label=df["stil"], prediction=scores, qc=qc)
    predictions_csv = _write_predictions(df, out_dir / "predictions.csv")
    cutoffs, high = _cutoffs(scorer.model)
    metrics = metrics_doc(df, cutoffs=cutoffs, high=high, n_boot=n_boot, seed=seed)
    metrics.update({"model": str(model_dir.resolve()), "model_sha256": scorer.model_sha256,
                    "labels": str(labels), "features": str(scorer.extractor.cache.path),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "failed": failed})
    _write_json(out_dir / "metrics.json", metrics)
    _write_plots(df, out_dir / "plots", metrics, cutoffs, title=f"{model_dir.name} on {Path(labels).stem}")
    report = _write_text(out_dir / "report.md", render_report(metrics, df, model_dir))
    append_evaluation(model_dir, {k: metrics[k] for k in ("date", "labels", "n_slides", "n_flagged", "headline",
                                                          "pooled", "pooled_ci95")} | {"out": str(out_dir)})
    return EvaluationResult(out_dir, metrics, predictions_csv, report, failed)


def score_cached(scorer, slide_ids: list[str]) -> tuple[list[float], list[str]]:
    """Slide scores (sTIL% 0-100) and QC cells of cached slides, as ``weakstil score`` computes them.

    The one place evaluation calls the scoring code (the model and the QC of
    :class:`weakstil.outputs.score.SlideScorer`), without writing the per-slide review files.
    """
    from weakstil.outputs.qc import check_slide

    scores, qc = [], []
    for slide_id in slide_ids:
        cached = scorer.extractor.cache.read(slide_id)
        scores.append(float(scorer.model.predict(cached.features).score))
        qc.append(check_slide(scorer.qc_reference, scorer.model, cached.features,
                              mpp=cached.attrs.get("slide_mpp"), attrs=cached.attrs))
    return scores, qc


def _extract_missing(scorer, labelled: list[str], sources) -> dict[str, str]:
    """Extract the labelled slides the cache lacks; {slide_id: error} of those that failed."""
    wanted = set(labelled)
    failed = {}
    for source in sources:
        if source.slide_id not in wanted or scorer.extractor.is_done(source):
            continue
        try:
            scorer.extractor(source)
        except (WeakstilError, OSError) as exc:  # one bad slide never stops the others
            log.warning("%s: %s", source.slide_id, exc)
            failed[source.slide_id] = f"{type(exc).__name__}: {exc}"
    return failed


def _check_cached(cache, slide_ids: list[str], labels: Path) -> None:
    have = set(cache.complete_ids())
    missing = [s for s in slide_ids if s not in have]
    if missing:
        shown = ", ".join(missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise LabelsError(f"{len(missing)} labelled slide(s) have no features in {cache.path}: {shown}",
                          path=labels, fix="pass --slides DIR (the folder of these slides) to extract them, "
                                           "or remove their rows")


def _cutoffs(model) -> tuple[tuple[float, ...], float]:
    train = (model.config or {}).get("train", {})
    cutoffs = tuple(float(c) for c in train.get("cutoffs", (10, 30, 50)))
    return cutoffs, float(train.get("high_cutoff", 30))


def metrics_doc(df, *, cutoffs, high: float, n_boot: int = 1000, seed: int = 0) -> dict:
    """metrics.json: pooled metrics with bootstrap CIs, on all slides and on those without QC flags."""
    from weakstil.mil.metrics import auc_key, bootstrap_intervals, regression_metrics

    label, pred = df["label"].to_numpy(dtype=float), df["prediction"].to_numpy(dtype=float)
    pooled = regression_metrics(label, pred, cutoffs=cutoffs)
    ci = bootstrap_intervals(label, pred, cutoffs=cutoffs, n_boot=n_boot, seed=seed)
    ok = (df["qc"] == "").to_numpy()
    doc = {"n_slides": len(df), "n_patients": int(df["patient_id"].nunique()),
           "n_flagged": int((~ok).sum()),
           "headline": {"r2": pooled["r2"], auc_key(high): pooled.get(auc_key(high))},
           "pooled": pooled, "pooled_ci95": {k: list(v) for k, v in ci.items()},
           "pooled_qc_ok": regression_metrics(label[ok], pred[ok], cutoffs=cutoffs) if ok.sum() >= 2 else None,
           "scale": scale_check(label, pred, pooled)}
    from weakstil.fs import plain_json

    return plain_json(doc, finite=True)


RANKS = 0.7  # Spearman from which the model is said to rank the cohort's slides
RESCALED = 0.1  # R² a straight line through the predictions would add, from which the scale is said to differ
NO_RANK = 0.5  # Spearman below which the model is said not to rank the cohort


def scale_check(label: np.ndarray, pred: np.ndarray, pooled: dict) -> dict:
    """Whether the model reads the cohort on its labels' scale: the least-squares line
    ``label ≈ intercept + slope × prediction``, the R² the predictions would reach through it, and a
    verdict with what to do.

    * ``agrees``: the line adds less than :data:`RESCALED` to R²;
    * ``rescaled``: the model ranks the slides (Spearman ≥ :data:`RANKS`) but the line adds at least
      :data:`RESCALED` — the labels count sTIL% on another scale than the training cohort's (another
      scorer, lab or guideline; on synthetic cohorts, another generator: docs/accuracy.md). Retraining
      on this cohort's labels is the answer measured there; a dozen labelled slides were enough;
    * ``does-not-rank``: Spearman below :data:`NO_RANK`: the features do not carry over (check QC
      flags, stain, magnification) — retrain on this cohort;
    * ``unclear`` otherwise, or with fewer than 3 slides or constant values.
    """
    out = {"slope": None, "intercept": None, "r2_line": None, "verdict": "unclear", "advice": ""}
    spearman, r2 = pooled.get("spearman"), pooled.get("r2")
    if len(label) < 3 or np.ptp(pred) == 0 or np.ptp(label) == 0 or r2 is None or r2 != r2:
        return out
    slope, intercept = np.polyfit(pred, label, 1)
    r2_line = float(pooled["pearson"]) ** 2
    out.update(slope=float(slope), intercept=float(intercept), r2_line=r2_line)
    if spearman == spearman and spearman < NO_RANK:
        out.update(verdict="does-not-rank", advice=(
            f"the model does not rank these slides (Spearman {spearman:.2f}): what it learned does not carry "
            "over to this cohort. Check the QC flags, stain and magnification; retrain on this cohort's labels "
            "(weakstil train)"))
    elif r2_line - r2 < RESCALED:
        out["verdict"] = "agrees"
    elif spearman == spearman and spearman >= RANKS:
        out.update(verdict="rescaled", advice=(
            f"the model ranks these slides (Spearman {spearman:.2f}) but reads them on another scale: "
            f"label ≈ {intercept:.1f} + {slope:.2f} × prediction would raise R² from {r2:.2f} to {r2_line:.2f}. "
            "These labels count sTIL% differently from the training cohort's (another scorer, lab or "
            "guideline). Retrain on this cohort's labels (weakstil train; on synthetic cohorts a dozen "
            "labelled slides trained from scratch beat the transferred model, docs/accuracy.md)"))
    return out


# --- files ---------------------------------------------------------------------------------------
def _write_predictions(df, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.loc[:, list(PREDICTION_COLUMNS)].to_csv(tmp, index=False, float_format="%.4f")
    return path


def _write_json(path: Path, doc: dict) -> Path:
    return _write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _write_plots(df, plot_dir: Path, metrics: dict, cutoffs, *, title: str) -> None:
    from weakstil.mil.plots import bland_altman_plot, roc_plot, scatter_plot

    label, pred = df["label"].to_numpy(dtype=float), df["prediction"].to_numpy(dtype=float)
    p = metrics["pooled"]
    stats = (f"MAE {_fmt(p['mae'], 1)}, RMSE {_fmt(p['rmse'], 1)}, "
             + ", ".join(f"AUC@{c:g} {_fmt(p.get(f'auc@{c:g}'))}" for c in cutoffs))
    scatter_plot(label, pred, plot_dir / "scatter.png", title=f"{title}\n{stats}")
    roc_plot(label, pred, plot_dir / "roc.png", cutoffs=cutoffs, title=title)
    bland_altman_plot(label, pred, plot_dir / "bland_altman.png", title=title)


def render_report(metrics: dict, df, model_dir: Path) -> str:
    """report.md: what was measured, in words a pathologist reads, then the table and the plots."""
    p, ci = metrics["pooled"], metrics["pooled_ci95"]
    diff = df["prediction"] - df["label"]
    lines = [f"# External validation of `{Path(model_dir).name}`", "",
             (f"{metrics['date']}: {metrics['n_slides']} slides of {metrics['n_patients']} patients "
             f"(labels `{metrics['labels']}`), scored with model `{metrics['model']}`."), "",
             "## In short", "",
             (f"- The model's sTIL% explains {_pct(p['r2'])} of the variation between slides "
             f"(R² {_fmt(p['r2'])}, 95% CI {_fmt(ci['r2'][0])} to {_fmt(ci['r2'][1])})."),
             (f"- On average the model is {_fmt(p['mae'], 1)} percentage points away from the label "
             f"(MAE); it reads {_fmt(float(diff.mean()), 1)} points {'high' if diff.mean() >= 0 else 'low'} overall "
             "(Bland–Altman bias)."),
             (f"- Telling sTIL-high (≥ 30 %) from low: AUC {_fmt(p.get('auc@30'))} "
             f"(95% CI {_fmt((ci.get('auc@30') or [None])[0])} to {_fmt((ci.get('auc@30') or [None, None])[1])})."),
             f"- {metrics['n_flagged']} slide(s) carry QC flags (see the table below): check them by eye.", ""]
    advice = (metrics.get("scale") or {}).get("advice")
    if advice:
        lines[-1:-1] = [f"- **Scale**: {advice}."]
    if metrics.get("failed"):
        lines += [f"- {len(metrics['failed'])} slide(s) could not be read and are left out: "
                  + ", ".join(metrics["failed"]), ""]
    lines += ["## All metrics", "", "| metric | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(p[k])} | {_fmt(ci[k][0])} – {_fmt(ci[k][1])} |" for k in ci if k in p]
    lines += ["", ("![predicted vs label](plots/scatter.png) ![ROC](plots/roc.png) "
              "![Bland–Altman](plots/bland_altman.png)"), ""]
    flagged = df[df["qc"] != ""]
    if len(flagged):
        lines += ["## Slides with QC flags", "", "| slide | label | prediction | flags |", "|---|---|---|---|"]
        lines += [f"| {r.slide_id} | {r.label:.1f} | {r.prediction:.1f} | {r.qc} |" for r in flagged.itertuples()]
        lines.append("")
    worst = df.assign(err=np.abs(diff)).sort_values("err", ascending=False).head(5)
    lines += ["## Largest disagreements", "", "| slide | label | prediction |", "|---|---|---|"]
    lines += [f"| {r.slide_id} | {r.label:.1f} | {r.prediction:.1f} |" for r in worst.itertuples()]
    return "\n".join(lines) + "\n"


def _pct(r2) -> str:
    return "an undefined share" if r2 is None else f"{max(r2, 0.0):.0%}"
