"""The linear-probe baseline, post-hoc calibration, the weighted pooling's background penalty, and
their place in metrics.json."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from weakstil.mil.calibration import apply_line, crossfit, fit_line
from weakstil.mil.model import MILRegressor, SlidePrediction, calibrated
from weakstil.mil.module import background_penalty
from weakstil.mil.probe import LinearProbe, probe_oof, probe_report, slide_means

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, FINGERPRINT, make_cohort


def test_probe_recovers_a_linear_signal_out_of_fold():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20))
    y = 40 + 10 * x[:, 0] - 5 * x[:, 3] + rng.normal(0, 1, 60)
    folds = np.arange(60) % 5
    pred, alphas = probe_oof(x, y, folds)
    assert np.corrcoef(pred, y)[0, 1] > 0.95 and len(alphas) == 5
    noise = LinearProbe().fit(x, rng.normal(size=60) * 10 + 50)
    assert noise.alpha >= 10  # pure noise: the inner LOO picks strong shrinkage
    assert np.all((LinearProbe().fit(x, y).predict(x * 50) >= 0) & (LinearProbe().fit(x, y).predict(x * 50) <= 100))


def test_probe_report_has_the_mils_metric_names():
    bags, table = make_cohort(n_slides=20, n_tiles=16)
    ids = list(table.df["slide_id"])
    assert slide_means(bags, ids).shape == (20, 32)
    folds = np.arange(20) % 4
    report = probe_report(bags, ids, table.df["stil"], folds)
    assert {"r2", "pearson", "mae", "auc@10", "auc@30", "auc@50"} <= set(report["pooled"])
    assert report["fold_mean_sd"]["r2"]["n_folds"] == 4 and len(report["predictions"]) == 20


def test_calibration_line_fixes_compression_and_is_cross_fitted():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 80, 50)
    pred = 20 + 0.5 * truth + rng.normal(0, 1, 50)  # compressed toward the mean
    line = fit_line(pred, truth)
    assert line["slope"] == pytest.approx(2.0, abs=0.15)
    fixed = apply_line(pred, line)
    assert np.std(fixed) == pytest.approx(np.std(truth), rel=0.1)
    honest = crossfit(pred, truth, np.arange(50) % 5)
    assert np.abs(honest - truth).mean() < np.abs(pred - truth).mean() / 2
    assert fit_line(pred[:3], truth[:3]) == {"slope": 1.0, "intercept": 0.0, "n": 3}  # too few
    assert fit_line(-pred, truth)["slope"] == 0.5  # kept in range
    good = truth + rng.normal(0, 3, 50)  # calibrated already: left alone
    assert fit_line(good, truth) == {"slope": 1.0, "intercept": 0.0, "n": 50}
    biased = fit_line(good - 10, truth)
    assert biased["slope"] == 1.0 and biased["intercept"] == pytest.approx(10, abs=1.5)
    assert np.array_equal(apply_line(pred, None), pred)


def test_calibrated_prediction_stays_consistent():
    att = np.array([0.5, 0.3, 0.2])
    raw = SlidePrediction(float((att * [10, 20, 40]).sum()), np.array([10.0, 20, 40]), att, att * [10, 20, 40])
    out = calibrated(raw, {"slope": 1.5, "intercept": -2.0})
    np.testing.assert_allclose(out.tile_pred, [13, 28, 58])
    assert out.score == pytest.approx(out.contribution.sum()) and out.score == pytest.approx(-2 + 1.5 * raw.score)
    assert calibrated(raw, None) is raw


def test_background_penalty_only_touches_tiles_the_pooling_ignores():
    pred = torch.tensor([[0.5, 0.5, 0.5]], requires_grad=True)
    att = torch.tensor([[0.8, 0.2, 0.0]])
    mask = torch.tensor([[True, True, False]])
    value = background_penalty(pred, att, mask)
    value.backward()
    assert value.item() == pytest.approx((0 + 0.75 * 0.25) / 2)
    assert pred.grad[0, 0] == 0 and pred.grad[0, 1] > 0 and pred.grad[0, 2] == 0


def test_weighted_pooling_is_a_weighted_mean_of_sigmoid_weights():
    torch.manual_seed(0)
    model = MILRegressor(8, hidden=4, aggregation="weighted").eval()
    x = torch.randn(6, 8)
    score, tile_pred, attention = model(x)
    h = model.embed(x)
    w = torch.sigmoid(model.att_w(torch.tanh(model.att_v(h)) * torch.sigmoid(model.att_u(h)))).squeeze(-1)
    assert torch.allclose(attention[0], w / w.sum(), atol=1e-6)
    assert torch.allclose(score, (attention * tile_pred).sum(-1))


def test_metrics_json_reports_the_probe_and_calibration(tmp_path):
    from weakstil.mil.model import load_model
    from weakstil.mil.train import train_model

    bags, table = make_cohort(n_slides=24, n_tiles=16)
    cfg = replace(FAST, max_epochs=3, patience=3, n_boot=20, calibrate=True, background_penalty=0.1,
                  aggregation="weighted")
    out = train_model(bags, table, cfg, out_dir=tmp_path / "m", fingerprint=FINGERPRINT, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["pooled"]) == set(metrics["linear_probe"]["pooled"])
    assert metrics["linear_probe"]["fold_mean_sd"]["r2"]["n_folds"] == cfg.n_folds
    line = metrics["calibration"]["line"]
    assert 0.5 <= line["slope"] <= 2.0 and "r2" in metrics["calibration"]["pooled"]
    assert metrics["calibration"]["applied"] is True
    # the deployed model's lead over the probe: what the model does (here: calibrated, cross-fitted)
    lead = metrics["linear_probe"]["mil_minus_probe"]
    assert lead["r2"] == pytest.approx(metrics["calibration"]["pooled"]["r2"] - metrics["linear_probe"]["pooled"]["r2"])
    assert lead["mae"] == pytest.approx(metrics["linear_probe"]["pooled"]["mae"] - metrics["calibration"]["pooled"]["mae"])
    assert lead["r2_lo"] <= lead["r2"] <= lead["r2_hi"] and lead["mae_lo"] <= lead["mae"] <= lead["mae_hi"]
    model = load_model(out)
    assert model.config["calibration"] == line
    pred = model.predict(next(iter(bags.values())))
    assert pred.score == pytest.approx(pred.contribution.sum())


def test_calibration_is_reported_but_not_applied_by_default(tmp_path):
    """The default leaves the MIL's predictions as they are (docs/accuracy.md, tenth run) and still
    writes the line it would apply, with its cross-fitted estimate, for the user to judge."""
    from weakstil.mil.fit import TrainConfig
    from weakstil.mil.model import load_model
    from weakstil.mil.train import deployed_pooled, train_model

    assert TrainConfig().calibrate is False
    bags, table = make_cohort(n_slides=24, n_tiles=16)
    cfg = replace(FAST, max_epochs=3, patience=3, n_boot=20, aggregation="weighted")
    assert cfg.calibrate is False
    out = train_model(bags, table, cfg, out_dir=tmp_path / "m", fingerprint=FINGERPRINT, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["applied"] is False and {"slope", "intercept", "n"} <= set(cal["line"]) and "r2" in cal["pooled"]
    assert "deployed" not in metrics and deployed_pooled(metrics) == metrics["pooled"]  # the MIL as it is
    assert load_model(out).config["calibration"] is None
