"""`weakstil evaluate`: external validation of a trained model on a new labelled cohort (issue 15)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cohort_data import invoke, world
from sklearn.metrics import r2_score, roc_auc_score

from weakstil.outputs.evaluate import PREDICTION_COLUMNS, metrics_doc, render_report


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    w = world(tmp_path_factory)
    out = tmp_path_factory.mktemp("evaluation")
    result = invoke("evaluate", w.b / "labels.csv", "--model", w.base, "--features", w.features, "--out", out,
                    "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    return w, out, result.output


@pytest.mark.slow
def test_metrics_equal_scikit_learn_on_the_predictions(evaluated):
    w, out, _ = evaluated
    pred = pd.read_csv(out / "predictions.csv", dtype={"slide_id": str}, keep_default_na=False)
    assert tuple(pred.columns) == PREDICTION_COLUMNS
    labels = pd.read_csv(w.b / "labels.csv", dtype={"slide_id": str})
    assert list(pred["slide_id"]) == list(labels["slide_id"])
    metrics = json.loads((out / "metrics.json").read_text())
    # predictions.csv keeps 4 decimals (±5e-5 sTIL points) and metrics.json is computed before that
    # rounding: on 10 slides the R² can move by ~2e-6 (1e-6 failed once by 1.0e-6)
    assert metrics["pooled"]["r2"] == pytest.approx(r2_score(pred["label"], pred["prediction"]), abs=1e-5)
    auc = roc_auc_score(pred["label"] >= 30, pred["prediction"])
    assert metrics["pooled"]["auc@30"] == pytest.approx(auc, abs=1e-6)
    assert metrics["headline"]["r2"] == metrics["pooled"]["r2"]
    for key in ("r2", "pearson", "spearman", "mae", "rmse", "auc@10", "auc@30", "auc@50"):
        lo, hi = metrics["pooled_ci95"][key]
        assert lo <= hi, key
    assert metrics["n_slides"] == 10 and metrics["model_sha256"]


@pytest.mark.slow
def test_plots_report_and_card_history_are_written(evaluated):
    w, out, output = evaluated
    for name in ("scatter.png", "roc.png", "bland_altman.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    report = (out / "report.md").read_text()
    assert "R²" in report and "Bland–Altman" in report and "plots/scatter.png" in report
    card = json.loads((w.base / "model_card.json").read_text())
    entry = next(e for e in card["evaluations"] if e["out"] == str(out))
    assert entry["n_slides"] == 10 and entry["pooled"]["r2"] == json.loads((out / "metrics.json").read_text())["pooled"]["r2"]
    assert "External validations" in (w.base / "MODEL_CARD.md").read_text()
    assert "R²" in output and "report" in output


@pytest.mark.slow
def test_labelled_slides_without_features_are_an_error(evaluated, tmp_path):
    w, _, _ = evaluated
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,patient_id,stil\nB-000,P0,10\nNOPE-1,P1,20\n")
    result = invoke("evaluate", labels, "--model", w.base, "--features", w.features, "--out", tmp_path / "o", "--quiet")
    assert result.exit_code == 2
    assert "NOPE-1" in result.output and "--slides" in result.output


def test_metrics_doc_matches_scikit_learn_and_keeps_flagged_slides_apart():
    rng = np.random.default_rng(3)
    label = rng.uniform(0, 90, 40)
    df = pd.DataFrame({"slide_id": [f"S{i}" for i in range(40)], "patient_id": [f"P{i // 2}" for i in range(40)],
                       "label": label, "prediction": label + rng.normal(0, 12, 40),
                       "qc": ["out-of-distribution(x)" if i < 5 else "" for i in range(40)]})
    doc = metrics_doc(df, cutoffs=(10, 30, 50), high=30, n_boot=200)
    assert doc["pooled"]["r2"] == pytest.approx(r2_score(df["label"], df["prediction"]), abs=1e-9)
    assert doc["headline"]["auc@30"] == pytest.approx(roc_auc_score(df["label"] >= 30, df["prediction"]), abs=1e-9)
    ok = df["qc"] == ""
    assert doc["pooled_qc_ok"]["r2"] == pytest.approx(r2_score(df["label"][ok], df["prediction"][ok]), abs=1e-9)
    assert doc["n_flagged"] == 5 and doc["n_patients"] == 20
    doc.update(date="today", labels="l.csv", model="m", failed={})
    text = render_report(doc, df, "models/m")
    assert "5 slide(s) carry QC flags" in text and "S0" in text


def _doc(label, prediction):
    n = len(label)
    df = pd.DataFrame({"slide_id": [f"S{i}" for i in range(n)], "patient_id": [f"P{i}" for i in range(n)],
                       "label": label, "prediction": prediction, "qc": [""] * n})
    doc = metrics_doc(df, cutoffs=(10, 30, 50), high=30, n_boot=50)
    return df, doc


def test_scale_check_tells_a_model_on_another_scale_from_one_that_does_not_rank():
    """A model that ranks a cohort but reads it at 60 % (labels counted on another scale) is told to
    retrain with the line that would fit; one whose predictions are shuffled is told it does not rank;
    one on the labels' scale gets no advice."""
    rng = np.random.default_rng(5)
    label = rng.uniform(0, 90, 40)
    _, agree = _doc(label, label + rng.normal(0, 5, 40))
    assert agree["scale"]["verdict"] == "agrees" and not agree["scale"]["advice"]
    df, low = _doc(label, 0.6 * label + rng.normal(0, 2, 40))
    s = low["scale"]
    assert s["verdict"] == "rescaled", s
    assert s["slope"] == pytest.approx(1 / 0.6, rel=0.1) and s["r2_line"] > 0.9 > low["pooled"]["r2"] + 0.1
    assert "weakstil train" in s["advice"] and "another scale" in s["advice"]
    low.update(date="today", labels="l.csv", model="m", failed={})
    assert "**Scale**" in render_report(low, df, "models/m")
    _, shuffled = _doc(label, rng.permutation(label))
    assert shuffled["scale"]["verdict"] == "does-not-rank" and "retrain" in shuffled["scale"]["advice"]
    _, tiny = _doc(label[:2], label[:2])
    assert tiny["scale"]["verdict"] == "unclear"
