"""Warm start (`train --init`), several cohorts at once, `--cv leave-center-out` (issue 15)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from cohort_data import TRAIN, invoke, world

from weakstil.errors import LabelsError, ModelMismatchError, TooFewGroupsError
from weakstil.fingerprint import file_sha256
from weakstil.mil.cohort import center_folds, cohort_names, parent_state
from weakstil.mil.fit import TrainConfig
from weakstil.mil.model import load_model


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return world(tmp_path_factory)


@pytest.mark.slow
def test_warm_start_records_its_parent_and_starts_from_its_weights(w):
    result = invoke("train", w.b / "labels.csv", "--features", w.features, "--models", w.models, "--name", "warm",
                    "--init", w.base, *TRAIN)
    assert result.exit_code == 0, result.output
    warm = w.models / "warm"
    parent = yaml.safe_load((warm / "config.yaml").read_text())["run"]["parent"]
    assert parent["sha256"] == file_sha256(w.base / "model.ckpt") and parent["name"] == "base"
    card = json.loads((warm / "model_card.json").read_text())
    assert card["parent"]["sha256"] == parent["sha256"] and "member" in card["parent"]["member"]
    assert "warm start from base" in (warm / "MODEL_CARD.md").read_text()
    # the chosen member is the one with the best validation R² in the parent's metrics.json (one record
    # per member of model.ckpt: three per fold by default)
    metrics = json.loads((w.base / "metrics.json").read_text())
    members = metrics["members"]
    assert len(members) == len(load_model(w.base).members) == metrics["n_folds"] * TrainConfig().seeds
    assert [m["fold"] for m in members] == sorted(m["fold"] for m in members)
    best = int(np.argmax([m["best_val_r2"] for m in members]))
    state = parent_state(w.base, yaml.safe_load((w.base / "config.yaml").read_text())["fingerprint"])
    assert state.info["member"].startswith(f"member {best} of {len(members)} ")
    # a parent trained before the per-member records (one model per fold): its folds' records
    older = {k: v for k, v in metrics.items() if k != "members"}
    (w.base / "metrics.json").write_text(json.dumps(older))
    try:
        assert parent_state(w.base, yaml.safe_load((w.base / "config.yaml").read_text())["fingerprint"]
                            ).info["member"] == "member 0 (no fold validation record)"  # 5 records, 15 members
    finally:
        (w.base / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.slow
def test_warm_start_keeps_the_parents_tile_head(w):
    """A parent with another tile head (here the linear one; models from before the probe head have
    the MLP or linear head) warm-starts with its own head: the weights fit only that network; and
    with its own stroma floor, which its pooling weights were trained with."""
    result = invoke("train", w.a / "labels.csv", "--features", w.features, "--models", w.models, "--name",
                    "linear-parent", "--head", "linear", "--stroma-floor", "0.3", *TRAIN)
    assert result.exit_code == 0, result.output
    # after the table, one line on whether the model beats the linear probe on the same folds
    assert re.search(r"^train: linear-parent: (beats the linear probe|the linear probe beats it|within noise of the "
                     r"linear probe) on these slides \(R² [+-]\d\.\d\d \[95% CI ", result.output, re.M), result.output
    result = invoke("train", w.b / "labels.csv", "--features", w.features, "--models", w.models, "--name",
                    "warm-linear", "--init", w.models / "linear-parent", *TRAIN)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((w.models / "warm-linear" / "config.yaml").read_text())
    assert config["train"]["head"] == "linear"
    assert config["train"]["stroma_floor"] == 0.3
    assert {m.config["stroma_floor"] for m in load_model(w.models / "warm-linear").members} == {0.3}


@pytest.mark.slow
def test_warm_start_refuses_a_parent_trained_on_other_features(w):
    fp = yaml.safe_load((w.base / "config.yaml").read_text())["fingerprint"]
    fp["tiling"]["tile_px"] = 256
    with pytest.raises(ModelMismatchError):
        parent_state(w.base, fp)


@pytest.mark.slow
def test_two_cohorts_leave_center_out_reports_each_cohort(w):
    result = invoke("train", w.a / "labels.csv", w.b / "labels.csv", "--features", w.features, "--models", w.models,
                    "--name", "both", "--cv", "leave-center-out", *TRAIN)
    assert result.exit_code == 0, result.output
    both = w.models / "both"
    metrics = json.loads((both / "metrics.json").read_text())
    assert metrics["cv"] == "leave-center-out" and metrics["n_folds"] == 2
    assert set(metrics["per_cohort"]) == {"A", "B"}
    assert metrics["per_cohort"]["B"]["n"] == 10 and metrics["per_cohort"]["A"]["n"] == 12
    cv = pd.read_csv(both / "cv_predictions.csv", dtype={"slide_id": str})
    assert cv.groupby(cv["slide_id"].str[0])["fold"].nunique().tolist() == [1, 1]  # one fold per cohort
    card = json.loads((both / "model_card.json").read_text())
    assert [c["name"] for c in card["cohorts"]] == ["A", "B"] and card["n_slides"] == 22
    assert card["training"]["cv"] == "leave-center-out"


@pytest.mark.slow
def test_every_model_folder_has_a_card_and_a_qc_reference(w):
    card = json.loads((w.base / "model_card.json").read_text())
    for key in ("cohorts", "n_slides", "n_patients", "labels", "encoder", "tiling", "aggregation", "cv_metrics",
                "training", "weakstil_version", "git_commit", "created", "parent", "intended_use", "limits", "qc"):
        assert key in card, key
    assert card["encoder"]["weights_sha256"] and card["n_slides"] == 12 and card["parent"] is None
    assert card["cv_metrics"]["pooled_ci95"]["r2"][0] <= card["cv_metrics"]["pooled_ci95"]["r2"][1]
    assert card["training"]["hardware"]["cores"] >= 1
    assert any("random-init encoder" in limit for limit in card["limits"])
    reference = json.loads((w.base / "qc_reference.json").read_text())
    assert card["qc"]["thresholds"] == reference["thresholds"]
    assert (w.base / "plots" / "label_histogram.png").stat().st_size > 1000
    assert "QC thresholds" in (w.base / "MODEL_CARD.md").read_text()


def test_leave_center_out_needs_two_cohorts_and_one_center_per_patient():
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "patient_id": ["p", "q", "r"], "stil": [1.0, 2, 3],
                       "cohort": ["x", "x", "x"]})
    with pytest.raises(TooFewGroupsError):
        center_folds(df)
    df["cohort"] = ["x", "y", "y"]
    assert center_folds(df).tolist() == [0, 1, 1]
    df["patient_id"] = ["p", "p", "r"]
    with pytest.raises(LabelsError, match="more than one cohort"):
        center_folds(df)


def test_cohort_names_are_file_stems_then_folders(tmp_path):
    from pathlib import Path

    assert cohort_names([Path("x/nki.csv"), Path("x/tcga.csv")]) == ["nki", "tcga"]
    assert cohort_names([Path("nki/labels.csv"), Path("tcga/labels.csv")]) == ["nki", "tcga"]
    assert len(set(cohort_names([Path("a/x/labels.csv"), Path("b/x/labels.csv")]))) == 2


@pytest.mark.slow
def test_warmstart_benchmark_smoke():
    from benchmarks.bench_cohort import run
    from benchmarks.common import MODES

    rows = run(MODES["smoke"])
    names = [r.name for r in rows]
    assert names == [f"{m} {k} on the new site's test set" for m in ("parent", "scratch", "finetuned")
                     for k in ("r2", "auc@30")]
    finetuned = rows[-2]
    assert finetuned.reference == "parent unchanged" and finetuned.ref_value == rows[0].value


def test_every_fold_starts_from_the_parent_weights(monkeypatch):
    import torch

    from weakstil.mil import cv as cv_module
    from weakstil.mil.fit import FitHistory, TrainConfig
    from weakstil.mil.model import MILRegressor
    from weakstil.mil.start import initialise

    parent = MILRegressor(8, hidden=16).state_dict()
    child = MILRegressor(8, hidden=16)
    initialise(child, [(np.zeros((2, 8)), 50.0)], parent)
    assert all(torch.equal(child.state_dict()[k], v) for k, v in parent.items())

    seen = []

    def fake_fit(train, val, cfg, *, on_epoch=None, init_state=None):
        seen.append(init_state)
        return MILRegressor(8, hidden=16), FitHistory(best_epoch=0)

    monkeypatch.setattr(cv_module, "fit_one", fake_fit)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"slide_id": [f"s{i}" for i in range(12)], "patient_id": [f"p{i}" for i in range(12)],
                       "stil": np.linspace(0, 90, 12)})
    bags = {s: rng.normal(size=(5, 8)).astype(np.float32) for s in df["slide_id"]}
    folds = np.array([0] * 6 + [1] * 6)
    result = cv_module.cross_validate(bags, df, TrainConfig(n_folds=2, fold_processes=1, n_boot=10), progress=False,
                                      init_state=parent, folds=folds)
    assert len(seen) == 2 * TrainConfig().seeds and all(s is parent for s in seen)  # every model of every fold
    assert result.folds.tolist() == folds.tolist()
