"""The MIL's input columns: a model that reads only the last columns, and the out-of-fold choice
between all columns and the morphometry's measurements of sTIL% (weakstil.mil.select)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from weakstil.embed.encoders import DARK_MEASURED_DIM, DEFAULT_ENCODER, MEASURED_DIM, get_encoder_spec
from weakstil.errors import ConfigError
from weakstil.mil.fit import TrainConfig, column_inputs, columns_of
from weakstil.mil.model import MILRegressor, TrainedModel, load_model
from weakstil.mil.select import (
    CANDIDATES,
    WIDE,
    candidates,
    choose,
    cross_validate_columns,
    crossfit,
    parent_columns,
    plausible,
)

NET = 48  # columns before the measurements in these toy bags (the last MEASURED_DIM of them: the wide block)
DIM = NET + MEASURED_DIM
WITH_MORPH = {"encoder": {"arch": get_encoder_spec(DEFAULT_ENCODER).arch}}
WITHOUT = {"encoder": {"arch": get_encoder_spec("resnet18-random").arch}}


def test_a_model_reads_only_its_last_columns(tmp_path):
    module = MILRegressor(DIM, aggregation="weighted", head="probe", stroma_prior=True, inputs=MEASURED_DIM)
    assert module.config["inputs"] == MEASURED_DIM and module.tile_head.in_features == MEASURED_DIM
    x = torch.rand(20, DIM)
    y = x.clone()
    y[:, :NET] = torch.randn(20, NET) * 100  # the columns it does not read
    a, b = module.predict_bag(x), module.predict_bag(y)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    model = TrainedModel([module], fingerprint={})
    model.save(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")
    assert loaded.members[0].config["inputs"] == MEASURED_DIM and loaded.embed_dim == DIM
    assert loaded.predict(x.numpy()).score == pytest.approx(model.predict(x.numpy()).score, abs=1e-9)
    with pytest.raises(ValueError, match="inputs"):
        MILRegressor(DIM, inputs=DIM + 1)


def test_a_wide_model_reads_the_block_before_the_last(tmp_path):
    """measured-wide: the five columns ending five before the last (the wide nest rule's block, v7)."""
    module = MILRegressor(DIM + MEASURED_DIM, aggregation="weighted", head="probe", stroma_prior=True,
                          **column_inputs("measured-wide"))
    x = torch.rand(20, DIM + MEASURED_DIM)
    assert torch.equal(module.read_inputs(x), x[:, -2 * MEASURED_DIM:-MEASURED_DIM])
    y = x.clone()
    y[:, -MEASURED_DIM:] = torch.rand(20, MEASURED_DIM)  # the pale rule's block: not read
    assert all(torch.equal(u, v) for u, v in zip(module.predict_bag(x), module.predict_bag(y)))
    y[:, -MEASURED_DIM - 1] = 0.0  # its own stroma estimate (last of what it reads) moves the pooling
    assert not torch.equal(module.predict_bag(x)[2], module.predict_bag(y)[2])
    TrainedModel([module], fingerprint={}).save(tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt").members[0]
    assert (loaded.config["inputs"], loaded.config["skip"]) == (MEASURED_DIM, MEASURED_DIM)
    assert columns_of(loaded.config["inputs"], loaded.config["skip"]) == "measured-wide"
    with pytest.raises(ValueError, match="skip"):
        MILRegressor(DIM, inputs=0, skip=MEASURED_DIM)


def test_the_candidates_follow_the_encoder_and_the_request():
    v6 = {"encoder": {"arch": "resnet18+stainmorph.v6"}}
    assert candidates(TrainConfig(), WITH_MORPH, DIM + 24) == CANDIDATES + WIDE
    assert candidates(TrainConfig(), v6, DIM + 24) == ("all", "measured", "measured-dark")
    assert candidates(TrainConfig(), WITHOUT, DIM) == ("all",)
    assert candidates(TrainConfig(columns="measured"), WITH_MORPH, DIM + 24) == ("measured",)
    for columns in ("measured", "measured-dark", "measured-wide"):
        with pytest.raises(ConfigError, match=columns) as err:
            candidates(TrainConfig(columns=columns), WITHOUT, DIM)
        assert "--columns all" in err.value.fix
    with pytest.raises(ConfigError, match="older") as err:  # v6 has no wide block
        candidates(TrainConfig(columns="measured-dark-wide"), v6, DIM + 24)
    assert "extract again" in err.value.fix
    # each set reads its columns; a model's inputs and skip name its set back
    sets = ("all", "measured", "measured-dark", "measured-wide", "measured-dark-wide")
    assert [TrainConfig(columns=c).inputs() for c in sets] == [
        0, MEASURED_DIM, DARK_MEASURED_DIM, MEASURED_DIM, DARK_MEASURED_DIM]
    assert [columns_of(n) for n in (None, 0, MEASURED_DIM, DARK_MEASURED_DIM)] == [
        "all", "all", "measured", "measured-dark"]
    assert columns_of(DARK_MEASURED_DIM, MEASURED_DIM) == "measured-dark-wide"
    with pytest.raises(ValueError, match="3 columns"):
        columns_of(3)
    with pytest.raises(ConfigError, match="columns"):
        TrainConfig(columns="morph")


class _CV:
    def __init__(self, labels, predictions, folds):
        self.labels, self.predictions, self.folds = labels, predictions, folds


def test_choice_and_cross_fitted_estimate():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 80, 30)
    folds = np.repeat(np.arange(5), 6)
    good = _CV(labels, labels + rng.normal(0, 3, 30), folds)
    bad = _CV(labels, labels + rng.normal(0, 20, 30), folds)
    assert choose({"all": bad, "measured": good}) == "measured"
    twin = _CV(labels, good.predictions.copy(), folds)
    assert choose({"all": good, "measured": twin}) == "measured+all"  # a tie: both, fewest columns first
    honest, picks = crossfit({"all": bad, "measured": good})
    assert picks == ["measured"] * 5 and np.array_equal(honest, good.predictions)
    other = _CV(labels, labels + rng.normal(0, 3, 30), folds)  # as good as ``good``: each fold averages both
    honest, picks = crossfit({"all": other, "measured": good, "measured-dark": bad})
    assert picks == ["measured+all"] * 5 and np.allclose(honest, (good.predictions + other.predictions) / 2)


def test_the_sets_within_one_standard_error_of_the_best_are_averaged():
    """The one-SE rule: measurements a hair behind ``all`` (within the noise of the paired errors)
    join it, fewest columns first; measurements clearly behind do not, however simple."""
    rng = np.random.default_rng(4)
    labels = rng.uniform(0, 80, 40)
    folds = np.repeat(np.arange(5), 8)
    best = _CV(labels, labels + rng.normal(0, 8, 40), folds)
    close = _CV(labels, labels + rng.normal(0, 8.5, 40), folds)  # a little worse, within the noise
    far = _CV(labels, labels + rng.normal(0, 16, 40), folds)
    r2 = {n: 1 - ((c.predictions - labels) ** 2).mean() / labels.var() for n, c in
          {"best": best, "close": close, "far": far}.items()}
    assert r2["close"] < r2["best"] and r2["far"] < r2["best"] - 0.1
    assert plausible({"all": best, "measured": close}) == ("measured", "all")
    assert plausible({"all": best, "measured": far}) == ("all",)
    assert plausible({"measured": far, "all": best, "measured-dark": close}) == ("measured-dark", "all")
    assert choose({"measured": far, "all": best, "measured-dark": close}) == "measured-dark+all"
    flat = np.full(40, 30.0)  # labels that do not vary cannot tell sets apart (scikit-learn's R² is 0 for both)
    assert plausible({"all": _CV(flat, flat + 1, folds), "measured": _CV(flat, flat - 2, folds)}) == ("measured", "all")


def test_a_difference_too_small_to_matter_does_not_buy_more_columns():
    """Near-perfect candidates: the paired errors' standard error is tiny, so the one-SE rule alone
    would leave the fewer columns out for 0.005 of R²; under PRACTICAL_R2 both are kept."""
    from weakstil.mil.select import PRACTICAL_R2

    rng = np.random.default_rng(1)
    labels = rng.uniform(0, 80, 40)
    folds = np.repeat(np.arange(5), 8)
    noise = rng.normal(0, 1, 40)
    best = _CV(labels, labels + 1.5 * noise, folds)
    near = _CV(labels, labels + 1.5 * noise + rng.normal(0, 1.2, 40), folds)
    r2 = {n: 1 - ((c.predictions - labels) ** 2).mean() / labels.var() for n, c in (("best", best), ("near", near))}
    gap = r2["best"] - r2["near"]
    diff = (near.predictions - labels) ** 2 - (best.predictions - labels) ** 2
    se = diff.std(ddof=1) / np.sqrt(40) / labels.var()
    assert se < gap < PRACTICAL_R2  # beyond one SE, below what matters
    assert choose({"all": best, "measured-dark": near}) == "measured-dark+all"
    worse = _CV(labels, labels + 1.5 * noise + rng.normal(0, 6, 40), folds)  # 0.05 behind: all alone
    assert choose({"all": best, "measured-dark": worse}) == "all"


def _cohort(signal: str, n: int = 30, seed: int = 0):
    """Bags whose label lives in the network columns, in the measurement columns only, or (``measured-wide``)
    in the wide nest rule's block just before them (``NET - MEASURED_DIM``: sized share under the wide rule)."""
    rng = np.random.default_rng(seed)
    bags, rows = {}, []
    for i in range(n):
        y = rng.uniform(0, 80)
        x = (rng.normal(0, 1, (40, DIM)) + rng.normal(0, 1, DIM)).astype(np.float32)  # slides differ at random
        x[:, -1] = x[:, -1 - MEASURED_DIM] = rng.uniform(0.3, 1.0, 40)  # the stroma estimates
        if signal in ("measured", "measured-wide", "both"):
            x[:, NET - (MEASURED_DIM if signal == "measured-wide" else 0)] = y / 100 + rng.normal(0, 0.01, 40)
        if signal in ("all", "both"):
            x[:, :NET - MEASURED_DIM] += (y / 40) + rng.normal(0, 0.05, (40, 1))  # the network's own
        bags[f"S{i:02d}"] = x
        rows.append((f"S{i:02d}", f"P{i:02d}", y))
    return bags, pd.DataFrame(rows, columns=["slide_id", "patient_id", "stil"])


@pytest.mark.parametrize("signal", ["measured", "all", "measured-wide"])
def test_the_columns_that_carry_the_label_are_chosen(signal, monkeypatch):
    bags, table = _cohort(signal)
    # these toy bags stand for a cache of the default encoder: network columns, then the morphometry
    monkeypatch.setattr("weakstil.embed.encoders.MORPH_DIM", MEASURED_DIM + 2)
    cfg = TrainConfig(n_boot=10, fold_processes=1, max_epochs=30, patience=10, stroma_prior=True, seeds=2)
    cv, resolved, choice = cross_validate_columns(bags, table, cfg, WITH_MORPH, progress=False)
    assert set(choice.results) == set(CANDIDATES + WIDE)
    assert choice.chosen == signal == resolved.columns
    # the candidates compared on one model per fold; the chosen one gets its second seed's models too
    assert all(len(res.models) == cfg.n_folds for res in choice.results.values())
    assert len(cv.models) == 2 * cfg.n_folds
    assert sum(any(m is r for r in choice.results[signal].models) for m in cv.models) == cfg.n_folds
    assert all(columns_of(m.config["inputs"], m.config["skip"]) == signal for m in cv.models)
    other = "all" if signal == "measured" else "measured"
    assert np.array_equal(choice.results[other].folds, cv.folds)  # the same folds for both
    report = choice.report()
    assert report["candidates"][signal]["r2"] > report["candidates"][other]["r2"]
    assert report["chosen"] == signal and report["members"] == [signal]
    assert len(report["crossfit"]["fold_choices"]) == cfg.n_folds


def test_sets_the_cohort_cannot_tell_apart_are_deployed_together(tmp_path, monkeypatch):
    """Two sets plausible (the rule itself is tested above; here the choice is fixed): each trains its
    share of the seeds (three in all, rounded up: two each), the out-of-fold prediction averages
    them, and the saved ensemble keeps each member's columns through a save and load."""
    bags, table = _cohort("both", n=20)
    monkeypatch.setattr("weakstil.embed.encoders.MORPH_DIM", MEASURED_DIM + 2)
    monkeypatch.setattr("weakstil.mil.select.plausible", lambda results, mask=None: ("measured", "all"))
    cfg = TrainConfig(n_boot=10, fold_processes=1, max_epochs=8, patience=8, stroma_prior=True, seeds=3)
    cv, resolved, choice = cross_validate_columns(bags, table, cfg, WITH_MORPH, progress=False)
    members = resolved.columns.split("+")
    assert members == choice.report()["members"] == ["measured", "all"] and choice.chosen == "measured+all"
    assert choice.report()["crossfit"]["fold_choices"] == ["measured+all"] * cfg.n_folds
    per_set = 2
    assert len(cv.models) == cfg.n_folds * len(members) * per_set
    read = [columns_of(m.config["inputs"], m.config["skip"]) for m in cv.models]
    assert sorted(read) == sorted(members * per_set * cfg.n_folds)
    assert [i["columns"] for i in cv.member_info] == read  # metrics.json's members say which columns
    scores = np.nanmean(cv.member_scores, axis=0)  # every model's held-out scores, averaged per slide
    assert np.allclose(cv.predictions, scores)
    assert not np.allclose(cv.predictions, choice.results["measured"].predictions)  # not one set's alone
    model = TrainedModel(cv.models, fingerprint={})
    model.save(tmp_path / "model.ckpt")
    state = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert state["format_version"] == 3 and len(state["member_configs"]) == len(cv.models)
    loaded = load_model(tmp_path)
    assert loaded.column_sets == list(dict.fromkeys(read))
    x = next(iter(bags.values()))
    assert loaded.predict(x).score == pytest.approx(model.predict(x).score, abs=1e-4)
    with pytest.raises(ValueError, match="one model per set"):
        resolved.model_kwargs()


def test_each_averaged_set_trains_its_share_of_the_seeds():
    from weakstil.mil.fit import seeds_per_set

    assert [seeds_per_set(3, n) for n in (1, 2, 3, 4, 5)] == [3, 2, 1, 1, 1]
    assert seeds_per_set(1, 2) == 1


def test_a_resolved_set_of_columns_is_a_valid_config():
    assert TrainConfig(columns="measured-dark+all").columns == "measured-dark+all"
    for bad in ("auto+all", "all+all", "measured+morph"):
        with pytest.raises(ConfigError, match="columns"):
            TrainConfig(columns=bad)


def test_a_warm_start_keeps_the_columns_its_parent_reads(monkeypatch):
    bags, table = _cohort("measured", n=20)
    monkeypatch.setattr("weakstil.embed.encoders.MORPH_DIM", MEASURED_DIM + 2)
    cfg = TrainConfig(n_boot=10, fold_processes=1, max_epochs=3, patience=3, stroma_prior=True)
    for columns, inputs, skip in (("all", 0, 0), ("measured-wide", MEASURED_DIM, MEASURED_DIM)):
        parent = MILRegressor(DIM, **TrainConfig(columns=columns, stroma_prior=True).model_kwargs())
        given = "auto" if columns == "all" else columns  # a bare state of five columns cannot say which block
        cv, resolved, choice = cross_validate_columns(bags, table, replace(cfg, columns=given), WITH_MORPH,
                                                      progress=False, init_state=parent.state_dict())
        assert choice is None and resolved.columns == columns  # no second candidate: the weights fix it
        assert all((m.config["inputs"], m.config["skip"]) == (inputs, skip) for m in cv.models)


def test_bare_parent_weights_of_a_measured_block_name_both_nest_rules(monkeypatch):
    bags, table = _cohort("measured", n=20)
    monkeypatch.setattr("weakstil.embed.encoders.MORPH_DIM", MEASURED_DIM + 2)
    cfg = TrainConfig(n_boot=10, fold_processes=1, max_epochs=3, patience=3, stroma_prior=True)
    parent = MILRegressor(DIM, **TrainConfig(columns="measured", stroma_prior=True).model_kwargs())
    with pytest.raises(ConfigError, match="measured and measured-wide") as err:
        cross_validate_columns(bags, table, cfg, WITH_MORPH, progress=False, init_state=parent.state_dict())
    assert "config.yaml" in err.value.fix
    assert parent_columns(parent.state_dict(), DIM, wide=False) == "measured"  # one block that wide (v4–v6)


def test_the_training_table_shows_the_column_choice():
    from pathlib import Path

    from rich.console import Console

    from weakstil.mil.cohort import TrainedRun, metrics_table

    metrics = {"n_slides": 24, "n_tiles": 900, "pooled": {"r2": 0.75, "pearson": 0.87, "mae": 8.0},
               "seconds": 41.2, "cv_seconds": 9.9,  # the chosen columns' CV alone: not the run's time
               "linear_probe": {"pooled": {"r2": 0.62}},
               "columns": {"chosen": "measured", "candidates": {"all": {"r2": 0.54}, "measured": {"r2": 0.75}},
                           "crossfit": {"r2": 0.74, "fold_choices": ["measured"] * 5}}}
    console = Console(width=200, record=True)
    console.print(metrics_table([TrainedRun("m", Path("m"), metrics)]))
    text = console.export_text()
    assert "columns: measured (the fewest within one standard error (or 0.01) of the best; vs all 0.54; cross-fitted choice)" in text and "0.74" in text  # trained before the average
    assert "train s" in text and " 41" in text and " 10\n" not in text  # the whole run's time
    metrics["columns"].update(chosen="measured+all", members=["measured", "all"],
                              candidates={"all": {"r2": 0.74}, "measured": {"r2": 0.75}, "measured-dark": {"r2": 0.4}})
    console = Console(width=250, record=True)
    console.print(metrics_table([TrainedRun("m", Path("m"), metrics)]))
    text = console.export_text()
    assert ("columns: measured+all (the average of the 2 sets within one standard error (or 0.01) of the best; "
            "vs measured-dark 0.40; cross-fitted choice)") in text


def test_the_probe_verdict_says_whether_the_mil_earns_its_keep():
    """One line after the training table: a lead whose paired interval excludes zero, a loss with the
    fix (--blend), or a tie; nothing for a model trained before the lead was recorded."""
    from pathlib import Path

    from weakstil.mil.cohort import TrainedRun, probe_verdict

    def run(r2, lo, hi):
        return TrainedRun("m", Path("m"), {"linear_probe": {"pooled": {"r2": 0.5},
                                                             "mil_minus_probe": {"r2": r2, "r2_lo": lo, "r2_hi": hi}}})

    assert probe_verdict(run(0.12, 0.04, 0.2)).startswith("m: beats the linear probe on these slides (R² +0.12 [95% CI +0.04, +0.20]")
    loses = probe_verdict(run(-0.09, -0.15, -0.03))
    assert "the linear probe beats it" in loses and "--blend" in loses
    assert "within noise" in probe_verdict(run(0.01, -0.05, 0.07))
    assert "within noise" in probe_verdict(run(0.015, 0.001, 0.03))  # a lead too small to matter
    assert probe_verdict(TrainedRun("m", Path("m"), {"linear_probe": {"pooled": {"r2": 0.5}}})) is None
    assert probe_verdict(run(None, None, None)) is None  # NaN written as null (constant labels)


def test_the_probe_start_emphasises_the_measured_columns():
    """With the label in the four measured columns among many noisy network columns, the start that
    weights them 10× fits the training bags better than the equal start; a model that reads only
    the measurements, or features without them, is started as before."""
    from sklearn.metrics import r2_score

    from weakstil.mil.start import column_weights, initialise

    bags, table = _cohort("measured", n=32, seed=3)
    pairs = [(bags[s], y) for s, y in zip(table["slide_id"], table["stil"])]
    train, held_out = pairs[:20], pairs[20:]
    fits, scales = {}, {}
    for emphasis in (1.0, 10.0):
        module = MILRegressor(DIM, **TrainConfig(columns="all", stroma_prior=True).model_kwargs())
        initialise(module, train, None, emphasis=emphasis)
        fits[emphasis] = r2_score([y for _, y in held_out],
                                  [100 * float(module.predict_bag(torch.as_tensor(x))[0]) for x, _ in held_out])
        scales[emphasis] = module.feat_scale.numpy()
    assert fits[10.0] > fits[1.0] + 0.05 and fits[10.0] > 0.8, fits  # on slides the start never saw
    # the model standardises the measured columns 10× as strongly, the others as before
    ratio = scales[1.0] / scales[10.0]
    assert np.allclose(ratio[-MEASURED_DIM:], 10.0) and np.allclose(ratio[:-MEASURED_DIM], 1.0)
    measured = MILRegressor(DIM, **TrainConfig(columns="measured").model_kwargs())
    assert column_weights(DIM, measured, 10.0) is None and column_weights(MEASURED_DIM, MILRegressor(MEASURED_DIM), 10.0) is None
    assert column_weights(DIM, MILRegressor(DIM), 1.0) is None


def test_the_emphasis_is_on_exactly_when_the_features_have_the_measurements(monkeypatch):
    from weakstil.mil import select

    bags, table = _cohort("all", n=12)
    seen = []
    monkeypatch.setattr(select, "cross_validate", lambda b, t, cfg, **kw: seen.append(cfg) or _CV(
        np.zeros(3), np.zeros(3), np.zeros(3)))
    monkeypatch.setattr("weakstil.embed.encoders.MORPH_DIM", MEASURED_DIM + 2)
    select.cross_validate_columns(bags, table, TrainConfig(columns="all"), WITH_MORPH, progress=False)
    select.cross_validate_columns(bags, table, TrainConfig(columns="all"), WITHOUT, progress=False)
    select.cross_validate_columns(bags, table, TrainConfig(columns="all", measured_emphasis=2.0), WITH_MORPH,
                                  progress=False)
    assert [c.measured_emphasis for c in seen] == [select.MEASURED_EMPHASIS, 1.0, 2.0]
    with pytest.raises(ConfigError, match="measured-emphasis") as err:  # nothing to emphasise
        select.cross_validate_columns(bags, table, TrainConfig(measured_emphasis=2.0), WITHOUT, progress=False)
    assert "leave --measured-emphasis out" in err.value.fix
    with pytest.raises(ConfigError, match="measured_emphasis"):
        TrainConfig(measured_emphasis=0)


def test_a_warm_start_from_averaged_sets_takes_its_best_members_own_columns(tmp_path):
    """A parent whose members read different column sets (``--columns auto`` averaged them): the warm
    start takes the member with the best validation R², and the columns that member reads."""
    import json

    from weakstil.mil.cohort import parent_state

    members = [MILRegressor(DIM, **TrainConfig(columns=c, stroma_prior=True).model_kwargs())
               for c in ("measured-dark", "all", "measured-dark")]
    fingerprint = {"encoder": {"arch": "toy"}, "tiling": {"tile_px": 224}}
    model = TrainedModel(members, fingerprint=fingerprint)
    assert model.column_sets == ["measured-dark", "all"]
    model.save(tmp_path / "model.ckpt")
    (tmp_path / "metrics.json").write_text(json.dumps({"members": [{"best_val_r2": r} for r in (0.5, 0.9, 0.7)]}))
    parent = parent_state(tmp_path, fingerprint)
    assert parent.info["member"].startswith("member 1 of 3") and parent.model_config["inputs"] == 0
    (tmp_path / "metrics.json").write_text(json.dumps({"members": [{"best_val_r2": r} for r in (0.5, 0.1, 0.7)]}))
    parent = parent_state(tmp_path, fingerprint)
    assert (parent.model_config["inputs"], parent.model_config["skip"]) == (DARK_MEASURED_DIM, 0)
    assert set(parent.state) == set(members[2].state_dict())


def test_deploy_final_refits_each_averaged_set_its_share_of_the_seeds(monkeypatch):
    """``--deploy final`` with two sets averaged: each set refitted on all slides, two seeds each (three
    rounded up), every model reading its own set's columns (with the probe head a refit may keep its
    start, so two seeds can give the same weights: not asserted here)."""
    from weakstil.mil.cv import cross_validate
    from weakstil.mil.train import _final_fits

    bags, table = _cohort("both", n=12)
    cfg = TrainConfig(n_boot=10, fold_processes=1, max_epochs=3, patience=3, stroma_prior=True, seeds=3, n_folds=2)
    cv = cross_validate(bags, table, replace(cfg, columns="all"), progress=False, seeds=[0])
    members = _final_fits(bags, table, replace(cfg, columns="measured-dark+all"), cv)
    assert [columns_of(m.config["inputs"], m.config["skip"]) for m in members] == ["measured-dark"] * 2 + ["all"] * 2
