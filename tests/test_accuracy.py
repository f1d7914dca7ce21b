"""The accuracy benchmark's machinery on a few tiny slides per family: every figure is computed
(the probe on the MIL's folds, calibration, tile figures, transfer), not judged."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLOW = pytest.mark.slow  # writes and extracts 24 slides (~2 min on 2 shared cores)


@pytest.fixture(scope="module")
def cohort_dirs(tmp_path_factory):
    from benchmarks import bench_accuracy as acc
    from weakstil.synth import write_cohort

    root = tmp_path_factory.mktemp("acc")
    out = {}
    for family in acc.FAMILIES:  # a few slides of every family the benchmark judges on
        path = write_cohort(root / family, family=family, n=6, seed=1, size_um=480.0, workers=1,
                            progress=False)
        acc.extract(path)
        out[family] = path
    return out


@pytest.fixture(scope="module")
def cohorts(cohort_dirs):
    from benchmarks import bench_accuracy as acc

    return {family: acc.load_cohort(path) for family, path in cohort_dirs.items()}


@SLOW
def test_figures_and_probe_are_computed_for_every_family(cohorts):
    from benchmarks import bench_accuracy as acc

    plan = acc.PLANS["smoke"]
    # the robustness cohort (cells-standard's slides with hyperchromatic tumour nuclei) is planned too
    assert ("cells", "dark-nuclei", False, plan.n) in acc.cohort_plan(plan)
    assert set(cohorts) == {"lattice", "cells", "regions", "voronoi"}
    results = {}
    for family, cohort in cohorts.items():
        blend = family == "cells"  # the default (no blend) on one family, the blend on the other
        res = acc.run_recipe(cohort, {"calibrate": True, "blend": blend}, plan)
        results[family] = res
        for part in ("mil", "mil_calibrated", "probe"):
            figures = res[part]
            for name in ("r2_truth", "r2_labels", "cal_slope", "pred_sd", "label_sd"):
                assert name in figures and figures[name] is not None, (part, name)
        assert math.isfinite(res["mil"]["tile_r"]) and 0 <= res["mil"]["top_stroma_min"] <= 1
        assert res["mil"]["tile_n"] > 0 and set(res["line"]) == {"slope", "intercept", "n"}
        if blend:
            assert 0.0 <= res["blend_weight"] <= 1.0 and len(res["fold_weights"]) == plan.n_folds
            assert "r2_truth" in res["mil_blend"]  # the MIL–probe blend, cross-fitted
        else:
            assert "blend_weight" not in res
        assert np.isfinite(res["_cv"].predictions).all()
    mixed = acc.merge("mix", list(cohorts.values()))
    assert len(mixed.table) == 24 and len(mixed.bags) == 24
    moved = acc.transfer(results["lattice"], cohorts["lattice"], cohorts["cells"])
    assert {"mil", "probe", "n_little_stroma"} <= set(moved) and math.isfinite(moved["probe"]["pred_mean"])
    assert 0 <= moved["n_little_stroma"] <= len(cohorts["cells"].table)  # 480-µm slides hold about the flag's 0.125 mm²
    assert all(v is not None and v >= 0 for v in cohorts["cells"].stroma_mm2.values())
    m = moved["mil"]  # the mean error, with its standard error over the scored slides
    assert math.isclose(m["bias"], m["pred_mean"] - m["truth_mean"], abs_tol=1e-9) and m["bias_se"] > 0
    rows = acc._rows("x", results["cells"]["mil"], results["cells"]["probe"], "standard", "")
    assert {r.name for r in rows} >= {"x r2_truth", "x tile_r"} and all(r.case == "accuracy" for r in rows)


def test_transfer_reports_the_figures_without_the_little_stroma_slides():
    """Slides with too little stroma to score (the QC flag) carry a new cohort's largest errors: the
    transfer reports how many there are and the figures without them, beside the pooled ones."""
    from benchmarks import bench_accuracy as acc
    from weakstil.mil.qc_reference import LITTLE_STROMA_MM2

    truth = np.array([10.0, 20.0, 30.0, 40.0, 8.0])
    pred = truth + np.array([1.0, -1.0, 1.0, -1.0, 30.0])  # the last slide: almost no stroma, scored high
    area = [1.0, 1.0, 1.0, 1.0, LITTLE_STROMA_MM2 / 4]
    out = acc.unflagged(truth, truth, pred, area)
    assert out["n_little_stroma"] == 1
    assert out["mil_unflagged"]["bias"] == pytest.approx(0.0) and out["mil_unflagged"]["r2_truth"] > 0.95
    assert acc.slide_figures(truth, truth, pred)["bias"] == pytest.approx(6.0)  # pooled
    assert "without its 1 little-stroma slides" in acc._unflagged_note(out)
    assert acc.unflagged(truth, truth, pred, [1.0] * 4 + [None]) == {}  # no estimate: nothing to say
    assert "mil_unflagged" not in acc.unflagged(truth, truth, pred, [1.0] * 5)  # none flagged


def test_transfer_table_shows_the_bias_its_standard_error_and_the_mae():
    from benchmarks import bench_accuracy as acc

    truth = np.array([10.0, 20.0, 30.0, 60.0])
    figures = acc.slide_figures(truth, truth, truth - np.array([2.0, 4.0, 6.0, 4.0]))
    assert figures["bias"] == pytest.approx(-4.0) and figures["bias_se"] == pytest.approx(np.std([2, 4, 6, 4], ddof=1) / 2)
    old = {k: v for k, v in figures.items() if not k.startswith("bias")}  # a report written before the column
    doc = {"cv": {}, "transfer": {"default": {"a → b": {"mil": figures, "probe": figures},
                                              "c → d": {"mil": old, "probe": old}}}}
    lines = acc.results_markdown(doc).splitlines()
    assert "bias ± SE" in lines[3] and "| MAE [probe] |" in lines[3]
    row = next(x for x in lines if x.startswith("| a → b"))
    assert "| -4.0 ± 0.8 |" in row and "| 4.0 [4.0] |" in row  # MAE of errors 2, 4, 6, 4
    assert "| – ± – |" in next(x for x in lines if x.startswith("| c → d"))
    no_mae = {k: v for k, v in old.items() if k != "mae_truth"}  # a report written before the MAE column
    doc["transfer"]["default"]["e → f"] = {"mil": no_mae, "probe": no_mae}
    assert "| – [–] |" in next(x for x in acc.results_markdown(doc).splitlines() if x.startswith("| e → f"))


def test_a_second_run_of_the_day_moves_the_first_aside_instead_of_overwriting_it(tmp_path):
    import os

    from benchmarks import bench_accuracy as acc

    path = tmp_path / "2026-12-06-accuracy.json"
    assert acc.keep_earlier_run(path) is None  # nothing to keep
    path.write_text("first")
    os.utime(path, (1_796_000_000, 1_796_000_000))
    aside = acc.keep_earlier_run(path)
    assert not path.exists() and aside.read_text() == "first" and aside.name.startswith("2026-12-06-accuracy-")
    path.write_text("second")
    os.utime(path, (1_796_000_000, 1_796_000_000))  # the same second: a new name all the same
    again = acc.keep_earlier_run(path)
    assert again != aside and again.read_text() == "second" and aside.read_text() == "first"


def test_features_of_an_older_morphometry_are_set_aside_and_extracted_again(tmp_path):
    """After a MORPH_ARCH bump the benchmark must not read the old features as if they were new."""
    import json

    from benchmarks import bench_accuracy as acc
    from weakstil.embed.encoders import get_encoder_spec

    cohort = tmp_path / "cells-hard"
    (cohort / "labels.csv").parent.mkdir(parents=True)
    (cohort / "labels.csv").write_text("slide_id,patient_id,stil\n")
    current = get_encoder_spec(acc.encoder_name()).arch
    for name, arch in (("old.zarr", "resnet18+stainmorph.v1"), ("new.zarr", current)):
        store = acc.features_dir(cohort) / name
        (store / "slides" / "S1").mkdir(parents=True)
        (store / "slides" / "S1" / "zarr.json").write_text("{}")
        (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {
            "encoder": {"name": acc.encoder_name(), "arch": arch}}}))
    assert acc._ready(cohort, 1) and not acc._ready(cohort, 2)  # only the current store's slide counts
    moved = acc.set_aside_outdated(cohort)
    assert [p.name for p in moved] == ["old.zarr.resnet18+stainmorph.v1.old"]
    assert sorted(p.name for p in acc.features_dir(cohort).iterdir()) == ["new.zarr", moved[0].name]
    assert acc.set_aside_outdated(cohort) == []  # nothing more to move


def test_a_run_rewriting_its_report_after_each_cohort_moves_only_the_earlier_run_aside(tmp_path):
    from benchmarks import bench_accuracy as acc

    path = tmp_path / "2026-12-06-accuracy.json"
    path.write_text("earlier run")
    for cohort in ("lattice-standard", "cells-standard", "lattice-hard"):
        tmp = tmp_path / "report.partial"
        tmp.write_text(cohort)
        acc.install_report(tmp, path)
    assert path.read_text() == "lattice-hard"
    kept = sorted(p.name for p in tmp_path.iterdir() if p != path)
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == "earlier run"


def test_the_morphometry_readings_are_judged_against_the_truth():
    """``benchmarks.bench_morph.figures``: the stroma estimate's tile r, its mean on tumour tiles and the
    slide's pixel-read sTIL% against the truth, on arrays whose answers are known."""
    from benchmarks.bench_morph import figures

    true_stroma = np.array([1.0, 0.8, 0.1, 0.0, 0.9, 0.2])
    true_tumour = 1 - true_stroma
    slide_of = np.array([0, 0, 0, 1, 1, 1])
    exact = figures(true_stroma, np.array([0.2, 0.2, 0.9, 0.9, 0.5, 0.5]), true_stroma, true_tumour,
                    slide_of, np.array([20.0, 50.0]))
    assert exact["stroma_r"] == pytest.approx(1.0) and exact["est_on_tumour"] == pytest.approx(0.1)
    # tumour read as stroma: the estimate on tumour tiles rises and the slides' reading follows it
    wrong = figures(np.full(6, 0.9), np.array([0.2, 0.2, 0.9, 0.9, 0.5, 0.5]), true_stroma, true_tumour,
                    slide_of, np.array([20.0, 50.0]))
    assert wrong["est_on_tumour"] == pytest.approx(0.9) and math.isnan(wrong["stroma_r"])


@SLOW
def test_the_morphometry_recomputed_on_the_cached_tiles_matches_the_cache(cohort_dirs):
    """Re-rendering a cache's tiles (its coordinates and stain estimate) and running this working
    tree's morphometry gives the cached numbers back, to float16 rounding: the case judges a changed
    morphometry on exactly the tiles the extractor saw."""
    from benchmarks.bench_morph import cohort_figures

    got = cohort_figures(cohort_dirs["voronoi"])
    assert set(got["now"]) == set(got["cache"]) == {"pale", "wide"}
    for rule, now in got["now"].items():
        for name, value in now.items():
            cached = got["cache"][rule][name]
            assert (math.isnan(value) and math.isnan(cached)) or value == pytest.approx(cached, abs=0.01), (rule, name)


@SLOW
def test_the_held_out_case_cross_validates_and_scores_a_new_seed(tmp_path, monkeypatch):
    """``--only heldout`` on the smoke plan: both held-out cohorts cross-validated beside the probe (a
    second recipe beside the default, in the report only), the new-seed transfer computed;
    cross-family transfer skipped without the accuracy cohorts."""
    from benchmarks import bench_heldout
    from benchmarks.common import MODES

    monkeypatch.setenv("WEAKSTIL_BENCH_DIR", str(tmp_path))
    monkeypatch.setenv("WEAKSTIL_ACCURACY_RECIPES", "stroma-floor-0.1")  # a second recipe beside the default
    doc = {}
    monkeypatch.setenv("WEAKSTIL_HELDOUT_REPORT", "1")  # the smoke plan writes its report only when asked
    monkeypatch.setattr(bench_heldout, "write_report", lambda d, rows: doc.update(d))
    rows = bench_heldout.run(MODES["smoke"], "cpu")
    assert set(doc["cv"]) == {"default", "stroma-floor-0.1"} and set(doc["cv"]["stroma-floor-0.1"]) == {"ho-standard", "ho-hard"}
    assert "ho-hard → ho-hard-new" in doc["transfer"]["stroma-floor-0.1"]
    names = {r.name for r in rows}
    assert {"ho-standard CV r2_truth", "ho-hard CV r2_truth", "ho-hard → ho-hard-new r2_truth"} <= names
    assert all(r.case == "heldout" for r in rows)
    r2 = next(r for r in rows if r.name == "ho-standard CV r2_truth")
    assert r2.reference == "probe" and r2.ref_value is not None and math.isfinite(r2.value)
    assert not any("lattice" in r.name for r in rows)  # no accuracy cohorts in this bench folder
    assert sorted(p.name for p in tmp_path.glob("heldout-smoke/*")) == ["ho-hard", "ho-hard-new", "ho-standard"]


def test_the_held_out_case_names_an_unknown_recipe_before_writing_anything(tmp_path, monkeypatch):
    from benchmarks import bench_heldout
    from benchmarks.common import MODES

    monkeypatch.setenv("WEAKSTIL_BENCH_DIR", str(tmp_path))
    monkeypatch.setenv("WEAKSTIL_ACCURACY_RECIPES", "default,no-such-recipe")
    written = []
    monkeypatch.setattr(bench_heldout, "prepare", lambda *a, **k: written.append(a) or {})
    with pytest.raises(ValueError, match="no-such-recipe.*known: default"):
        bench_heldout.run(MODES["smoke"], "cpu")
    assert written == []  # refused before a slide is written
