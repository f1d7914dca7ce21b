"""The held-out HOG generator (``benchmarks/heldout``): tiny standard and hard cohorts, written once.

Checks the files a benchmark reads (labels, slides, truth), the truth's invariants, determinism and
that a rerun keeps the slides already written.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

from benchmarks.heldout import MPPS, SETTINGS, write_cohort
from benchmarks.heldout.__main__ import main
from weakstil.synth.truth import load_truth, stil_from_truth

SIZE_UM = 400.0
COHORTS = {"standard": {"n": 3, "seed": 1, "workers": 1}, "hard": {"n": 2, "seed": 1, "workers": 2}}
MAPS = ("stroma", "lymph_in_stroma", "tumour", "fat", "tissue", "necrosis")
KEYS = {*MAPS, "um_per_px", "stil", "label", "slide_mpp", "plan"}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hog")
    return {setting: write_cohort(root / setting, setting=setting, size_um=SIZE_UM, progress=False, **kw)
            for setting, kw in COHORTS.items()}


def slide_ids(setting):
    return [f"HOG-{i:03d}" for i in range(COHORTS[setting]["n"])]


def read_labels(out):
    with open(out / "labels.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("setting", list(COHORTS))
def test_labels_csv_has_one_row_per_slide(cohorts, setting):
    out = cohorts[setting]
    fields, rows = read_labels(out)
    assert fields == ["slide_id", "patient_id", "stil"]
    assert [r["slide_id"] for r in rows] == slide_ids(setting)
    assert all(r["patient_id"] == r["slide_id"] for r in rows)
    assert all(0 <= float(r["stil"]) <= 100 for r in rows)
    assert sorted(p.stem for p in (out / "slides").glob("*.svs")) == slide_ids(setting)
    assert (out / "DONE").is_file() and (out / "render_log.csv").is_file()


@pytest.mark.parametrize("setting", list(COHORTS))
def test_slides_open_in_both_readers_at_the_drawn_mpp(cohorts, setting):
    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    out = cohorts[setting]
    for sid in slide_ids(setting):
        path = str(out / "slides" / f"{sid}.svs")
        mpp = float(load_truth(out / "truth" / f"{sid}.npz")["slide_mpp"])
        assert mpp in MPPS
        o, t = openslide.OpenSlide(path), tiffslide.TiffSlide(path)
        try:
            assert abs(float(o.properties["openslide.mpp-x"]) - mpp) < 1e-3
            assert abs(float(t.properties["tiffslide.mpp-x"]) - mpp) < 1e-3
            w, h = o.dimensions
            assert (w, h) == tuple(t.dimensions)
            assert abs(w * mpp - SIZE_UM) <= 1 and abs(h * mpp - 0.8 * SIZE_UM) <= 1
        finally:
            o.close()
            t.close()


@pytest.mark.parametrize("setting", list(COHORTS))
def test_truth_maps_are_consistent(cohorts, setting):
    out = cohorts[setting]
    labels = {r["slide_id"]: float(r["stil"]) for r in read_labels(out)[1]}
    for sid in slide_ids(setting):
        truth = load_truth(out / "truth" / f"{sid}.npz")
        assert KEYS <= set(truth), KEYS - set(truth)
        for key in MAPS:
            m = truth[key]
            assert m.shape == truth["stroma"].shape and m.min() >= 0 and m.max() <= 1, key
        assert np.all(truth["lymph_in_stroma"] <= truth["stroma"])
        assert truth["tissue"].max() > 0  # stroma may be empty: at 400 µm fat / tumour can fill the tissue
        assert float(truth["um_per_px"]) == 16.0
        assert stil_from_truth(truth) == pytest.approx(float(truth["stil"]), rel=1e-12, abs=1e-12)
        assert float(truth["label"]) == labels[sid]
        assert f'"setting": "{setting}"' in str(truth["plan"])


def test_the_tiny_cohorts_have_stromal_tils_and_all_three_mpps(cohorts):
    truths = [load_truth(out / "truth" / f"{sid}.npz")
              for setting, out in cohorts.items() for sid in slide_ids(setting)]
    assert max(float(t["stil"]) for t in truths) > 0
    assert {float(t["slide_mpp"]) for t in truths} == set(MPPS)


def test_same_seed_same_truth_other_seed_different(cohorts, tmp_path):
    ref = load_truth(cohorts["standard"] / "truth" / "HOG-000.npz")
    again = load_truth(write_cohort(tmp_path / "again", n=1, seed=1, size_um=SIZE_UM, workers=1, progress=False)
                       / "truth" / "HOG-000.npz")
    other = load_truth(write_cohort(tmp_path / "other", n=1, seed=2, size_um=SIZE_UM, workers=1, progress=False)
                       / "truth" / "HOG-000.npz")
    for key in ref:
        assert np.array_equal(ref[key], again[key]), key
    assert not all(np.array_equal(ref[key], other[key]) for key in MAPS)


def test_cli_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--size-um" in text and all(s in text for s in SETTINGS)


def test_a_rerun_keeps_finished_slides_and_renders_a_changed_plan_again(cohorts, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(cohorts["standard"], out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "truth").glob("*.npz")}
    (out / "truth" / "HOG-001.npz").unlink()  # an interrupted slide: written again
    write_cohort(out, setting="standard", size_um=SIZE_UM, progress=False, **COHORTS["standard"])
    after = {p.name: p.stat().st_mtime_ns for p in (out / "truth").glob("*.npz")}
    assert after["HOG-000.npz"] == before["HOG-000.npz"] and after["HOG-002.npz"] == before["HOG-002.npz"]
    assert "HOG-001.npz" in after
    assert read_labels(out) == read_labels(cohorts["standard"])
    np.testing.assert_array_equal(load_truth(out / "truth" / "HOG-001.npz")["stroma"],
                                  load_truth(cohorts["standard"] / "truth" / "HOG-001.npz")["stroma"])
    write_cohort(out, setting="standard", size_um=SIZE_UM, seed=2, n=1, progress=False)  # another plan
    assert load_truth(out / "truth" / "HOG-000.npz")["plan"] != load_truth(cohorts["standard"] / "truth" / "HOG-000.npz")["plan"]
