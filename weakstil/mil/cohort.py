"""Glue between the command line and the library: train from feature caches, show metrics tables.

Training takes one or several cohorts (labels files, feature caches), keeps a ``cohort`` column,
reports metrics per cohort and can fold by cohort (``cv="leave-center-out"``: the honest estimate
for a new hospital); it can warm-start from an existing model (``init``). Every model folder also
gets the QC reference (``qc_reference.json``, :mod:`weakstil.mil.qc_reference`; scoring's flags are
:mod:`weakstil.outputs.qc`) and the model card (:mod:`weakstil.mil.card`).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from weakstil.mil import column_choice_phrase

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    name: str
    path: Path
    metrics: dict


@dataclass
class Parent:
    """A model to warm-start from: the member weights every fold starts from, and its record."""

    state: dict
    model_config: dict
    info: dict


def _as_list(value) -> list[Path]:
    return [Path(v) for v in ([value] if isinstance(value, (str, Path)) else value)]


def open_caches(features, encoder: str | None = None) -> list:
    """One FeatureCache per ``--features`` folder; all must hold the same encoder and tiling."""
    from weakstil.embed.cache import FeatureCache
    from weakstil.errors import CacheMismatchError
    from weakstil.fingerprint import fingerprint_differences

    caches = [FeatureCache.find(path, encoder) for path in _as_list(features)]
    first = {"encoder": caches[0].encoder_fp, "tiling": caches[0].tiling_fp}
    for cache in caches[1:]:
        diffs = fingerprint_differences(first, {"encoder": cache.encoder_fp, "tiling": cache.tiling_fp})
        if diffs:
            raise CacheMismatchError(f"the caches {caches[0].path} and {cache.path} hold other features: "
                                     + "; ".join(diffs), path=cache.path,
                                     fix="extract every cohort with the same encoder and tiling")
    return caches


def cohort_names(paths: list[Path]) -> list[str]:
    """Each labels file's stem; where stems repeat (``a/labels.csv``, ``b/labels.csv``) the folder
    names, and the full paths where those repeat too."""
    for names in ([p.stem for p in paths], [p.parent.name for p in paths]):
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def read_cohorts(labels, caches: list):
    """Every labels file, checked against the union of the caches, as one frame with a ``cohort``
    column (a ``cohort`` column in the file wins, then ``center``, then the file's name)."""
    import pandas as pd

    from weakstil.errors import LabelsError
    from weakstil.mil.labels import read_labels

    paths = _as_list(labels)
    cached = set().union(*(c.complete_ids() for c in caches))
    frames = []
    for path, name in zip(paths, cohort_names(paths)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = read_labels(path, cached_ids=cached).df.copy()
        for w in caught:  # among them the cached slides without a label, listed once
            if len(paths) == 1 or "no label" not in str(w.message):
                log.warning("%s", w.message)
        given = df["cohort"] if "cohort" in df.columns else df["center"] if "center" in df.columns else None
        df["cohort"] = [str(v) if isinstance(v, str) and v else name
                        for v in (given if given is not None else [None] * len(df))]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    twice = sorted(df.loc[df["slide_id"].duplicated(), "slide_id"])
    if twice:
        raise LabelsError(f"{len(twice)} slide id(s) appear in more than one labels file: {', '.join(twice[:10])}",
                          fix="slide ids must be unique across cohorts; rename the files (ids are file stems)")
    return df


def load_cohort_bags(caches: list, slide_ids: list[str]) -> tuple[dict, dict]:
    """({slide_id: features}, {slide_id: its cache attrs (mpp, stain estimate …)}) from whichever
    cache holds each slide."""
    from weakstil.mil.fit import load_bags

    bags, attrs, left = {}, {}, list(slide_ids)
    for cache in caches:
        here = set(cache.complete_ids())
        mine = [s for s in left if s in here]
        bags.update(load_bags(cache, mine))
        attrs.update({s: cache._slide_attrs(s) or {} for s in mine})
        left = [s for s in left if s not in here]
    return bags, attrs


def center_folds(df) -> np.ndarray:
    """Leave-one-center-out: fold k holds the slides of the k-th cohort/center (needs two or more)."""
    from weakstil.errors import TooFewGroupsError

    names = list(dict.fromkeys(df["cohort"]))
    if len(names) < 2:
        raise TooFewGroupsError(f"leave-center-out needs at least 2 cohorts or centers; the labels have {len(names)}",
                                fix="give several labels files, or a center/cohort column with 2+ values")
    patients = df.groupby("patient_id")["cohort"].nunique()
    split = patients[patients > 1].index.tolist()
    if split:
        from weakstil.errors import LabelsError

        raise LabelsError(f"patient(s) in more than one cohort: {', '.join(map(str, split[:10]))}",
                          fix="a patient must belong to one center for leave-center-out")
    return np.array([names.index(c) for c in df["cohort"]], dtype=np.int64)


def parent_state(model_dir: Path, fingerprint: dict) -> Parent:
    """The warm-start weights of ``model_dir`` (its fingerprint must match the training features).

    An ensemble parent contributes ONE member: the one with the best validation R² in its
    metrics.json (``members``, one record per member; ``folds`` for models of one model per fold
    trained before it; member 0 without either). Its members were trained from different random
    initialisations, so their weights lie in different basins and their average is not a working
    model (averaging predictions is fine, averaging weights is not).
    """
    from weakstil.fingerprint import file_sha256
    from weakstil.mil.model import check_fingerprint, load_model

    model_dir = Path(model_dir)
    parent = load_model(model_dir)
    check_fingerprint(parent, fingerprint)
    best, why = 0, "member 0 (no fold validation record)"
    try:
        metrics = json.loads((model_dir / "metrics.json").read_text())
        records = metrics.get("members") or metrics["folds"]
        r2 = [f.get("best_val_r2") if f.get("best_val_r2") is not None else -np.inf for f in records]
        if len(r2) == len(parent.members) and np.isfinite(max(r2)):
            best = int(np.argmax(r2))
            why = f"member {best} of {len(parent.members)} (best validation R² {max(r2):.3f})"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ckpt = model_dir / "model.ckpt"
    info = {"path": str(model_dir.resolve()), "name": model_dir.name, "sha256": file_sha256(ckpt),
            "member": why, "n_members": len(parent.members)}
    return Parent(parent.members[best].state_dict(), dict(parent.members[best].config), info)  # its own columns


def per_cohort_metrics(cv, df, cutoffs) -> dict:
    """Out-of-fold metrics of each cohort (only with two or more cohorts)."""
    from weakstil.mil.metrics import regression_metrics

    if df["cohort"].nunique() < 2:
        return {}
    out = {}
    for name in dict.fromkeys(df["cohort"]):
        rows = (df["cohort"] == name).to_numpy()
        out[str(name)] = regression_metrics(cv.labels[rows], cv.predictions[rows], cutoffs=cutoffs)
    return out


def _extras(df, attrs, bags, cfg, fingerprint, *, name, parent, cv_kind, t0):
    """What train_model writes besides the model: per-cohort metrics, QC reference, model card."""
    from weakstil.fs import plain_json
    from weakstil.mil.card import build_card, write_card
    from weakstil.mil.qc_reference import (
        REFERENCE_FILE,
        measured_columns,
        reference_from_bags,
        save_reference,
        stain_amounts,
    )

    mpps = {s: a.get("slide_mpp") for s, a in attrs.items()}
    stains = {s: stain_amounts(a) for s, a in attrs.items()}

    def write(tmp: Path, cv, metrics: dict, model) -> None:
        per_cohort = per_cohort_metrics(cv, df, cfg.cutoffs)
        if per_cohort:
            metrics["per_cohort"] = plain_json(per_cohort, finite=True)
        metrics["cv"] = cv_kind
        reference = reference_from_bags(bags, list(df["slide_id"]), mpps, model, stains,
                                        measured_columns=measured_columns(fingerprint.get("encoder")))
        save_reference(reference, tmp / REFERENCE_FILE)
        card = build_card(name=name, df=df, metrics=metrics, fingerprint=fingerprint, train=asdict(cfg),
                          seconds=time.perf_counter() - t0, parent=parent, qc=reference, cv=cv_kind)
        write_card(tmp, card, stil=df["stil"].to_numpy())

    return write


def train_from_cache(labels, features, *, encoder: str | None = None, models_dir: Path = Path("models"),
                     name: str = "stil", aggregations=("attention",), progress: bool = True,
                     overwrite: bool = False, run_info: dict | None = None, init: Path | None = None,
                     cv: str = "kfold", **train_kwargs) -> list[TrainedRun]:
    """Read labels and the caches' bags, cross-validate each aggregation, write ``models/<name>``.

    ``labels`` and ``features`` may each be one path or several (several cohorts); ``init`` a model
    folder to warm-start from (its architecture is kept); ``cv`` "kfold" or "leave-center-out".
    With several aggregations each model is named ``<name>-<aggregation>``.
    """
    from weakstil.mil.train import TrainConfig, resolve_stroma_prior, train_model

    t0 = time.perf_counter()
    caches = open_caches(features, encoder)
    df = read_cohorts(labels, caches)
    bags, attrs = load_cohort_bags(caches, list(df["slide_id"]))
    fingerprint = {"encoder": caches[0].encoder_fp, "tiling": caches[0].tiling_fp}
    folds = center_folds(df) if cv == "leave-center-out" else None
    if folds is not None:
        train_kwargs["n_folds"] = int(folds.max()) + 1
    parent = parent_state(init, fingerprint) if init is not None else None
    if parent is not None:
        arch = {k: parent.model_config[k] for k in ("hidden", "dropout")}
        # the parent's tile head too (models saved before the head option have the MLP head)
        arch["head"] = parent.model_config.get("head") or "mlp"
        arch["stroma_prior"] = bool(parent.model_config.get("stroma_prior", False))  # its weights assume it
        arch["stroma_floor"] = float(parent.model_config["stroma_floor"])  # and its floor (0.1 for older models)
        if train_kwargs.get("stroma_floor") not in (None, arch["stroma_floor"]):
            log.warning("warm start keeps the parent's stroma floor (%g)", arch["stroma_floor"])
        from weakstil.mil.fit import columns_of

        arch["columns"] = columns_of(parent.model_config.get("inputs"), parent.model_config.get("skip"))  # and its columns
        if train_kwargs.get("head") not in (None, arch["head"]):
            log.warning("warm start keeps the parent's tile head (%s)", arch["head"])
        if train_kwargs.get("columns") not in (None, "auto", arch["columns"]):
            log.warning("warm start keeps the parent's input columns (%s)", arch["columns"])
        if list(aggregations) != [parent.model_config["aggregation"]]:
            log.warning("warm start keeps the parent's aggregation (%s)", parent.model_config["aggregation"])
        aggregations = [parent.model_config["aggregation"]]
        train_kwargs.update(arch)
    runs = []
    for aggregation in aggregations:
        cfg = resolve_stroma_prior(TrainConfig(aggregation=aggregation, **train_kwargs), fingerprint)
        model_name = name if len(aggregations) == 1 else f"{name}-{aggregation}"
        info = {**(run_info or {}), "labels": [str(p) for p in _as_list(labels)],
                "features": [str(c.path) for c in caches], "cv": cv,
                "parent": parent.info if parent else None}
        extras = _extras(df, attrs, bags, cfg, fingerprint, name=model_name, parent=parent and parent.info,
                         cv_kind=cv, t0=t0)
        out = train_model(bags, df, cfg, out_dir=Path(models_dir) / model_name, fingerprint=fingerprint,
                          progress=progress, overwrite=overwrite, run_info=info,
                          init_state=parent.state if parent else None, folds=folds, extras=extras)
        runs.append(TrainedRun(model_name, out, json.loads((out / "metrics.json").read_text())))
    return runs


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


PROBE_TIE = 0.02  # R²: a lead smaller than this either way is no lead


def probe_verdict(run: TrainedRun) -> str | None:
    """One line on whether the deployed model beats the linear probe on this cohort (issue #14: the
    MIL should never lose to it), from ``metrics.json``'s ``linear_probe.mil_minus_probe``: the
    out-of-fold R² difference with its 95 % paired bootstrap interval. None for models trained before
    it was recorded."""
    d = ((run.metrics.get("linear_probe") or {}).get("mil_minus_probe")) or {}
    r2, lo, hi = d.get("r2"), d.get("r2_lo"), d.get("r2_hi")
    if not all(isinstance(v, (int, float)) and v == v for v in (r2, lo, hi)):
        return None
    figure = f"R² {r2:+.2f} [95% CI {lo:+.2f}, {hi:+.2f}]"
    if lo > 0 and r2 >= PROBE_TIE:
        return f"{run.name}: beats the linear probe on these slides ({figure}, out of fold, same folds)."
    if hi < 0 and r2 <= -PROBE_TIE:
        return (f"{run.name}: the linear probe beats it on these slides ({figure}, out of fold, same folds): "
                "the MIL's columns do not carry this cohort's sTIL% as well as the slide-mean features do. "
                "Deploy the blend of both (--blend, its weight chosen out of fold) and look at the top tiles; "
                "docs/accuracy.md lists the cohorts where this happens.")
    return (f"{run.name}: within noise of the linear probe on these slides ({figure}, out of fold, same folds); "
            "more slides would tell them apart.")


def metrics_table(runs: list[TrainedRun], *, title: str = "cross-validation (out-of-fold)"):
    """A rich table: one row per model; pooled metrics with 95 % CIs, and per-fold mean ± SD of R²."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("model", "slides", "tiles", "R² pooled [95% CI]", "R² folds", "r", "MAE", "AUC @10/30/50", "train s"):
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
            _fmt(pooled.get("pearson")), _fmt(pooled.get("mae"), 1), aucs,
            _fmt(m.get("seconds", m.get("cv_seconds")), 0))  # the whole run: every column candidate's CV too
        probe, blend = (m.get("linear_probe") or {}).get("pooled"), m.get("blend")
        if probe:  # the baseline on the same folds: does the MIL earn its keep on this cohort?
            table.add_row("  linear probe", "", "", _fmt(probe.get("r2")), "", _fmt(probe.get("pearson")),
                          _fmt(probe.get("mae"), 1), "/".join(_fmt(probe.get(f"auc@{c}")) for c in (10, 30, 50)), "")
        columns = m.get("columns")
        if columns:  # the MIL's input columns, chosen out of fold (mil.select)
            chosen = columns.get("members") or [columns["chosen"]]
            other = ", ".join(f"{k} {_fmt(v.get('r2'))}" for k, v in columns["candidates"].items()
                              if k not in chosen)
            table.add_row(f"  columns: {columns['chosen']} ({column_choice_phrase(columns)}; vs {other or 'none'}; "
                          "cross-fitted choice)", "", "",
                          _fmt((columns.get("crossfit") or {}).get("r2")), "", "", "", "", "")
        if blend:  # what is deployed: the blend (and the calibration line), cross-fitted
            cal = m.get("calibration") or {}
            d = (cal.get("pooled") if cal.get("applied", True) else None) or blend.get("pooled") or {}
            w = float(blend.get("weight", 1.0))
            table.add_row(f"  deployed: {w:.1f}·MIL + {1 - w:.1f}·probe", "", "", _fmt(d.get("r2")), "",
                          _fmt(d.get("pearson")), _fmt(d.get("mae"), 1),
                          "/".join(_fmt(d.get(f"auc@{c}")) for c in (10, 30, 50)), "")
        for cohort, c in (m.get("per_cohort") or {}).items():  # several cohorts: one row each
            table.add_row(f"  {cohort}", str(c.get("n", "")), "", _fmt(c.get("r2")), "", _fmt(c.get("pearson")),
                          _fmt(c.get("mae"), 1), "/".join(_fmt(c.get(f"auc@{k}")) for k in (10, 30, 50)), "")
    return table
