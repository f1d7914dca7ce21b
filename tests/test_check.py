"""check_slides: one row per slide, never raising on a bad one; the CSV and the rich table."""

from __future__ import annotations

import csv

import pytest
from conftest import TINY_MPP, TINY_SIZE
from rich.console import Console

import weakstil.wsi.check as check_mod
from weakstil.errors import MppCsvError
from weakstil.wsi.check import CHECK_COLUMNS, check_slides, check_table, write_check_csv
from weakstil.wsi.slide import find_slides
from weakstil.wsi.tissue import TissueParams

FAST = TissueParams(thumb_mpp=4.0)


@pytest.fixture(scope="module")
def rows(slide_folder, bad_slides):
    paths = find_slides(slide_folder) + find_slides(bad_slides.folder)
    return check_slides(paths, tissue=FAST)


def test_every_slide_gets_a_row(rows, slide_folder, bad_slides):
    assert len(rows) == 2 + len(bad_slides.expected)
    by_id = {row.slide_id: row for row in rows}
    for path, error in bad_slides.expected.items():
        row = by_id[path.stem]
        assert row.status == "failed" and not row.ok
        assert row.reason.startswith(error.__name__) and row.fix


def test_ok_rows(rows):
    good = [row for row in rows if row.ok]
    assert [row.slide_id for row in good] == ["a", "b"]
    for row in good:
        assert (row.width, row.height, row.levels) == (*TINY_SIZE, 2)
        assert (row.mpp, row.mpp_source, row.vendor, row.backend) == (TINY_MPP, "openslide.mpp", "aperio", "openslide")
        assert row.objective_power == 40
        assert 0.3 < row.tissue_fraction < 0.45  # the ellipse covers 36 %
        assert row.reason == "" and row.fix == ""


def test_mpp_csv_and_fallback(bad_slides, tiny_slide, tmp_path):
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\nno_mpp,0.5\ntiny,0.3\n")
    rows = check_slides([bad_slides.no_mpp, tiny_slide, bad_slides.anisotropic], mpp_csv=mpp_csv, tissue=FAST)
    assert [(r.status, r.mpp, r.mpp_source) for r in rows] == [
        ("ok", 0.5, "mpp-csv"), ("ok", 0.3, "mpp-csv"), ("failed", None, None)]
    rows = check_slides([bad_slides.no_mpp, bad_slides.anisotropic], mpp=0.4, tissue=FAST)
    assert [(r.status, r.mpp, r.mpp_source) for r in rows] == [("ok", 0.4, "mpp-argument")] * 2
    rows = check_slides([tiny_slide], mpp=0.4, mpp_override=True, mpp_by_slide={"other": 1.0}, tissue=FAST)
    assert (rows[0].mpp, rows[0].mpp_source) == (0.4, "mpp-override")


def test_bad_mpp_csv_raises_before_reading(tmp_path, tiny_slide):
    bad = tmp_path / "mpp.csv"
    bad.write_text("slide_id,mpp\ntiny,fast\n")
    with pytest.raises(MppCsvError):
        check_slides([tiny_slide], mpp_csv=bad)


def test_unexpected_errors_are_recorded(tiny_slide, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(check_mod, "open_slide", broken)
    [row] = check_slides([tiny_slide])
    assert row.status == "failed" and row.reason == "RuntimeError: backend exploded" and row.fix


def test_outputs(tiny_slide, bad_slides, tmp_path):
    out_csv, qc_dir = tmp_path / "out" / "check.csv", tmp_path / "qc"
    rows = check_slides([tiny_slide, bad_slides.empty], tissue=FAST, out_csv=out_csv, qc_dir=qc_dir)
    with out_csv.open(newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0].keys()) == CHECK_COLUMNS
    assert [(r["slide_id"], r["status"]) for r in table] == [("tiny", "ok"), ("empty", "failed")]
    assert table[1]["mpp"] == "" and table[1]["reason"].startswith("EmptySlideFileError")
    assert sorted(p.name for p in qc_dir.iterdir()) == ["tiny.png"]
    assert sorted(p.name for p in out_csv.parent.iterdir()) == ["check.csv"]  # nothing half-written
    write_check_csv(rows[:1], out_csv)  # replaces
    assert len(out_csv.read_text().splitlines()) == 2


def test_check_table(rows):
    console = Console(record=True, width=200)
    console.print(check_table(rows))
    text = console.export_text()
    for row in rows:
        assert row.slide_id in text
    assert "failed" in text and "TruncatedSlideError" in text
