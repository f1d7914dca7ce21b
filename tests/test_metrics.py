"""metrics.py: agreement with scikit-learn/SciPy, NaN when undefined, bootstrap, fold summary."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import r2_score, roc_auc_score

from weakstil.mil.metrics import (
    batch_metrics,
    bootstrap_intervals,
    fold_summary,
    metric_names,
    paired_difference,
    regression_metrics,
)


def noisy(n: int = 50, *, seed: int = 0, sd: float = 12.0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 90, n)
    return t, np.clip(t + rng.normal(0, sd, n), 0, 100)


def test_keys_and_types():
    m = regression_metrics(*noisy(), cutoffs=(10, 30, 50, 12.5))
    assert list(m) == ["r2", "pearson", "spearman", "mae", "rmse", "n",
                       "auc@10", "auc@30", "auc@50", "auc@12.5"]
    assert m["n"] == 50 and isinstance(m["n"], int)
    assert all(isinstance(v, float) for k, v in m.items() if k != "n")


def test_perfect_predictions():
    t = np.array([0, 5, 10, 20, 35, 50, 70, 90.0])
    m = regression_metrics(t, t)
    assert m["r2"] == 1.0 and m["mae"] == 0.0 and m["rmse"] == 0.0
    assert m["pearson"] == pytest.approx(1.0) and m["spearman"] == pytest.approx(1.0)
    assert m["auc@10"] == m["auc@30"] == m["auc@50"] == 1.0


def test_hand_computed_case():
    m = regression_metrics([0, 10, 20, 30], [10, 10, 30, 20], cutoffs=(10,))
    assert m["mae"] == pytest.approx(7.5)
    assert m["rmse"] == pytest.approx(math.sqrt(75))
    assert m["r2"] == pytest.approx(1 - 300 / 500)
    # positives 10, 30, 20 vs the negative 10: one tie (1/2) and two wins -> 2.5 / 3
    assert m["auc@10"] == pytest.approx(2.5 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_sklearn_and_scipy(seed):
    t, p = noisy(40, seed=seed)
    t, p = t.round(-1), p.round(-1)  # ties, as pathologist scores have
    m = regression_metrics(t, p)
    assert m["r2"] == pytest.approx(r2_score(t, p))
    assert m["pearson"] == pytest.approx(stats.pearsonr(t, p).statistic)
    assert m["spearman"] == pytest.approx(stats.spearmanr(t, p).statistic)
    assert m["mae"] == pytest.approx(np.mean(np.abs(t - p)))
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((t - p) ** 2)))
    for c in (10, 30, 50):
        assert m[f"auc@{c}"] == pytest.approx(roc_auc_score(t >= c, p))


def test_one_class_auc_and_constant_inputs_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics([1, 2, 3, 4], [3, 1, 4, 2])
        assert math.isnan(m["auc@10"]) and math.isnan(m["auc@50"])
        assert np.isfinite(m["r2"])
        const = regression_metrics([20, 20, 20], [10, 20, 30])
        assert math.isnan(const["r2"]) and math.isnan(const["pearson"])
        assert math.isnan(regression_metrics([10, 20, 30], [5, 5, 5])["spearman"])
        single = regression_metrics([40], [42])
        assert single["n"] == 1 and single["mae"] == 2.0 and math.isnan(single["r2"])


@pytest.mark.parametrize("t, p", [([1, 2], [1]), ([], []), ([1, np.nan], [1, 2])])
def test_bad_inputs(t, p):
    with pytest.raises(ValueError):
        regression_metrics(t, p)


def test_batch_metrics_match_per_resample_metrics():
    t, p = noisy(30, seed=7)
    t, p = t.round(-1), p.round(-1)
    idx = np.random.default_rng(0).integers(0, 30, size=(25, 30))
    idx[0] = 0  # a constant resample: everything but mae/rmse undefined
    batch = batch_metrics(t[idx], p[idx], cutoffs=(10, 30, 50))
    for i in range(len(idx)):
        single = regression_metrics(t[idx[i]], p[idx[i]])
        for name in metric_names():
            assert batch[name][i] == pytest.approx(single[name], nan_ok=True), (name, i)


def test_bootstrap_contains_point_estimate_and_is_deterministic():
    t, p = noisy(50)
    point = regression_metrics(t, p)
    ci = bootstrap_intervals(t, p, cutoffs=(10, 30, 50), n_boot=500, seed=3)
    assert list(ci) == metric_names()
    for name, (lo, hi) in ci.items():
        assert lo <= point[name] <= hi, name
        assert lo < hi
    assert ci == bootstrap_intervals(t, p, cutoffs=(10, 30, 50), n_boot=500, seed=3)
    assert ci != bootstrap_intervals(t, p, cutoffs=(10, 30, 50), n_boot=500, seed=4)


def test_paired_difference_sees_a_lead_the_separate_intervals_hide():
    """A model 3 points better on every slide: its R² lead is clear in the paired bootstrap although
    the two separate intervals overlap; the same predictions give no lead; swapped, the sign flips."""
    t, p = noisy(40, sd=10.0)
    better = p + 0.3 * (t - p)  # the same errors, 30 % smaller: hard slides stay hard for both
    lead = paired_difference(t, better, p, n_boot=500, seed=1)
    assert lead["r2"] == pytest.approx(r2_score(t, better) - r2_score(t, p))
    assert lead["mae"] == pytest.approx(np.abs(p - t).mean() - np.abs(better - t).mean())
    assert 0 < lead["r2_lo"] <= lead["r2"] <= lead["r2_hi"] and lead["mae_lo"] > 0
    sep_a = bootstrap_intervals(t, better, cutoffs=(), n_boot=500, seed=1)["r2"]
    sep_b = bootstrap_intervals(t, p, cutoffs=(), n_boot=500, seed=1)["r2"]
    assert sep_a[0] < sep_b[1]  # separately, the intervals overlap
    same = paired_difference(t, p, p, n_boot=100)
    assert same["r2"] == same["r2_lo"] == same["r2_hi"] == 0.0
    worse = paired_difference(t, p, better, n_boot=500, seed=1)
    assert worse["r2"] == pytest.approx(-lead["r2"]) and worse["r2_hi"] < 0
    with pytest.raises(ValueError):
        paired_difference(t, p[:-1], p)


def test_bootstrap_level_and_undefined_metrics():
    t, p = noisy(50)
    narrow = bootstrap_intervals(t, p, cutoffs=(30,), n_boot=300, level=0.5)["r2"]
    wide = bootstrap_intervals(t, p, cutoffs=(30,), n_boot=300, level=0.99)["r2"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    ci = bootstrap_intervals(t, p, cutoffs=(95,), n_boot=100)  # no label reaches 95
    assert all(math.isnan(v) for v in ci["auc@95"])
    with pytest.raises(ValueError):
        bootstrap_intervals(t, p, cutoffs=(30,), level=95)


def test_fold_summary_mean_sd_and_nan_folds():
    folds = [
        {"r2": 0.5, "auc@10": 0.9, "n": 10, "name": "fold0"},
        {"r2": 0.3, "auc@10": math.nan, "n": 12},
        {"r2": 0.4, "auc@10": 0.7, "n": 11},
    ]
    s = fold_summary(folds)
    assert set(s) == {"r2", "auc@10", "n"}  # non-numeric values skipped
    assert s["r2"]["mean"] == pytest.approx(0.4)
    assert s["r2"]["sd"] == pytest.approx(np.std([0.5, 0.3, 0.4], ddof=1))
    assert s["r2"]["n_folds"] == 3
    assert s["auc@10"]["mean"] == pytest.approx(0.8)
    assert s["auc@10"]["sd"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    assert s["auc@10"]["n_folds"] == 2


def test_fold_summary_too_few_finite_folds():
    s = fold_summary([{"auc@50": math.nan, "r2": 0.2}, {"auc@50": math.nan}])
    assert math.isnan(s["auc@50"]["mean"]) and math.isnan(s["auc@50"]["sd"])
    assert s["r2"]["mean"] == 0.2 and math.isnan(s["r2"]["sd"]) and s["r2"]["n_folds"] == 1
    assert fold_summary([]) == {}
