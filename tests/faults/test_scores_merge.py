"""#13.6: scoring A/ and then B/ into the same --out keeps both folders' rows in scores.csv
(merged by slide_id, the latest run winning per slide), written atomically."""

from __future__ import annotations

import pandas as pd

from tests.faults.conftest import invoke, score_args


def _scores(out):
    return pd.read_csv(out / "scores.csv", dtype={"slide_id": str}).set_index("slide_id")


def test_scoring_two_folders_into_one_out_keeps_both(world, tmp_path):
    out = tmp_path / "results"
    first = invoke(*score_args(world, world["A"], out, "--outputs", "csv"))
    assert first.exit_code == 0, first.output
    a_scores = _scores(out)
    assert sorted(a_scores.index) == ["A0", "A1"]
    second = invoke(*score_args(world, world["B"], out, "--outputs", "csv"))
    assert second.exit_code == 0, second.output
    both = _scores(out)
    assert sorted(both.index) == ["A0", "A1", "B0", "B1"]
    assert (both["status"] == "ok").all()
    assert both.loc["A0", "score"] == a_scores.loc["A0", "score"]  # A's rows as A's run wrote them
    assert not [p for p in out.iterdir() if p.name.startswith(".scores.csv.")]  # no temp file left


def test_the_latest_run_wins_per_slide(world, tmp_path):
    out = tmp_path / "results"
    assert invoke(*score_args(world, world["A"], out, "--outputs", "csv")).exit_code == 0
    assert invoke(*score_args(world, world["B"], out, "--outputs", "csv")).exit_code == 0
    (world["root"] / "A1-broken").mkdir(exist_ok=True)
    broken = world["root"] / "A1-broken" / "A1.tif"
    broken.write_bytes(b"")  # the same slide id, now a broken file: this run's row replaces the ok one
    third = invoke(*score_args(world, broken.parent, out, "--outputs", "csv"))
    assert third.exit_code == 1
    rows = _scores(out)
    assert sorted(rows.index) == ["A0", "A1", "B0", "B1"]
    assert rows.loc["A1", "status"] == "failed" and rows.loc["B0", "status"] == "ok"
    assert list(rows.index).count("A1") == 1
