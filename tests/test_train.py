"""Cross-validation, the model directory and checkpoints, on synthetic bags with a known answer.

Each synthetic tile has a latent sTIL fraction and a stroma flag; its features are a random
projection of both plus noise. A slide's label is the mean sTIL fraction of its stroma tiles (the
non-stroma tiles carry random fractions that attention can learn to ignore), times 100.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from weakstil.errors import ConfigError, EmptyBagError, LabelsError, ModelExistsError
from weakstil.mil.cv import combine, cross_validate
from weakstil.mil.fit import (
    BagBatchSampler,
    BagDataset,
    TrainConfig,
    fit_one,
    load_bags,
)
from weakstil.mil.labels import LabelTable
from weakstil.mil.model import TrainedModel, check_fingerprint, load_model
from weakstil.mil.train import train_model

DIM = 32
FINGERPRINT = {"encoder": {"name": "toy", "weights_sha256": "0" * 64, "embed_dim": DIM},
               "tiling": {"tile_px": 224, "mpp": 0.5, "overlap": 0}}
FAST = TrainConfig(hidden=32, dropout=0.1, lr=3e-3, max_epochs=25, patience=6, n_folds=3, seeds=1,
                   n_boot=200, cutoffs=(10, 30, 50), aggregation="attention")


def make_cohort(n_slides=36, n_tiles=48, *, dim=DIM, noise=0.5, seed=0, n_centers=3):
    """Bags dict and LabelTable: two slides per patient, patients spread over centers."""
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(3, dim))
    bags, rows = {}, []
    for s in range(n_slides):
        level = rng.beta(1.2, 2.0)
        n = int(rng.integers(n_tiles // 2, n_tiles * 3 // 2))
        stroma = rng.random(n) < rng.uniform(0.3, 0.7)
        stroma[0] = True
        frac = np.where(stroma, np.clip(level + rng.normal(0, 0.05, n), 0, 1), rng.random(n))
        latent = np.stack([frac, stroma.astype(float), rng.normal(size=n)], axis=1)
        slide_id, patient = f"S{s:03d}", s // 2
        bags[slide_id] = (latent @ proj + noise * rng.normal(size=(n, dim))).astype(np.float32)
        rows.append((slide_id, f"P{patient:03d}", 100 * frac[stroma].mean(),
                     f"C{patient % n_centers}"))
    df = pd.DataFrame(rows, columns=["slide_id", "patient_id", "stil", "center"])
    return bags, LabelTable(df=df)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort()


@pytest.fixture(scope="module")
def cv_true(cohort):
    return cross_validate(*cohort, FAST, progress=False)


def test_cv_learns_true_labels(cv_true, cohort):
    _, table = cohort
    assert cv_true.pooled["r2"] > 0.5
    assert np.all(np.isfinite(cv_true.predictions))
    assert np.all((cv_true.predictions >= 0) & (cv_true.predictions <= 100))
    assert np.array_equal(cv_true.labels, table.stil)
    assert len(cv_true.models) == len(cv_true.fold_metrics) == FAST.n_folds
    lo, hi = cv_true.pooled_ci["r2"]
    assert lo <= cv_true.pooled["r2"] <= hi


def test_each_fold_averages_its_seeds_models(cohort):
    bags, table = cohort
    cfg = replace(FAST, seeds=2, max_epochs=6)
    cv = cross_validate(bags, table, cfg, progress=False)
    assert len(cv.models) == 2 * cfg.n_folds and cv.member_folds.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(cv.fold_metrics) == len(cv.fold_info) == cfg.n_folds and cv.fold_info[0]["models"] == 2
    for k in range(cfg.n_folds):
        test = np.flatnonzero(cv.folds == k)
        members = cv.fold_models(k)
        scores = [[TrainedModel([m], fingerprint={}).predict(bags[cv.slide_ids[i]]).score for i in test]
                  for m in members]
        assert not np.allclose(scores[0], scores[1])  # other seeds: other models
        np.testing.assert_allclose(cv.predictions[test], np.mean(scores, axis=0), atol=1e-4)
        ensemble = TrainedModel(members, fingerprint={})  # what is deployed scores the same way
        np.testing.assert_allclose([ensemble.predict(bags[cv.slide_ids[i]]).score for i in test],
                                   cv.predictions[test], atol=1e-4)
    # seed by seed on the same folds, then combined: the same cross-validation
    runs = [cross_validate(bags, table, cfg, progress=False, folds=cv.folds, seeds=[j]) for j in (0, 1)]
    assert len(runs[0].models) == cfg.n_folds
    joined = combine(runs, cfg)
    np.testing.assert_allclose(joined.predictions, cv.predictions, atol=1e-6)
    assert joined.member_folds.tolist() == cv.member_folds.tolist()
    with pytest.raises(ValueError, match="same folds"):
        combine([runs[0], cross_validate(bags, table, replace(cfg, seed=5), progress=False, seeds=[0])], cfg)
    with pytest.raises(ConfigError, match="seeds"):
        TrainConfig(seeds=0)


def test_folds_never_share_a_patient(cv_true):
    fold_of: dict[str, set] = {}
    for patient, fold in zip(cv_true.patient_ids, cv_true.folds):
        fold_of.setdefault(patient, set()).add(int(fold))
    assert all(len(folds) == 1 for folds in fold_of.values())
    assert sorted(set(cv_true.folds.tolist())) == list(range(FAST.n_folds))


def test_shuffled_labels_learn_nothing(cohort):
    bags, table = cohort
    df = table.df.copy()
    df["stil"] = np.random.default_rng(1).permutation(df["stil"].to_numpy())
    cv = cross_validate(bags, LabelTable(df=df), FAST, progress=False)
    assert cv.pooled["r2"] < 0.2


def test_folds_by_center_keep_centers_apart(cohort):
    bags, table = cohort
    cfg = replace(FAST, folds_by="center", aggregation="mean", max_epochs=2)
    cv = cross_validate(bags, table, cfg, progress=False)
    centers = table.df["center"].to_numpy()
    for fold in range(cfg.n_folds):
        assert set(centers[cv.folds == fold]).isdisjoint(centers[cv.folds != fold])


def test_same_seed_same_predictions(cohort):
    bags, table = cohort
    ids, y = table.slide_ids, table.stil
    train = [(bags[s], v) for s, v in zip(ids[:20], y[:20])]
    val = [(bags[s], v) for s, v in zip(ids[20:28], y[20:28])]
    cfg = replace(FAST, max_epochs=4, max_tiles=20)  # also exercises the random tile subsets
    runs = [TrainedModel([fit_one(train, val, cfg)[0]], fingerprint={}) for _ in range(2)]
    for s in ids[28:]:
        assert runs[0].predict(bags[s]).score == runs[1].predict(bags[s]).score


def test_tile_subsets_are_seeded_and_bounded():
    bags = [(np.arange(100, dtype=np.float32).reshape(50, 2), 10.0)]
    data = BagDataset(bags, max_tiles=8, seed=3)
    x0, label = data[(0, 0)]
    assert x0.shape == (8, 2) and label == pytest.approx(0.1)
    assert np.array_equal(x0, data[(0, 0)][0])  # same draw, same tiles
    assert not np.array_equal(x0, data[(0, 1)][0])  # next epoch, other tiles
    assert data[(0, None)][0].shape == (50, 2)  # evaluation: the full bag
    sampler = BagBatchSampler([50, 5, 40, 70], 2, train=False, tile_budget=100)
    batches = list(sampler)
    assert sorted(i for b in batches for i, _ in b) == [0, 1, 2, 3]
    sizes = [50, 5, 40, 70]
    assert all(len(b) == 1 or len(b) * max(sizes[i] for i, _ in b) <= 100 for b in batches)


def test_train_model_writes_the_model_dir(tmp_path, cohort):
    bags, table = cohort
    cfg = replace(FAST, aggregation="mean", max_epochs=8, n_folds=3)
    out = train_model(bags, table, cfg, out_dir=tmp_path / "models" / "toy",
                      fingerprint=FINGERPRINT, progress=False, run_info={"labels": "labels.csv"})
    assert out == tmp_path / "models" / "toy"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"model.ckpt", "config.yaml", "metrics.json", "cv_predictions.csv", "plots",
            "plots/scatter.png", "plots/roc.png", "plots/calibration.png"} <= names
    assert [p.name for p in out.parent.iterdir()] == ["toy"]  # no temp dirs left behind

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_slides"] == len(table) and metrics["n_tiles"] == sum(map(len, bags.values()))
    expected = {"r2", "pearson", "spearman", "mae", "auc@10", "auc@30", "auc@50"}
    assert expected <= set(metrics["pooled"])
    assert len(metrics["pooled_ci95"]["r2"]) == 2 and len(metrics["folds"]) == 3
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["aggregation"] == "mean" and config["fingerprint"] == FINGERPRINT
    assert config["run"] == {"labels": "labels.csv"} and config["n_members"] == 3

    preds = pd.read_csv(out / "cv_predictions.csv")
    assert list(preds.columns) == ["slide_id", "patient_id", "fold", "label", "prediction"]
    model = load_model(out)
    check_fingerprint(model, FINGERPRINT)
    assert len(model.members) == 3 and model.aggregation == "mean"
    for row in preds.itertuples():  # each saved fold model reproduces its out-of-fold score
        member = TrainedModel([model.members[row.fold]], fingerprint={})
        assert member.predict(bags[row.slide_id]).score == pytest.approx(row.prediction, abs=1e-4)
    pred = model.predict(bags["S000"])
    assert np.isclose(pred.contribution.sum(), pred.score) and np.isclose(pred.attention.sum(), 1)

    with pytest.raises(ModelExistsError):
        train_model(bags, table, cfg, out_dir=out, fingerprint=FINGERPRINT, progress=False)


def test_deploy_final_refits_one_model_per_seed(tmp_path, cohort):
    bags, table = cohort
    cfg = replace(FAST, deploy="final", n_folds=2, max_epochs=3)
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train_model(bags, table, cfg, out_dir=out, fingerprint=FINGERPRINT, progress=False,
                overwrite=True)
    assert not (out / "stale.txt").exists()
    model = load_model(out)
    assert len(model.members) == 1 and model.config["deploy"] == "final"
    train_model(bags, table, replace(cfg, seeds=2), out_dir=out, fingerprint=FINGERPRINT, progress=False,
                overwrite=True)
    model = load_model(out)
    assert len(model.members) == 2 and model.config["n_members"] == 2
    x = torch.as_tensor(bags[table.slide_ids[0]])
    assert not torch.allclose(model.members[0].predict_bag(x)[1], model.members[1].predict_bag(x)[1])


def test_missing_features_and_bad_config_are_clear(cohort):
    bags, table = cohort
    partial = {k: v for k, v in bags.items() if k != "S005"}
    with pytest.raises(LabelsError, match="S005"):
        cross_validate(partial, table, FAST, progress=False)
    with pytest.raises(ConfigError, match="aggregation"):
        TrainConfig(aggregation="max")


def test_load_bags_from_a_feature_cache(tmp_path, cohort):
    from weakstil.embed.cache import FeatureCache

    bags, _ = cohort
    cache = FeatureCache.open(tmp_path / "features", FINGERPRINT["encoder"], FINGERPRINT["tiling"])
    for slide_id in ("S000", "S001"):
        coords = np.zeros((len(bags[slide_id]), 2), np.int32)
        with cache.slide_writer(slide_id, coords, DIM, {"slide_mpp": 0.25}) as writer:
            writer.write(0, bags[slide_id])
    loaded = load_bags(cache, ["S000", "S001"])
    assert loaded["S000"].dtype == np.float32 and loaded["S000"].shape == bags["S000"].shape
    assert np.allclose(loaded["S001"], bags["S001"], atol=1e-2)  # float16 in the cache
    model = TrainedModel([fit_one([(loaded["S000"], 10.0)], None, replace(FAST, max_epochs=1))[0]],
                         fingerprint=FINGERPRINT)
    check_fingerprint(model, cache)  # the cache's own fingerprints match what was trained on


def test_load_bags_refuses_empty_bags():
    class Cache:
        def read(self, slide_id):
            return type("Features", (), {"features": np.ones((0, 4), np.float16)})()

    with pytest.raises(EmptyBagError, match="empty"):
        load_bags(Cache(), ["empty"])
