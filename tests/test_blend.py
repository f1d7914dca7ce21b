"""The MIL–probe blend: the weight is chosen out of fold, the deployed model applies it consistently."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from weakstil.mil.blend import blended, choose_weight, crossfit, fit_probe, probe_score
from weakstil.mil.model import SlidePrediction
from weakstil.mil.probe import LinearProbe, slide_means

sys.path.insert(0, str(Path(__file__).parent))
from test_train import FAST, FINGERPRINT, make_cohort


def test_weight_follows_the_better_predictor_and_ties_go_to_the_mil():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 80, 40)
    noise = rng.normal(0, 20, 40)
    assert choose_weight(y, y + noise, y) == 1.0
    assert choose_weight(y + noise, y, y) == 0.0
    assert choose_weight(y, y, y) == 1.0  # a tie: the MIL
    # independent errors of equal size: the blend beats both
    assert 0.3 <= choose_weight(y + noise, y + rng.normal(0, 20, 40), y) <= 0.7


def test_crossfit_chooses_each_folds_weight_without_its_labels():
    rng = np.random.default_rng(1)
    y = rng.uniform(0, 80, 50)
    mil, probe = y + rng.normal(0, 5, 50), y + rng.normal(0, 15, 50)
    folds = np.arange(50) % 5
    out, weights = crossfit(mil, probe, y, folds)
    changed = y.copy()
    changed[folds == 0] = 100 - changed[folds == 0]  # fold 0's own labels
    _, again = crossfit(mil, probe, changed, folds)
    assert again[0] == weights[0] and len(weights) == 5
    w = weights[2]
    np.testing.assert_allclose(out[folds == 2], w * mil[folds == 2] + (1 - w) * probe[folds == 2])


def test_folded_probe_equals_the_probe_on_slide_means():
    bags, table = make_cohort(n_slides=20, n_tiles=16)
    ids, y = list(table.df["slide_id"]), table.df["stil"].to_numpy()
    head = fit_probe(bags, ids, y)
    reference = LinearProbe().fit(slide_means(bags, ids), y).predict(slide_means(bags, ids))
    mine = np.array([probe_score(bags[s], head) for s in ids])
    np.testing.assert_allclose(mine, reference, atol=1e-3)
    assert head["coef"].shape == (bags[ids[0]].shape[1],) and head["alpha"] > 0


def test_blended_prediction_moves_every_tile_and_keeps_the_sums():
    att = np.array([0.5, 0.3, 0.2])
    tiles = np.array([10.0, 20, 40])
    raw = SlidePrediction(float((att * tiles).sum()), tiles, att, att * tiles)  # score 19
    out = blended(raw, 39.0, 0.5)
    assert out.score == pytest.approx(29.0) and out.score == pytest.approx(out.contribution.sum())
    np.testing.assert_allclose(out.tile_pred, tiles + 10)
    assert blended(raw, 39.0, 1.0) is raw


def test_trained_model_deploys_the_blend(tmp_path):
    from weakstil.mil.model import load_model
    from weakstil.mil.train import train_model

    bags, table = make_cohort(n_slides=24, n_tiles=16)
    cfg = replace(FAST, max_epochs=1, patience=1, n_boot=20, calibrate=False, aggregation="weighted", blend=True,
                  head="linear")  # tiles inside 0-100 after the shift: no clipping in this check
    out = train_model(bags, table, cfg, out_dir=tmp_path / "m", fingerprint=FINGERPRINT, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    blend = metrics["blend"]
    assert 0.0 <= blend["weight"] <= 1.0 and len(blend["fold_weights"]) == cfg.n_folds
    assert set(blend["pooled"]) == set(metrics["pooled"])
    from weakstil.mil.train import deployed_pooled

    assert metrics["deployed"]["pooled"] == blend["pooled"] == deployed_pooled(metrics)  # no calibration here
    state = torch.load(out / "model.ckpt", weights_only=True)
    assert state["format_version"] == 2 and state["probe"]["coef"].shape == (32,)
    model = load_model(out)
    w = model.config["blend"]["weight"]
    x = next(iter(bags.values()))
    mil_only = load_model(out)
    mil_only.probe = None
    expected = w * mil_only.predict(x).score + (1 - w) * probe_score(x, model.probe)
    pred = model.predict(x)
    assert pred.score == pytest.approx(expected, abs=1e-3)
    assert pred.score == pytest.approx(pred.contribution.sum())

    plain = train_model(bags, table, replace(cfg, blend=False), out_dir=tmp_path / "p", fingerprint=FINGERPRINT,
                        progress=False)
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert "blend" not in plain_metrics and "deployed" not in plain_metrics
    assert deployed_pooled(plain_metrics) == plain_metrics["pooled"]
    assert torch.load(plain / "model.ckpt", weights_only=True)["format_version"] == 1
    assert load_model(plain).probe is None


def test_a_newer_checkpoint_is_refused_with_a_clear_message(tmp_path):
    from weakstil.errors import ModelNotFoundError
    from weakstil.mil.model import CHECKPOINT_VERSION, load_model

    bags, table = make_cohort(n_slides=12, n_tiles=8)
    from weakstil.mil.train import train_model

    cfg = replace(FAST, max_epochs=1, patience=1, n_boot=10, n_folds=2)
    out = train_model(bags, table, cfg, out_dir=tmp_path / "m", fingerprint=FINGERPRINT, progress=False)
    state = torch.load(out / "model.ckpt", weights_only=True)
    state["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(state, out / "model.ckpt")
    (out / "model.sha256").unlink()
    with pytest.raises(ModelNotFoundError, match="newer than this weakstil"):
        load_model(out)
