"""#13 case 12: labels a regressor cannot learn from are refused before training, and every fix
hint matches its cause (no "turn off early stopping" — there is no such option — for too few patients).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from weakstil.errors import LabelsError, TooFewGroupsError
from weakstil.mil.labels import LabelTable, inner_split, make_folds, read_labels
from weakstil.mil.train import TrainConfig, train_model


def labels_csv(path, stil):
    rows = [f"S{i},P{i},{v}" for i, v in enumerate(stil)]
    path.write_text("slide_id,patient_id,stil\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("stil", [[40.0] * 8, [0] * 6, [55.5]])
def test_labels_without_spread_are_refused_before_training(tmp_path, stil):
    table = read_labels(labels_csv(tmp_path / "labels.csv", stil))
    bags = {s: np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) for s in table.slide_ids}
    out = tmp_path / "models" / "stil"
    with pytest.raises(LabelsError, match="at least two different sTIL% values") as info:
        train_model(bags, table, TrainConfig(n_folds=2, max_epochs=1), out_dir=out, fingerprint={}, progress=False)
    error = info.value
    assert error.path == tmp_path / "labels.csv"
    assert f"every slide has sTIL% {stil[0]:g}" in str(error)
    assert "correct the rows listed above" not in error.fix and "sTIL% range" in error.fix
    assert not out.exists() and not list((tmp_path / "models").glob(".*partial"))


def test_two_distinct_values_are_enough_to_make_folds():
    df = pd.DataFrame({"slide_id": [f"S{i}" for i in range(6)], "patient_id": [f"P{i}" for i in range(6)],
                       "stil": [10.0, 10.0, 10.0, 60.0, 60.0, 60.0]})
    assert sorted(set(make_folds(LabelTable(df), n_folds=2).tolist())) == [0, 1]


def test_too_few_patients_for_validation_has_a_matching_hint():
    df = pd.DataFrame({"slide_id": ["a", "b", "c"], "patient_id": ["P1", "P1", "P2"], "stil": [5.0, 50.0, 20.0]})
    with pytest.raises(TooFewGroupsError) as info:
        inner_split(np.array([0, 1]), df)
    assert "early stopping" not in info.value.fix
    assert "add patients" in info.value.fix and "1 patient(s)" in str(info.value)


def test_an_empty_labels_file_gets_a_hint_for_its_cause(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("")
    with pytest.raises(LabelsError, match="the file is empty") as info:
        read_labels(path)
    assert "write a header" in info.value.fix and "rows listed above" not in info.value.fix


def test_scoring_an_empty_bag_does_not_talk_about_labels():
    from weakstil.errors import EmptyBagError
    from weakstil.mil.model import MILRegressor, TrainedModel

    with pytest.raises(EmptyBagError) as info:
        TrainedModel([MILRegressor(8)], fingerprint={}).predict(np.zeros((0, 8), np.float32))
    assert "labels" not in info.value.fix and "tissue" in info.value.fix
