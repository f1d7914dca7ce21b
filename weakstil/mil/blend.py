"""The deployed score as a blend of the MIL and the linear probe, with the weight learnt out of fold.

Where cohorts are small or the stain varies a lot, the MIL can lose to the linear probe (slide-mean
features → ridge, :mod:`weakstil.mil.probe`); where the tumour fraction confounds the slide mean,
the probe loses to the MIL (docs/accuracy.md). Rather than guess which one a user's cohort needs,
training picks ``w`` in 0, 0.1, …, 1 for ``w · MIL + (1 − w) · probe`` on the out-of-fold
predictions of both (same folds), ties going to the MIL. The estimate reported for it is
cross-fitted: each fold's slides are blended with the weight chosen on the other folds only.

The deployed model keeps the probe as one vector and an intercept over the raw tile features (the
standardisation folded in) and, for a slide, moves every tile prediction of the MIL by the same
amount, ``(1 − w) · (probe − MIL)``: the score is the blend, the heatmap keeps the MIL's pattern,
and the contributions still sum to the score (:func:`blended`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def choose_weight(mil, probe, labels) -> float:
    """The MIL's weight in the blend that fits ``labels`` best (R²); ties go to the larger weight."""
    from sklearn.metrics import r2_score

    mil, probe, labels = (np.asarray(a, np.float64) for a in (mil, probe, labels))
    scores = [r2_score(labels, w * mil + (1 - w) * probe) for w in WEIGHTS]
    best = max(scores)
    return float(max(w for w, s in zip(WEIGHTS, scores) if s >= best - 1e-12))


def crossfit(mil, probe, labels, folds) -> tuple[np.ndarray, list[float]]:
    """Each fold blended with the weight chosen on the other folds' out-of-fold predictions."""
    mil, probe, labels, folds = (np.asarray(a) for a in (mil, probe, labels, folds))
    out = np.empty(mil.shape, np.float64)
    weights = []
    for k in np.unique(folds):
        test = folds == k
        w = choose_weight(mil[~test], probe[~test], labels[~test])
        out[test] = w * mil[test] + (1 - w) * probe[test]
        weights.append(w)
    return out, weights


def fit_probe(bags: Mapping[str, np.ndarray], slide_ids: Sequence[str], labels) -> dict:
    """The probe fitted on every slide, as ``{"coef": (D,) float32, "intercept", "alpha"}`` over raw
    tile features: ``probe(mean x) = mean(x) · coef + intercept`` (before clipping to 0-100)."""
    from weakstil.mil.probe import LinearProbe, slide_means

    probe = LinearProbe().fit(slide_means(bags, slide_ids), np.asarray(labels, np.float64))
    scaler, ridge = probe.model[0], probe.model[-1]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    coef = ridge.coef_ / scale
    intercept = float(ridge.intercept_ - (scaler.mean_ * coef).sum())
    return {"coef": coef.astype(np.float32), "intercept": intercept, "alpha": probe.alpha}


def probe_score(features: np.ndarray, probe: dict) -> float:
    """The fitted probe's sTIL% (0-100) for one slide's tile features (N, D)."""
    mean = np.asarray(features).mean(axis=0, dtype=np.float64)
    return float(np.clip(mean @ np.asarray(probe["coef"], np.float64) + float(probe["intercept"]), 0.0, 100.0))


def blended(pred, probe_value: float, weight: float):
    """``pred`` (a :class:`weakstil.mil.model.SlidePrediction`) with its score moved to
    ``weight · score + (1 − weight) · probe_value``: every tile prediction shifted by the same
    amount (clipped to 0-100), the score again the sum of the contributions."""
    from weakstil.mil.model import SlidePrediction

    if weight >= 1.0:
        return pred
    shift = (1.0 - weight) * (probe_value - pred.score)
    tile_pred = np.clip(pred.tile_pred + shift, 0.0, 100.0)
    contribution = pred.attention * tile_pred
    return SlidePrediction(float(contribution.sum()), tile_pred, pred.attention, contribution)


def blend_report(mil, probe, labels, folds, weight: float, *, cutoffs=(10, 30, 50)) -> tuple[dict, np.ndarray]:
    """metrics.json's ``blend`` section and the cross-fitted blended out-of-fold predictions."""
    from weakstil.mil.metrics import regression_metrics

    honest, fold_weights = crossfit(mil, probe, labels, folds)
    labels = np.asarray(labels, np.float64)
    return {"weight": weight, "fold_weights": fold_weights,
            "pooled": regression_metrics(labels, honest, cutoffs=cutoffs),
            "note": "score = weight · MIL + (1 − weight) · linear probe; the estimate blends each fold "
                    "with the weight chosen on the other folds"}, honest
