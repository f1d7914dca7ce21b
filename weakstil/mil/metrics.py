"""Agreement between predicted and pathologist sTIL% (both on 0-100).

``regression_metrics`` gives the numbers papers report (R², Pearson, Spearman, MAE, RMSE and the
AUC of the continuous prediction for sTIL-high vs sTIL-low at each cut-off); ``bootstrap_intervals``
their percentile intervals over slides resampled with replacement, computed for all resamples at
once with array formulas that agree with scikit-learn and SciPy; ``paired_difference``
how much better one set of predictions is than another on the same slides (a paired bootstrap);
``fold_summary`` the mean ± SD over CV folds.

A metric that is undefined for the data (AUC with one class present, R² or a correlation when the
labels or predictions are constant) is NaN, never an exception.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_CUTOFFS = (10, 30, 50)
_CHUNK_CELLS = 2_000_000  # resamples x slides processed at once in the bootstrap (memory bound)


def auc_key(cutoff: float) -> str:
    """The metric name of the AUC at a cut-off: ``auc@10``, ``auc@12.5``."""
    return f"auc@{cutoff:g}"


def metric_names(cutoffs: Sequence[float] = DEFAULT_CUTOFFS) -> list[str]:
    """Names of the metrics that have an interval, in report order (all but ``n``)."""
    return ["r2", "pearson", "spearman", "mae", "rmse", *(auc_key(c) for c in cutoffs)]


def check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Both as 1-D float64 arrays of equal, non-zero length with finite values, or ValueError."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no slides to evaluate")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("y_true and y_pred must be finite (found NaN or inf)")
    return t, p


def regression_metrics(y_true, y_pred, *, cutoffs: Iterable[float] = DEFAULT_CUTOFFS) -> dict:
    """r2, pearson, spearman, mae, rmse, n and ``auc@{c}`` (label ≥ c is sTIL-high) per cut-off.

    R² is scikit-learn's ``r2_score`` (NaN when the labels are constant, where it is undefined);
    correlations are SciPy's (NaN when either side is constant or n < 2); AUC is scikit-learn's
    ``roc_auc_score`` on the continuous prediction (NaN when only one class is present).
    """
    from scipy import stats
    from sklearn.metrics import r2_score, roc_auc_score

    t, p = check_pair(y_true, y_pred)
    constant = t.size < 2 or np.ptp(t) == 0 or np.ptp(p) == 0
    err = p - t
    out: dict[str, float | int] = {
        "r2": math.nan if t.size < 2 or np.ptp(t) == 0 else float(r2_score(t, p)),
        "pearson": math.nan if constant else float(stats.pearsonr(t, p).statistic),
        "spearman": math.nan if constant else float(stats.spearmanr(t, p).statistic),
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "n": int(t.size),
    }
    for c in cutoffs:
        high = t >= c
        one_class = high.all() or not high.any()
        out[auc_key(c)] = math.nan if one_class else float(roc_auc_score(high, p))
    return out


def _resamples(n: int, n_boot: int, seed: int, level: float):
    """Index arrays (B, n) of ``n_boot`` resamples of ``n`` slides with replacement, in chunks that
    bound the memory; checks ``n_boot`` and ``level`` first."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    return (rng.integers(0, n, size=(min(chunk, n_boot - start), n)) for start in range(0, n_boot, chunk))


def _interval(parts: list[np.ndarray], level: float) -> tuple[float, float]:
    """Percentile interval of the finite values in ``parts``; ``(nan, nan)`` when there are none."""
    values = np.concatenate(parts)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_intervals(
    y_true,
    y_pred,
    *,
    cutoffs: Iterable[float] = DEFAULT_CUTOFFS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile interval ``(lo, hi)`` of every metric over ``n_boot`` resamples of the slides.

    Resamples where a metric is undefined (one class for an AUC, constant labels for R²) are left
    out of that metric's interval; a metric undefined in every resample gets ``(nan, nan)``. The
    same ``seed`` gives the same intervals.
    """
    t, p = check_pair(y_true, y_pred)
    cutoffs = tuple(cutoffs)
    parts = [batch_metrics(t[idx], p[idx], cutoffs=cutoffs) for idx in _resamples(t.size, n_boot, seed, level)]
    return {name: _interval([part[name] for part in parts], level) for name in metric_names(cutoffs)}


def paired_difference(
    y_true,
    pred_a,
    pred_b,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """How much better ``pred_a`` is than ``pred_b`` on the same slides: ``r2`` = R²(a) − R²(b) and
    ``mae`` = MAE(b) − MAE(a) (both positive when ``a`` is better), each with the percentile
    interval of the difference over ``n_boot`` resamples of the slides, the two predictions
    resampled together (``r2_lo``, ``r2_hi``, ``mae_lo``, ``mae_hi``). A paired interval is much
    narrower than the two separate ones: the slides that are hard for one are mostly hard for the
    other. NaN where R² is undefined (constant labels)."""
    t, a = check_pair(y_true, pred_a)
    _, b = check_pair(y_true, pred_b)

    def lead(idx) -> dict[str, np.ndarray]:
        ma, mb = batch_metrics(t[idx], a[idx], cutoffs=()), batch_metrics(t[idx], b[idx], cutoffs=())
        return {"r2": ma["r2"] - mb["r2"], "mae": mb["mae"] - ma["mae"]}

    whole = lead(np.arange(t.size)[None])
    parts = [lead(idx) for idx in _resamples(t.size, n_boot, seed, level)]
    out: dict[str, float] = {}
    for name in ("r2", "mae"):
        out[name] = float(whole[name][0])
        out[f"{name}_lo"], out[f"{name}_hi"] = _interval([part[name] for part in parts], level)
    return out


def batch_metrics(
    t: np.ndarray, p: np.ndarray, *, cutoffs: Sequence[float]
) -> dict[str, np.ndarray]:
    """The metrics of :func:`regression_metrics` for each row of ``t`` and ``p`` (shape (B, n)) at
    once, as arrays of shape (B,); NaN where undefined. Ties are ranked as SciPy and scikit-learn do
    (average ranks), so the values match theirs.
    """
    from scipy.stats import rankdata

    t = np.asarray(t, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    n = t.shape[1]
    err = p - t
    tc = t - t.mean(axis=1, keepdims=True)
    ss_tot = np.einsum("ij,ij->i", tc, tc)
    rank_p = rankdata(p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a constant row has zero spread by arithmetic, but the mean's rounding can leave ~1e-28
        valid_t = np.ptp(t, axis=1) > 0
        out = {
            "r2": np.where(valid_t, 1.0 - np.einsum("ij,ij->i", err, err) / ss_tot, np.nan),
            "pearson": _rowwise_pearson(t, p),
            "spearman": _rowwise_pearson(rankdata(t, axis=1), rank_p),
            "mae": np.abs(err).mean(axis=1),
            "rmse": np.sqrt((err**2).mean(axis=1)),
        }
        for c in cutoffs:
            high = t >= c
            n_pos = high.sum(axis=1)
            n_neg = n - n_pos
            # Mann-Whitney U from the average ranks of the positives = ROC AUC with ties as 1/2
            u = np.where(high, rank_p, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
            out[auc_key(c)] = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return out


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    num = np.einsum("ij,ij->i", ac, bc)
    den = np.sqrt(np.einsum("ij,ij->i", ac, ac) * np.einsum("ij,ij->i", bc, bc))
    constant = (np.ptp(a, axis=1) == 0) | (np.ptp(b, axis=1) == 0)
    return np.where(constant, np.nan, np.clip(num / den, -1.0, 1.0))


def fold_summary(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "sd", "n_folds"}}`` over the folds' metric dicts, ignoring NaN folds.

    SD uses ddof=1 (the sample SD papers report as mean ± SD); it is NaN with fewer than two
    finite folds, and the mean is NaN when no fold has the metric. Non-numeric values are skipped.
    """
    names: list[str] = []
    for fold in per_fold:
        names += [k for k, v in fold.items() if k not in names and _is_number(v)]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([float(f.get(name, math.nan)) for f in per_fold], dtype=np.float64)
        values = values[np.isfinite(values)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[name] = {
                "mean": float(values.mean()) if values.size else math.nan,
                "sd": float(values.std(ddof=1)) if values.size > 1 else math.nan,
                "n_folds": int(values.size),
            }
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
