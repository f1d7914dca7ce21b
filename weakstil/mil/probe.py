"""The linear-probe baseline: the slide-mean of tile features → ridge regression.

Every training run reports it beside the MIL, on the same folds (``metrics.json`` → ``linear_probe``),
so a user sees at once whether the MIL earns its keep on their cohort. Features are standardised
on the training slides; the ridge penalty is chosen inside each training fold by scikit-learn's
efficient leave-one-out (``RidgeCV``), so no test slide ever influences it. Predictions are clipped
to 0-100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


def slide_means(bags: Mapping[str, np.ndarray], slide_ids: Sequence[str]) -> np.ndarray:
    """(n_slides, D) float64: each slide's mean tile feature (float16 bags summed in float64)."""
    return np.stack([np.asarray(bags[s]).mean(axis=0, dtype=np.float64) for s in slide_ids])


def _scale_columns(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return x * weights


@dataclass
class LinearProbe:
    """Standardise → RidgeCV on slide-mean features; ``predict`` gives sTIL% in 0-100.

    ``column_weights`` (D,): multiply the standardised features before the ridge, so that it
    penalises column j ``1 / w_j²`` as much (the MIL's probe start emphasises the morphometry's
    measurements of sTIL% this way: :attr:`weakstil.mil.fit.TrainConfig.measured_emphasis`). The
    baseline reported beside the MIL has none."""

    alphas: tuple[float, ...] = ALPHAS
    model: object = None
    column_weights: object = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearProbe":
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer, StandardScaler

        steps = [StandardScaler()]
        if self.column_weights is not None:
            steps.append(FunctionTransformer(_scale_columns, kw_args={
                "weights": np.asarray(self.column_weights, np.float64)}))
        self.model = make_pipeline(*steps, RidgeCV(alphas=self.alphas))
        self.model.fit(np.asarray(x, np.float64), np.asarray(y, np.float64))
        return self

    @property
    def alpha(self) -> float:
        return float(self.model[-1].alpha_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.clip(self.model.predict(np.asarray(x, np.float64)), 0.0, 100.0)


def probe_oof(features: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold probe predictions (0-100) on the given folds, and each fold's chosen penalty."""
    labels = np.asarray(labels, np.float64)
    predictions = np.full(len(labels), np.nan)
    alphas = []
    for k in np.unique(folds):
        test = folds == k
        probe = LinearProbe().fit(features[~test], labels[~test])
        predictions[test] = probe.predict(features[test])
        alphas.append(probe.alpha)
    return predictions, alphas


def probe_report(bags: Mapping[str, np.ndarray], slide_ids: Sequence[str], labels, folds, *,
                 cutoffs=(10, 30, 50)) -> dict:
    """The probe's metrics on the MIL's folds, in the shape of the MIL's own (pooled, per fold)."""
    from weakstil.mil.metrics import fold_summary, regression_metrics

    labels = np.asarray(labels, np.float64)
    folds = np.asarray(folds)
    predictions, alphas = probe_oof(slide_means(bags, slide_ids), labels, folds)
    fold_metrics = [regression_metrics(labels[folds == k], predictions[folds == k], cutoffs=cutoffs)
                    for k in np.unique(folds)]
    return {
        "model": "slide-mean features → ridge (alpha by leave-one-out inside each training fold)",
        "pooled": regression_metrics(labels, predictions, cutoffs=cutoffs),
        "fold_mean_sd": fold_summary(fold_metrics),
        "alphas": alphas,
        "predictions": [float(p) for p in predictions],
    }
