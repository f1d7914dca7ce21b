"""labels.py: CSV validation (every bad row reported at once), patient/center-grouped folds."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from weakstil.errors import (
    LabelsError,
    LabelsNotFoundError,
    TooFewGroupsError,
    WeakstilError,
)
from weakstil.mil.labels import (
    LabelsWarning,
    LabelTable,
    inner_split,
    make_folds,
    read_labels,
    stil_bins,
)


def write(tmp_path, text: str, name: str = "labels.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def problem_lines(error: LabelsError) -> set[int]:
    return {line for line, _ in error.problems}


def cohort(n_patients: int = 60, *, seed: int = 0, n_centers: int = 0) -> pd.DataFrame:
    """Patients with 1-3 slides each and a skewed sTIL% distribution (many low, few high)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        stil = float(np.clip(rng.gamma(1.2, 15.0), 0, 100).round())
        for j in range(int(rng.integers(1, 4))):
            row = {"slide_id": f"S{i:03d}-{j}", "patient_id": f"P{i:03d}",
                   "stil": float(np.clip(stil + rng.normal(0, 3), 0, 100))}
            if n_centers:
                row["center"] = f"C{i % n_centers}"
            rows.append(row)
    return pd.DataFrame(rows)


# --- read_labels: good files ------------------------------------------------------------------
def test_good_file_parses(tmp_path):
    path = write(tmp_path, "slide_id,patient_id,stil\nA,p1,5\nB,p1,12.5\nC,p2,100\nD,p3,0\n")
    table = read_labels(path)
    assert isinstance(table, LabelTable)
    assert table.slide_ids == ["A", "B", "C", "D"]
    assert table.df["patient_id"].tolist() == ["p1", "p1", "p2", "p3"]
    assert table.df["stil"].dtype == np.float64
    np.testing.assert_array_equal(table.stil, [5.0, 12.5, 100.0, 0.0])
    assert not table.has_center and table.unlabelled == [] and len(table) == 4


def test_bom_whitespace_extra_columns_blank_rows_and_center(tmp_path):
    text = ("\ufeff Slide_ID , patient_id ,STIL,notes,center\n"
            " A , 001 , 5 ,some note,  AMC \n"
            "\n"
            ",,,,\n"
            "B,002,50%,,\n")
    table = read_labels(write(tmp_path, text))
    assert table.slide_ids == ["A", "B"]
    assert table.df["patient_id"].tolist() == ["001", "002"]  # ids stay text, leading zeros kept
    np.testing.assert_array_equal(table.stil, [5.0, 50.0])
    assert table.has_center
    assert table.df["center"].iloc[0] == "AMC" and pd.isna(table.df["center"].iloc[1])
    assert "notes" not in table.df.columns


@pytest.mark.parametrize("sep", [";", "\t"])
def test_spreadsheet_separators(tmp_path, sep):
    text = sep.join(["slide_id", "patient_id", "stil"]) + "\n" + sep.join(["A", "p1", "7"]) + "\n"
    assert read_labels(write(tmp_path, text)).slide_ids == ["A"]


def test_quoted_multiline_field_keeps_line_numbers(tmp_path):
    text = 'slide_id,patient_id,stil,notes\nA,p1,5,"two\nlines"\nB,p2,abc,\n'
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, text))
    assert problem_lines(info.value) == {4}


# --- read_labels: bad files -------------------------------------------------------------------
def test_every_bad_row_reported_in_one_error(tmp_path):
    text = (
        "slide_id,patient_id,stil\n"  # 1
        "A,p1,5\n"                    # 2 ok
        "B,,abc\n"                    # 3 empty patient, non-numeric
        "\n"                          # 4 blank: skipped
        "C,p2,\n"                     # 5 empty stil
        "D,p3,101\n"                  # 6 > 100
        "A,p4,3\n"                    # 7 duplicate of line 2
        "E,p5,-1\n"                   # 8 < 0
        ",p6,4\n"                     # 9 empty slide_id
        "F,p7,nan\n"                  # 10 not finite
        'G,p8,"12,5"\n'               # 11 decimal comma
        "H,p9,1,2\n"                  # 12 too many fields
        "I,p10,40\n"                  # 13 ok
    )
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, text))
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, WeakstilError)
    assert problem_lines(error) == {3, 5, 6, 7, 8, 9, 10, 11, 12}
    message = str(error)
    for line in (3, 5, 6, 7, 8, 9, 10, 11, 12):
        assert f"line {line}:" in message
    assert "line 2:" not in message and "line 13:" not in message
    assert "empty patient_id" in message and "'abc' is not a number" in message
    assert "empty stil" in message and "empty slide_id" in message
    assert "outside 0-100" in message and "decimal point" in message
    assert "duplicate slide_id 'A' (also on line 2)" in message  # names both lines
    assert "fix:" in message
    assert [p[0] for p in error.problems] == sorted(p[0] for p in error.problems)


def test_missing_column_reported_with_row_problems(tmp_path):
    text = "slide_id,stil\nA,5\nB,200\n"
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, text))
    message = str(info.value)
    assert "line 1: missing required column(s) patient_id" in message
    assert "'slide_id', 'stil'" in message  # shows what the header has
    assert "line 3: stil 200 is outside" in message
    assert "copy slide_id into a patient_id column" in message  # how to fix it for one slide each


def test_columns_named_as_other_tools_name_them_are_pointed_out_not_taken(tmp_path):
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, "slide,case_id,sTILs\nA,p1,5\n"))
    message = str(info.value)
    for hint in ("rename 'slide' to slide_id", "rename 'case_id' to patient_id", "rename 'stils' to stil"):
        assert hint in message, hint
    assert "copy slide_id" not in message  # a patient column is there, under another name


def test_missing_file_is_typed_file_not_found(tmp_path):
    with pytest.raises(LabelsNotFoundError) as info:
        read_labels(tmp_path / "nope.csv")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WeakstilError)
    with pytest.raises(FileNotFoundError, match="folder"):
        read_labels(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("\n\n", "empty"),
    ("slide_id,patient_id,stil\n", "no labelled rows"),
    ("slide_id,patient_id,stil,STIL\nA,p,1,2\n", "appears twice"),
])
def test_empty_or_degenerate_files(tmp_path, text, match):
    with pytest.raises(LabelsError, match=match):
        read_labels(write(tmp_path, text))


def test_non_utf8_file_names_line(tmp_path):
    path = write(tmp_path, "slide_id,patient_id,stil\nA,p1,5\nBé,p2,6\n", encoding="latin-1")
    with pytest.raises(LabelsError, match=r"line 3: the file is not UTF-8"):
        read_labels(path)


def test_fraction_scale_warns(tmp_path):
    rows = "".join(f"S{i},p{i},{i / 10}\n" for i in range(6))
    with pytest.warns(LabelsWarning, match="0-100"):
        read_labels(write(tmp_path, "slide_id,patient_id,stil\n" + rows))


# --- read_labels with the cache's slide ids ---------------------------------------------------
def test_unlabelled_cached_slides_listed_and_warned(tmp_path):
    path = write(tmp_path, "slide_id,patient_id,stil\nA,p1,5\nB,p2,60\n")
    with pytest.warns(LabelsWarning, match="2 cached slide"):
        table = read_labels(path, cached_ids=["Z", "A", "B", "Y"])
    assert table.unlabelled == ["Y", "Z"]
    assert table.slide_ids == ["A", "B"]  # nothing dropped


def test_no_warning_when_cache_matches(tmp_path):
    path = write(tmp_path, "slide_id,patient_id,stil\nA,p1,5\nB,p2,60\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_labels(path, cached_ids={"A", "B"}).unlabelled == []


def test_labelled_slides_missing_from_cache_are_errors(tmp_path):
    text = "slide_id,patient_id,stil\nA,p1,5\nB.svs,p2,6\nc,p3,7\nD,p4,8\nE,p5,x\n"
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, text), cached_ids=["A", "B", "C", "E"])
    message = str(info.value)
    assert problem_lines(info.value) == {3, 4, 5, 6}
    assert "did you mean 'B'" in message and "did you mean 'C'" in message
    assert "line 5: slide 'D' is not in the feature cache" in message
    assert "line 6: stil 'x'" in message  # reported together with the cache problems


def test_an_ome_tiff_labelled_without_its_ome_suffix_is_pointed_to(tmp_path):
    with pytest.raises(LabelsError) as info:
        read_labels(write(tmp_path, "slide_id,patient_id,stil\nS1,p1,5\n"), cached_ids=["S1.ome"])
    assert "did you mean 'S1.ome'?" in str(info.value)


# --- folds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_folds_never_split_a_patient(seed):
    df = cohort(40 + 5 * seed, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the binning keeps scikit-learn from warning
        folds = make_folds(df, n_folds=5, seed=seed)
    assert folds.dtype == np.int64 and folds.shape == (len(df),)
    assert set(folds.tolist()) == set(range(5))
    assert (df.assign(fold=folds).groupby("patient_id")["fold"].nunique() == 1).all()


def test_folds_are_stratified_on_stil():
    df = cohort(150, seed=3)
    folds = make_folds(df, n_folds=5, seed=0)
    high = df["stil"].to_numpy() >= 30
    for k in range(5):
        assert abs(high[folds == k].mean() - high.mean()) < 0.12
        assert abs(df["stil"][folds == k].median() - df["stil"].median()) < 8


def test_folds_deterministic_per_seed_and_accept_table():
    df = cohort(50)
    a = make_folds(LabelTable(df), seed=1)
    np.testing.assert_array_equal(a, make_folds(df, seed=1))
    assert not np.array_equal(a, make_folds(df, seed=2))


def test_center_folds_group_by_center():
    df = cohort(60, n_centers=6)
    folds = make_folds(df, n_folds=3, by="center", seed=0)
    assert (df.assign(fold=folds).groupby("center")["fold"].nunique() == 1).all()
    assert set(folds.tolist()) == {0, 1, 2}


def test_center_folds_need_complete_consistent_centers():
    df = cohort(20, n_centers=4)
    with pytest.raises(LabelsError, match="no 'center' column"):
        make_folds(df.drop(columns="center"), n_folds=2, by="center")
    blank = df.copy()
    blank.loc[0, "center"] = None
    with pytest.raises(LabelsError, match="have no center"):
        make_folds(blank, n_folds=2, by="center")
    moved = pd.concat([df, df.iloc[[0]].assign(slide_id="extra", center="C9")], ignore_index=True)
    with pytest.raises(LabelsError, match="more than one center"):
        make_folds(moved, n_folds=2, by="center")


def test_too_few_groups_says_how_many_and_suggests_folds():
    df = cohort(3)
    with pytest.raises(TooFewGroupsError) as info:
        make_folds(df, n_folds=5)
    assert isinstance(info.value, ValueError)
    assert "only 3 patients" in str(info.value) and "--folds 3" in str(info.value)
    with pytest.raises(TooFewGroupsError, match="only 2 centers"):
        make_folds(cohort(10, n_centers=2), n_folds=3, by="center")
    with pytest.raises(TooFewGroupsError, match="at least 2 folds"):
        make_folds(cohort(10), n_folds=1)


def test_folds_with_exactly_as_many_patients_as_folds():
    folds = make_folds(cohort(5, seed=4), n_folds=5)
    assert set(folds.tolist()) == set(range(5))


def test_stil_bins_collapse_until_each_bin_has_enough_groups():
    y = np.array([0.0] * 30 + [1, 2, 3, 5, 8, 60, 70, 90])  # many zeros, a few high
    groups = np.arange(y.size)
    bins = stil_bins(y, groups, n_bins=4, min_groups=5)
    counts = np.bincount(bins)
    assert (counts >= 5).all() and bins.max() >= 1
    assert np.all(np.diff(bins[np.argsort(y, kind="stable")]) >= 0)  # bins stay ordered by sTIL
    assert stil_bins(y, groups, n_bins=4, min_groups=100).max() == 0
    assert stil_bins(y, groups, n_bins=1, min_groups=1).max() == 0


def test_inner_split_is_grouped_and_inside_train():
    df = cohort(60, seed=5)
    folds = make_folds(df, seed=0)
    train_idx = np.flatnonzero(folds != 0)
    train, val = inner_split(train_idx, df, val_fraction=0.2, seed=0)
    assert set(train) | set(val) == set(train_idx) and not set(train) & set(val)
    patients = df["patient_id"].to_numpy()
    assert not set(patients[train]) & set(patients[val])
    share = len(set(patients[val])) / len(set(patients[train_idx]))
    assert 0.1 < share < 0.3
    again = inner_split(train_idx, df, val_fraction=0.2, seed=0)
    np.testing.assert_array_equal(val, again[1])


def test_inner_split_needs_two_patients():
    df = cohort(4)
    one_patient = np.flatnonzero(df["patient_id"].to_numpy() == "P000")
    with pytest.raises(TooFewGroupsError, match="at least 2"):
        inner_split(one_patient, df, seed=0)
    with pytest.raises(ValueError):
        inner_split(np.arange(len(df)), df, val_fraction=1.5, seed=0)
