"""The third synthetic family (``regions``): files, truth, readers, determinism, resume and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weakstil import synth
from weakstil.synth import regions
from weakstil.synth.truth import TRUTH_KEYS, load_truth, stil_from_truth
from synth_checks import check_cohort_files, check_readers_agree

SIZE_UM = 300.0  # canvas 300 x 240 µm
MAPS = TRUTH_KEYS + ("necrosis",)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regions") / "cohort"
    return synth.write_cohort(out, family="regions", n=3, seed=4, setting="standard", size_um=SIZE_UM,
                              workers=2, progress=False)


def _level0(path: Path) -> np.ndarray:
    tiffslide = pytest.importorskip("tiffslide")
    slide = tiffslide.open_slide(str(path))
    try:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions, as_array=True))[..., :3]
    finally:
        slide.close()


def test_registry_settings_and_prefix():
    assert "regions" in synth.FAMILIES
    assert synth.FAMILY_SETTINGS["regions"] == ("standard", "hard")
    assert synth.DEFAULT_PREFIX["regions"] == "REG"


def test_labels_csv_matches_the_slides_and_truth(cohort):
    for r in check_cohort_files(cohort, "REG", 3):
        label = float(r["stil"])
        assert label % 5 == 0 or (label < 10 and label == int(label))


def test_truth_maps_have_the_documented_keys_and_stil(cohort):
    shape = (int(np.ceil(0.8 * SIZE_UM / 16)), int(np.ceil(SIZE_UM / 16)))
    stils = []
    for path in sorted((cohort / "truth").glob("*.npz")):
        truth = load_truth(path)
        for key in MAPS:
            assert truth[key].shape == shape and truth[key].dtype == np.float32, key
        assert float(truth["um_per_px"]) == 16.0
        assert float(truth["slide_mpp"]) in (0.25, 0.5)
        assert float(truth["stil"]) == pytest.approx(stil_from_truth(truth), abs=1e-9)
        assert np.all(truth["lymph_in_stroma"] <= truth["stroma"] + 1e-6)
        # regions are disjoint: stroma + tumour + fat + necrosis ≤ tissue (vessel lumens are the rest)
        parts = truth["stroma"] + truth["tumour"] + truth["fat"] + truth["necrosis"]
        assert np.all(parts <= truth["tissue"] + 1e-5) and truth["tissue"].sum() > 0
        assert str(truth["plan"]).startswith("{")
        stils.append(float(truth["stil"]))
    assert max(stils) > 0


def test_slides_open_in_openslide_and_tiffslide_alike(cohort, tmp_path):
    paths = sorted((cohort / "slides").glob("*.svs"))
    mpps = [float(load_truth(cohort / "truth" / f"{p.stem}.npz")["slide_mpp"]) for p in paths]
    # and one slide big enough for a reduced level (640 µm at 0.25 µm/px: 2560 x 2048, then 640 x 512)
    spec = next(s for s in regions.plan(2, 0, size_um=(640.0, 512.0)) if s.mpp == 0.25)
    regions.write_slide(spec, tmp_path / "big.svs", tmp_path / "big.npz")
    counts = check_readers_agree(paths + [tmp_path / "big.svs"], mpps + [spec.mpp])
    assert counts[-1] == ((2560, 2048), 2)


def test_same_seed_same_slide_other_seed_differs(tmp_path):
    first = regions.plan(2, 7, size_um=(SIZE_UM, 0.8 * SIZE_UM))
    again = regions.plan(2, 7, size_um=(SIZE_UM, 0.8 * SIZE_UM))
    other = regions.plan(2, 8, size_um=(SIZE_UM, 0.8 * SIZE_UM))
    assert repr(first[0]) == repr(again[0]) and repr(first[0]) != repr(other[0])
    out = {}
    for name, spec in (("a", first[0]), ("b", again[0]), ("c", other[0])):
        label = regions.write_slide(spec, tmp_path / f"{name}.svs", tmp_path / f"{name}.npz")[1]
        out[name] = (label, float(load_truth(tmp_path / f"{name}.npz")["stil"]), _level0(tmp_path / f"{name}.svs"))
    assert out["a"][0] == out["b"][0] and out["a"][1] == out["b"][1]
    np.testing.assert_array_equal(out["a"][2], out["b"][2])
    assert out["a"][1] != out["c"][1]
    assert out["a"][2].shape != out["c"][2].shape or not np.array_equal(out["a"][2], out["c"][2])


def test_rerun_keeps_finished_slides(cohort):
    slides = sorted((cohort / "slides").glob("*.svs"))
    before = {p.name: p.stat().st_mtime_ns for p in slides}
    labels = (cohort / "labels.csv").read_text()
    removed = cohort / "slides" / "REG-001.svs"
    removed.unlink()
    synth.write_cohort(cohort, family="regions", n=3, seed=4, setting="standard", size_um=SIZE_UM,
                       workers=1, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in sorted((cohort / "slides").glob("*.svs"))}
    assert set(after) == set(before)
    assert after["REG-000.svs"] == before["REG-000.svs"] and after["REG-002.svs"] == before["REG-002.svs"]
    assert after["REG-001.svs"] != before["REG-001.svs"]  # the missing one was written again ...
    assert (cohort / "labels.csv").read_text() == labels  # ... to the same label
