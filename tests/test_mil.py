"""The MIL regressor and the deployed-model container (no training loop here; see test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakstil.errors import (
    ConfigError,
    EmptyBagError,
    ModelMismatchError,
    ModelNotFoundError,
    WeakstilError,
)
from weakstil.mil.model import MILRegressor, TrainedModel, check_fingerprint, load_model

DIM = 16
FINGERPRINT = {
    "encoder": {"name": "resnet18-random", "weights": "file:/a/w.pth", "weights_sha256": "ab" * 32,
                "embed_dim": DIM, "input_px": 224, "mean": [0.485, 0.456, 0.406]},
    "tiling": {"tile_px": 224, "mpp": 0.5, "overlap": 0},
}


def _module(aggregation: str, seed: int = 0) -> MILRegressor:
    torch.manual_seed(seed)
    module = MILRegressor(DIM, hidden=8, aggregation=aggregation)
    with torch.no_grad():  # spread the attention logits so that attention is far from uniform
        for p in module.parameters():
            p.mul_(3.0)
    return module.eval()


@pytest.fixture(params=["mean", "attention", "weighted"])
def aggregation(request) -> str:
    return request.param


def test_forward_shapes_ranges_and_pooling(aggregation):
    module = _module(aggregation)
    score, tile_pred, attention = module(torch.randn(7, DIM))
    assert score.shape == (1,) and tile_pred.shape == (1, 7) and attention.shape == (1, 7)
    assert torch.all((tile_pred > 0) & (tile_pred < 1))
    assert torch.allclose(attention.sum(-1), torch.ones(1))
    assert torch.allclose(score, (attention * tile_pred).sum(-1))
    if aggregation == "mean":
        assert torch.allclose(attention, torch.full((1, 7), 1 / 7))
        assert torch.allclose(score, tile_pred.mean(-1))
    else:
        assert attention.std() > 1e-3


def test_padded_batch_equals_single_bags(aggregation):
    module = _module(aggregation)
    bags = [torch.randn(n, DIM) for n in (3, 9, 5)]
    features = torch.zeros(3, 9, DIM)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    score, _, attention = module(features, mask)
    assert torch.all(attention[~mask] == 0)
    for i, bag in enumerate(bags):
        single, _, _ = module(bag)
        assert torch.allclose(score[i], single[0], atol=1e-6)


def test_predict_bag_chunks_agree(aggregation):
    module = _module(aggregation)
    x = torch.randn(50, DIM)
    whole = module.predict_bag(x)
    chunked = module.predict_bag(x, chunk=7)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_unknown_aggregation_refused():
    with pytest.raises(ValueError, match="aggregation"):
        MILRegressor(DIM, aggregation="max")


def test_ensemble_prediction_is_consistent(aggregation):
    members = [_module(aggregation, seed=s) for s in range(3)]
    model = TrainedModel(members, fingerprint=FINGERPRINT)
    x = np.random.default_rng(0).normal(size=(40, DIM)).astype(np.float16)
    pred = model.predict(x)
    assert pred.tile_pred.shape == pred.attention.shape == pred.contribution.shape == (40,)
    assert np.isclose(pred.attention.sum(), 1.0)
    assert np.isclose(pred.contribution.sum(), pred.score)
    assert np.allclose(pred.contribution, pred.attention * pred.tile_pred)
    assert np.all((pred.tile_pred >= 0) & (pred.tile_pred <= 100))
    member_scores = [TrainedModel([m], fingerprint={}).predict(x).score for m in members]
    assert np.isclose(pred.score, np.mean(member_scores))
    if aggregation == "mean":
        assert np.allclose(pred.attention, 1 / 40)


def test_predict_refuses_bad_features():
    model = TrainedModel([_module("mean")], fingerprint=FINGERPRINT)
    with pytest.raises(ModelMismatchError, match=f"\\(N, {DIM}\\)"):
        model.predict(np.zeros((5, DIM + 1), np.float32))
    with pytest.raises(EmptyBagError):
        model.predict(np.zeros((0, DIM), np.float32))


def test_save_load_reproduces_predictions_exactly(tmp_path, aggregation):
    model = TrainedModel([_module(aggregation, s) for s in range(2)], fingerprint=FINGERPRINT,
                         config={"train": {"cutoffs": (10, 30)}})
    model.save(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path)
    x = np.random.default_rng(1).normal(size=(33, DIM)).astype(np.float32)
    a, b = model.predict(x), loaded.predict(x)
    assert a.score == b.score
    for field in ("tile_pred", "attention", "contribution"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert loaded.fingerprint == FINGERPRINT and loaded.aggregation == aggregation
    assert loaded.config["train"]["cutoffs"] == [10, 30]


def test_missing_or_corrupt_model_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="missing"):
        load_model(tmp_path / "nope")
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="cannot be read") as info:
        load_model(tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WeakstilError)
    torch.save({"format": "something-else"}, tmp_path / "model.ckpt")
    with pytest.raises(ModelNotFoundError, match="not a weakstil"):
        load_model(tmp_path)


def test_fingerprint_match_and_mismatch():
    model = TrainedModel([_module("mean")], fingerprint=FINGERPRINT)
    same = {"encoder": dict(FINGERPRINT["encoder"], mean=(0.485, 0.456, 0.406)),
            "tiling": dict(FINGERPRINT["tiling"])}
    check_fingerprint(model, same)  # tuples vs lists do not matter
    moved = {"encoder": dict(FINGERPRINT["encoder"], weights="file:/elsewhere/w.pth"),
             "tiling": FINGERPRINT["tiling"]}
    check_fingerprint(model, moved)  # same weights (sha256) from another path is fine

    class Cache:  # a FeatureCache is accepted as well as a dict
        encoder_fp = FINGERPRINT["encoder"]
        tiling_fp = dict(FINGERPRINT["tiling"], mpp=1.0)

    with pytest.raises(ModelMismatchError, match=r"tiling\.mpp: model 0\.5, features 1\b"):
        check_fingerprint(model, Cache())
    other = {"encoder": dict(FINGERPRINT["encoder"], weights_sha256="cd" * 32, name="uni"),
             "tiling": FINGERPRINT["tiling"]}
    with pytest.raises(ModelMismatchError) as info:
        check_fingerprint(model, other)
    text = info.value.problem
    assert "encoder.name" in text and "encoder.weights_sha256" in text and "tiling." not in text


def test_a_model_of_an_older_morphometry_is_told_to_retrain_not_to_change_encoder():
    """After a MORPH_ARCH bump the encoder a model names computes the new features: the advice
    "score with the encoder the model was trained on" cannot be followed, retraining can."""
    from weakstil.embed.encoders import MORPH_ARCH

    enc = {"name": "resnet18-random+stainmorph", "arch": "resnet18+stainmorph.v5"}
    model = {"encoder": enc, "tiling": {"mpp": 0.5}}
    now = {"encoder": dict(enc, arch="resnet18+" + MORPH_ARCH), "tiling": {"mpp": 0.5}}
    with pytest.raises(ModelMismatchError) as info:
        check_fingerprint(model, now)
    assert "stainmorph.v5" in info.value.fix and "retrain" in info.value.fix and MORPH_ARCH in info.value.fix
    other_net = {"encoder": dict(enc, arch="vit_small+" + MORPH_ARCH), "tiling": {"mpp": 0.5}}
    with pytest.raises(ModelMismatchError) as info:
        check_fingerprint(model, other_net)
    assert "retrain" not in info.value.fix  # another network: score with the one the model names


# --- the probe head (head="probe", issue #14): the MIL starts as the linear probe -------------------
def _probe_cohort(n: int = 24, seed: int = 0, tile_sd: float = 0.3, slide_sd: float = 0.05):
    rng = np.random.default_rng(seed)
    bags = []
    for _ in range(n):
        y = rng.uniform(5, 70)
        x = rng.normal(scale=tile_sd, size=(int(rng.integers(20, 50)), DIM)).astype(np.float32)
        x[:, 0] += y / 25
        x += rng.normal(scale=slide_sd, size=DIM).astype(np.float32)  # what varies between slides
        bags.append((x, y))
    return bags


def test_probe_head_starts_as_the_linear_probe():
    from weakstil.mil.fit import TrainConfig
    from weakstil.mil.start import initialise
    from weakstil.mil.probe import LinearProbe

    bags = _probe_cohort(tile_sd=0.3, slide_sd=0.3)  # tiles differ: the mean of sigmoids is not the sigmoid of the mean
    module = MILRegressor(DIM, **TrainConfig(head="probe").model_kwargs())
    initialise(module, bags[:16], None)
    probe = LinearProbe().fit(np.stack([x.mean(0) for x, _ in bags[:16]]), np.array([y for _, y in bags[:16]]))
    ours, theirs = [], []
    for x, _ in bags:
        score, tile_pred, attention = module.predict_bag(torch.as_tensor(x))
        assert torch.allclose(attention, torch.full_like(attention, 1 / len(x)))  # equal weights at the start
        assert torch.all((tile_pred >= 0) & (tile_pred <= 1))
        ours.append(100 * float(score))
        theirs.append(float(probe.model.predict(x.mean(0, keepdims=True).astype(np.float64))[0]))
    ours, theirs = np.array(ours), np.array(theirs)
    labels = np.array([y for _, y in bags])
    from sklearn.metrics import r2_score

    # the probe's line refitted through the sigmoid on the training bags: the probe's order, and as
    # good a fit of the training labels
    assert np.corrcoef(ours, theirs)[0, 1] > 0.97
    assert r2_score(labels[:16], ours[:16]) >= r2_score(labels[:16], theirs[:16]) - 0.02


def test_probe_head_keeps_the_probe_when_training_does_not_beat_it(tmp_path):
    from weakstil.mil.fit import TrainConfig, fit_one

    bags = _probe_cohort()
    cfg = TrainConfig(head="probe", lr=0.0, max_epochs=3, patience=1, bags_per_step=4)  # lr 0: no epoch is better
    model, history = fit_one(bags[:16], bags[16:20], cfg)
    assert history.best_epoch == -1 and history.best_val_r2 > 0.5  # the starting point won
    start, _ = fit_one(bags[:16], None, cfg, max_epochs=0)  # zero epochs: the starting point itself
    x = torch.as_tensor(bags[21][0])
    assert torch.allclose(model.predict_bag(x)[0], start.predict_bag(x)[0])
    saved = TrainedModel([model], fingerprint=FINGERPRINT)  # the standardisation travels with the weights
    saved.save(tmp_path / "model.ckpt")
    assert load_model(tmp_path).predict(bags[21][0]).score == saved.predict(bags[21][0]).score


def _stroma_cohort(n=24, seed=0):
    """Bags whose label is the stroma-weighted mean of a tile signal (sTIL% is defined on stroma):
    the last feature is the stroma estimate; tiles without stroma (nests) carry a strong signal of
    their own (intratumoral lymphocytes) that does not count, and their share varies per slide."""
    rng = np.random.default_rng(seed)
    bags = []
    for _ in range(n):
        m = int(rng.integers(30, 60))
        s = (rng.random(m) < rng.uniform(0.2, 0.9)).astype(np.float32)  # stroma (1) or nest (0)
        til = rng.uniform(0, 1, m).astype(np.float32)
        x = rng.normal(scale=0.1, size=(m, DIM)).astype(np.float32)
        x[:, 0] += 3 * til
        x[:, -1] = s
        y = 100 * float((til * s).sum() / max(s.sum(), 1))
        bags.append((x, y))
    return bags


@pytest.mark.parametrize("aggregation", ["mean", "weighted", "attention"])
def test_stroma_prior_weights_tiles_by_their_estimated_stroma(aggregation):
    from weakstil.mil.model import STROMA_FLOOR

    module = MILRegressor(DIM, aggregation=aggregation, head="probe", stroma_prior=True)
    if aggregation in ("weighted", "attention"):
        with torch.no_grad():  # a learned part that is the same for every tile
            module.att_w.weight.zero_()
    x = torch.randn(6, DIM)
    x[:, -1] = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 2.0])  # 2.0: clipped to 1
    score, tile_pred, attention = module.predict_bag(x)
    w = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 1.0]) + STROMA_FLOOR
    assert torch.allclose(attention, w / w.sum(), atol=1e-6)
    assert torch.allclose(score, (attention * tile_pred).sum(), atol=1e-6)
    assert module.config["stroma_prior"] is True
    plain = MILRegressor(DIM, aggregation="mean", head="probe")
    assert torch.allclose(plain.predict_bag(x)[2], torch.full((6,), 1 / 6))


def test_the_stroma_floor_is_the_models_own_and_older_models_keep_theirs(tmp_path):
    """The floor is in the model's config; a checkpoint saved before the key scores with the 0.1 it
    was trained with, not with today's default."""
    from weakstil.mil import STROMA_FLOOR
    from weakstil.mil.fit import TrainConfig
    from weakstil.mil.model import LEGACY_STROMA_FLOOR, write_checksum

    assert STROMA_FLOOR != LEGACY_STROMA_FLOOR
    x = torch.randn(5, DIM)
    x[:, -1] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5])
    for floor in (STROMA_FLOOR, 0.3):
        module = MILRegressor(DIM, **TrainConfig(aggregation="mean", stroma_floor=floor, stroma_prior=True).model_kwargs())
        w = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5]) + floor
        assert module.config["stroma_floor"] == floor
        assert torch.allclose(module.predict_bag(x)[2], w / w.sum(), atol=1e-6)
    with pytest.raises(ConfigError, match="stroma_floor"):
        TrainConfig(stroma_floor=0.0)

    torch.manual_seed(0)
    old = MILRegressor(DIM, aggregation="weighted", head="probe", stroma_prior=True, stroma_floor=LEGACY_STROMA_FLOOR)
    model = TrainedModel([old], fingerprint=FINGERPRINT)
    model.save(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)  # as a weakstil before the key wrote it
    del state["model_config"]["stroma_floor"]
    torch.save(state, tmp_path / "model.ckpt")
    write_checksum(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path)
    assert loaded.model_config["stroma_floor"] == LEGACY_STROMA_FLOOR
    bag = x.numpy()
    assert loaded.predict(bag).score == pytest.approx(model.predict(bag).score, abs=1e-9)
    today = MILRegressor(DIM, aggregation="weighted", head="probe", stroma_prior=True)
    today.load_state_dict(old.state_dict())
    assert abs(TrainedModel([today], fingerprint=FINGERPRINT).predict(bag).score - model.predict(bag).score) > 1e-3


def test_stroma_prior_start_fits_a_stroma_defined_label_better():
    from sklearn.metrics import r2_score

    from weakstil.mil.fit import TrainConfig
    from weakstil.mil.start import initialise

    bags = _stroma_cohort()
    labels = np.array([y for _, y in bags])
    fits = {}
    for prior in (False, True):
        module = MILRegressor(DIM, **TrainConfig(head="probe", aggregation="mean", stroma_prior=prior).model_kwargs())
        initialise(module, bags, None)
        pred = [100 * float(module.predict_bag(torch.as_tensor(x))[0]) for x, _ in bags]
        fits[prior] = r2_score(labels, pred)
    assert fits[True] > 0.9 and fits[True] > fits[False] + 0.1, fits


def test_stroma_prior_follows_the_cache_encoder():
    from weakstil.embed.encoders import DEFAULT_ENCODER, get_encoder_spec
    from weakstil.mil.fit import TrainConfig
    from weakstil.mil.train import resolve_stroma_prior

    with_estimate = {"encoder": {"arch": get_encoder_spec(DEFAULT_ENCODER).arch}}
    without = {"encoder": {"arch": get_encoder_spec("resnet18-random").arch}}
    assert resolve_stroma_prior(TrainConfig(), with_estimate).stroma_prior is True
    assert resolve_stroma_prior(TrainConfig(), without).stroma_prior is False
    assert resolve_stroma_prior(TrainConfig(stroma_prior=False), with_estimate).stroma_prior is False
    with pytest.raises(ConfigError, match="stroma estimate"):
        resolve_stroma_prior(TrainConfig(stroma_prior=True), without)
