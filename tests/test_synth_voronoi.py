"""The fourth synthetic family (``voronoi``): files, readers, truth, determinism, the hard setting's
intratumoral lymphocytes, settings and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from weakstil import synth
from weakstil.synth import voronoi, voronoi_render
from weakstil.synth.truth import TRUTH_KEYS, load_truth
from synth_checks import check_cohort_files, check_readers_agree

SIZE_UM = 320.0  # canvas 320 x 256 µm
MAPS = TRUTH_KEYS + ("necrosis",)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("voronoi") / "cohort"
    return synth.write_cohort(out, family="voronoi", n=3, seed=2, setting="standard", size_um=SIZE_UM,
                              workers=2, progress=False)


def test_registry_settings_and_prefix():
    assert "voronoi" in synth.FAMILIES
    assert synth.FAMILY_SETTINGS["voronoi"] == ("standard", "hard")
    assert synth.DEFAULT_PREFIX["voronoi"] == "VOR"


def test_labels_csv_matches_the_slides_and_truth(cohort):
    for r in check_cohort_files(cohort, "VOR", 3):
        assert float(r["stil"]) == int(float(r["stil"]))


def test_truth_maps_and_stil(cohort):
    shape = (int(np.ceil(0.8 * SIZE_UM / 16)), int(np.ceil(SIZE_UM / 16)))
    for path in sorted((cohort / "truth").glob("*.npz")):
        truth = load_truth(path)
        for key in MAPS:
            assert truth[key].shape == shape and truth[key].dtype == np.float32, key
        assert float(truth["um_per_px"]) == 16.0
        assert float(truth["slide_mpp"]) in (0.25, 0.5)
        stroma = truth["stroma"].astype(np.float64).sum()
        assert stroma > 0
        expected = 100 * truth["lymph_in_stroma"].astype(np.float64).sum() / stroma
        assert float(truth["stil"]) == pytest.approx(expected, rel=1e-5)  # float32 sums, as the generator
        assert np.all(truth["lymph_in_stroma"] <= truth["stroma"] + 1e-6)
        parts = truth["stroma"] + truth["tumour"] + truth["fat"] + truth["necrosis"]
        assert np.allclose(parts, truth["tissue"], atol=1e-5)  # vessel lumens are stroma here
        assert '"family": "voronoi"' in str(truth["plan"])


def test_slides_open_in_openslide_and_tiffslide_with_every_level(cohort, tmp_path):
    paths = sorted((cohort / "slides").glob("*.svs"))
    mpps = [float(load_truth(cohort / "truth" / f"{p.stem}.npz")["slide_mpp"]) for p in paths]
    # one slide big enough for a reduced level (640 µm at 0.25 µm/px: 2560 x 2048, then 640 x 512)
    spec = voronoi.plan(1, 0, size_um=(640.0, 512.0), mpps=(0.25,))[0]
    voronoi.write_slide(spec, tmp_path / "big.svs", tmp_path / "big.npz")
    counts = check_readers_agree(paths + [tmp_path / "big.svs"], mpps + [spec.mpp])
    assert counts[-1] == ((2560, 2048), 2)
    assert {c[0] for c in counts[:-1]} <= {(640, 512), (1280, 1024)}


def test_same_seed_same_slide_other_seed_differs(tmp_path):
    size = (SIZE_UM, 0.8 * SIZE_UM)
    first = voronoi.plan(2, 7, size_um=size, mpps=(0.5,))
    again = voronoi.plan(2, 7, size_um=size, mpps=(0.5,))
    other = voronoi.plan(2, 8, size_um=size, mpps=(0.5,))
    assert repr(first[0]) == repr(again[0]) and repr(first[0]) != repr(other[0])
    out = {}
    for name, spec in (("a", first[0]), ("b", again[0]), ("c", other[0])):
        label = voronoi.write_slide(spec, tmp_path / f"{name}.svs", tmp_path / f"{name}.npz")[1]
        truth = load_truth(tmp_path / f"{name}.npz")
        out[name] = (label, float(truth["stil"]), truth["lymph_in_stroma"])
    assert out["a"][:2] == out["b"][:2]
    np.testing.assert_array_equal(out["a"][2], out["b"][2])
    assert out["a"][1] != out["c"][1]


def test_scenes_do_not_depend_on_n_labels_do():
    few, many = voronoi.plan(3, 5, size_um=(400.0, 320.0)), voronoi.plan(30, 5, size_um=(400.0, 320.0))
    assert [(s.mpp, s.index, s.size_um) for s in few] == [(s.mpp, s.index, s.size_um) for s in many[:3]]
    assert few[0].label_draws != many[0].label_draws  # the label stream is seeded with n


def _intratumoral(setting: str, seed: int, monkeypatch) -> tuple[float, dict, float]:
    """Render the first slide of ``setting`` whose intratumoral draw is at least 0.08 (hard) or the
    first slide (standard), capturing the lymphocyte bodies: (share of tumour covered by lymphocyte
    bodies, truth, stil)."""
    seen = {}
    paint = voronoi_render._paint_inflammatory

    def spy(rng, cv, p, *args):
        seen["mask"] = paint(rng, cv, p, *args)
        seen["cv"], seen["p"] = cv, p
        return seen["mask"]

    monkeypatch.setattr(voronoi_render, "_paint_inflammatory", spy)
    hard = setting == "hard"
    for spec in voronoi.plan(12, seed, setting=setting, size_um=(400.0, 320.0), mpps=(0.5,)):
        rng = voronoi._slide_rng(spec.seed, spec.index, setting, 400.0)
        rng.uniform()
        if not hard or voronoi_render._slide_params(rng, hard)["itil"] >= 0.08:
            break
    rng = voronoi._slide_rng(spec.seed, spec.index, setting, 400.0)
    rng.uniform()
    out = voronoi_render.render(rng, hard, 320.0, 400.0)
    cv, mask = seen["cv"], seen["mask"]
    assert cv.tumour.sum() > 1000
    return float((mask & cv.tumour).sum() / cv.tumour.sum()), out.truth, out.stil


def test_hard_puts_lymphocytes_in_tumour_that_do_not_count(monkeypatch):
    cover, truth, stil = _intratumoral("hard", 0, monkeypatch)
    assert cover > 0.1  # lymphocyte bodies cover a visible share of the tumour ...
    stroma = truth["stroma"].sum()
    assert stil == pytest.approx(100 * truth["lymph_in_stroma"].sum() / stroma, rel=1e-6)
    # ... and none of it is in the truth: lymph_in_stroma is zero wherever there is no stroma
    assert np.all(truth["lymph_in_stroma"][truth["stroma"] == 0] == 0)
    std_cover, _, _ = _intratumoral("standard", 0, monkeypatch)
    assert std_cover < cover / 2
