"""The model card (mil/card.py): facts, Markdown, and the evaluation history."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from weakstil.mil import card as mc


def _card(**kw):
    df = pd.DataFrame({"slide_id": [f"s{i}" for i in range(12)], "patient_id": [f"p{i // 2}" for i in range(12)],
                       "stil": np.linspace(1, 80, 12), "cohort": ["nki"] * 6 + ["tcga"] * 6})
    metrics = {"n_folds": 5, "pooled": {"r2": 0.5, "auc@30": 0.8, "mae": 10.0},
               "pooled_ci95": {"r2": [0.2, 0.7], "auc@30": [0.6, 0.9], "mae": [8.0, 12.0]},
               "linear_probe": {"pooled": {"r2": 0.31, "auc@30": 0.7},
                                "mil_minus_probe": {"r2": 0.19, "r2_lo": 0.05, "r2_hi": 0.33}}}
    fp = {"encoder": {"name": "resnet18-random", "weights": "random-init", "weights_sha256": "ab" * 32,
                      "embed_dim": 512}, "tiling": {"tile_px": 224, "mpp": 0.5}}
    qc = {"thresholds": {"min_tiles": 4}, "rules": {"low-tissue": "n_tiles < 4"}}
    return mc.build_card(name="m", df=df, metrics=metrics, fingerprint=fp,
                         train={"aggregation": "attention", "deploy": "ensemble", "lr": 1e-3, "seeds": 3}, seconds=12.3,
                         qc=qc, **kw), df


def test_card_holds_the_facts_and_the_markdown_shows_them(tmp_path):
    card, df = _card(parent={"name": "old", "path": "/m/old", "sha256": "cd" * 32, "member": "member 2 of 5"})
    assert [c["name"] for c in card["cohorts"]] == ["nki", "tcga"] and card["n_patients"] == 6
    assert sum(card["labels"]["histogram"]["counts"]) == 12
    assert card["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", card["git_commit"])
    assert any("random-init encoder: synthetic data only" in x for x in card["limits"])
    assert any("leave-center-out" in x for x in card["limits"])  # two cohorts folded by patient
    mc.write_card(tmp_path, card, stil=df["stil"])
    text = (tmp_path / mc.CARD_MD).read_text()
    for needle in ("resnet18-random", "ab" * 32, "Linear-probe baseline: R² 0.31", "lead over it: R² +0.19 (95 % paired bootstrap interval +0.05 to +0.33)",
                   "warm start from old",
                   "min_tiles: 4", "| nki | 6 | 3 |", "0.20 – 0.70", "3 model(s) per fold"):
        assert needle in text, needle
    assert (tmp_path / mc.HISTOGRAM).is_file()
    # a reference stored before the little-stroma floor existed: the card lists it all the same,
    # since every model's scores get that flag
    assert "- rule low-tissue: n_tiles < 4" in text and "- rule little-stroma: the slide's estimated stroma" in text


def test_evaluations_are_appended_and_a_model_without_card_gets_one(tmp_path):
    entry = {"date": "d", "labels": "new.csv", "n_slides": 9, "n_flagged": 1, "pooled": {"r2": float("nan")},
             "pooled_ci95": {"r2": [0.1, 0.4]}}
    mc.append_evaluation(tmp_path, entry)
    mc.append_evaluation(tmp_path, {**entry, "labels": "other.csv"})
    card = json.loads((tmp_path / mc.CARD_JSON).read_text())
    assert [e["labels"] for e in card["evaluations"]] == ["new.csv", "other.csv"]
    assert card["evaluations"][0]["pooled"]["r2"] is None  # NaN stored as null
    assert "predates model cards" in (tmp_path / mc.CARD_MD).read_text()
    assert not list(tmp_path.glob("*.partial"))
