"""Post-hoc linear calibration of slide scores, fitted on out-of-fold predictions.

MIL predictions come out compressed toward the cohort mean (shrinkage from weight decay, early
stopping and the sigmoid). A line ``label ≈ intercept + slope · prediction`` fitted on the
cross-validation's out-of-fold predictions undoes that; the deployed model applies it to its tile
predictions, so tile values, contributions and the slide score stay consistent (the score is the
attention-weighted mean of the tiles, and a line commutes with a weighted mean).

The estimate reported for a calibrated model is *cross-fitted*: each fold's predictions are
calibrated by a line fitted on the other folds' out-of-fold predictions only.
"""

from __future__ import annotations

import numpy as np

SLOPE_RANGE = (0.5, 2.0)  # a line outside this says more about noise than about shrinkage
MIN_SLIDES = 8


def fit_line(pred, labels) -> dict:
    """``{"slope", "intercept", "n"}`` of labels regressed on predictions (both 0-100).

    Only what the out-of-fold predictions show beyond their noise is corrected: a slope within two
    standard errors of 1 is kept at 1, and a mean offset within two standard errors of 0 at 0, so a
    well-calibrated model is left alone instead of being bent by noise. The slope is kept in
    SLOPE_RANGE. The identity when there are fewer than MIN_SLIDES slides or constant predictions.
    """
    p, y = np.asarray(pred, np.float64), np.asarray(labels, np.float64)
    identity = {"slope": 1.0, "intercept": 0.0, "n": int(p.size)}
    if p.size < MIN_SLIDES or np.ptp(p) == 0:
        return identity
    slope = np.cov(p, y, bias=True)[0, 1] / np.var(p)
    resid = y - y.mean() - slope * (p - p.mean())
    se_slope = np.sqrt(resid.var() / (p.size - 2) / np.var(p))
    slope = float(np.clip(slope, *SLOPE_RANGE)) if abs(slope - 1) > 2 * se_slope else 1.0
    offset = y.mean() - slope * p.mean()
    se_offset = np.std(y - slope * p) / np.sqrt(p.size - 1)
    if slope == 1.0 and abs(offset) <= 2 * se_offset:
        return identity
    return {"slope": slope, "intercept": float(offset), "n": int(p.size)}


def apply_line(values, line: dict | None) -> np.ndarray:
    """``intercept + slope · values`` clipped to 0-100 (values unchanged without a line)."""
    values = np.asarray(values, np.float64)
    if not line:
        return values
    return np.clip(line["intercept"] + line["slope"] * values, 0.0, 100.0)


def crossfit(pred, labels, folds) -> np.ndarray:
    """Each fold's predictions calibrated by the line fitted on the other folds (honest estimate)."""
    pred, labels, folds = (np.asarray(a) for a in (pred, labels, folds))
    out = np.empty(pred.shape, np.float64)
    for k in np.unique(folds):
        test = folds == k
        out[test] = apply_line(pred[test], fit_line(pred[~test], labels[~test]))
    return out


def calibration_report(calibrated, labels, line: dict, *, applied: bool = True, cutoffs=(10, 30, 50)) -> dict:
    """metrics.json's ``calibration`` section: the line, whether the model applies it, and the
    cross-fitted estimate from ``calibrated`` (:func:`crossfit`'s predictions)."""
    from weakstil.mil.metrics import regression_metrics

    return {"line": line, "applied": bool(applied),
            "pooled": regression_metrics(labels, calibrated, cutoffs=cutoffs),
            "note": "each fold calibrated by a line fitted on the other folds' out-of-fold predictions"}
