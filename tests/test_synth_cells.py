"""The second synthetic family (``cells``), the family registry and lattice's hard setting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from weakstil import synth
from weakstil.errors import ConfigError, WeakstilError
from weakstil.synth import cells, lattice, optics
from weakstil.synth.truth import load_truth, tile_truth
from synth_checks import check_cohort_files, label_rows

SMALL_UM = (480.0, 384.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cells") / "cohort"
    return synth.write_cohort(out, family="cells", n=4, seed=3, setting="hard", size_um=SMALL_UM,
                              workers=2, progress=False)


def test_cells_cohort_files_truth_and_noisy_labels(cohort):
    for r in check_cohort_files(cohort, "CEL", 4, patient_per_slide=False):
        truth = load_truth(cohort / "truth" / f"{r['slide_id']}.npz")
        assert truth["stroma"].shape == (24, 30) and float(truth["um_per_px"]) == 16.0
        assert np.all(truth["lymph_in_stroma"] <= truth["stroma"] + 1e-6)
        parts = truth["stroma"] + truth["tumour"] + truth["fat"] + truth["necrosis"]
        np.testing.assert_allclose(parts, truth["tissue"], atol=1e-5)
        true = 100 * truth["lymph_in_stroma"].sum() / truth["stroma"].sum()
        assert float(truth["stil"]) == pytest.approx(true, abs=0.01)
        label = float(r["stil"])
        assert label % 5 == 0 or (label < 10 and label == int(label))  # a pathologist's rounding
        assert abs(label - true) <= 10 + 0.5 * true


def test_cells_slides_open_with_their_mpp(cohort):
    tiffslide = pytest.importorskip("tiffslide")
    for path in sorted((cohort / "slides").glob("*.svs")):
        mpp = float(load_truth(cohort / "truth" / f"{path.stem}.npz")["slide_mpp"])
        slide = tiffslide.open_slide(str(path))
        try:
            assert slide.dimensions == (round(SMALL_UM[0] / mpp), round(SMALL_UM[1] / mpp))
        finally:
            slide.close()


def test_truth_follows_the_target_and_the_placed_lymphocytes():
    for target in (5.0, 40.0, 75.0):
        scene = cells.make_scene(cells.CellSlide(seed=4, stil_target=target, size_um=(800.0, 640.0)))
        truth = cells.scene_truth(scene)
        assert float(truth["stil"]) == pytest.approx(target, abs=4 + 0.1 * target)
        # footprint area of the stromal lymphocytes, counted directly, matches the map
        area = len(scene.stromal_lymph) * np.pi * (cells.LYMPH_FOOTPRINT_UM / 2) ** 2
        mapped = truth["lymph_in_stroma"].sum() * 16.0**2
        assert mapped == pytest.approx(area, rel=0.1)


def test_hard_setting_has_intratumoral_lymphocytes_outside_the_truth():
    p = cells.CellSlide(seed=9, stil_target=10, tumour_fraction=0.7, intratumoral=0.3,
                        size_um=(800.0, 640.0))
    scene = cells.make_scene(p)
    labels = scene.labels
    tissue = (labels != cells.BG).sum()
    tumour = ((labels == cells.TUMOUR) | (labels == cells.LUMEN) | (labels == cells.NECROSIS)).sum()
    assert tumour / tissue == pytest.approx(0.7, abs=0.1)
    lymph_xy = scene.cells["lymph"][0]
    inside = cells._at(labels, lymph_xy) == cells.TUMOUR
    assert inside.sum() > len(scene.stromal_lymph)  # dense TILs in the nests ...
    assert float(cells.scene_truth(scene)["stil"]) < 16  # ... that do not raise sTIL%


def test_dark_nuclei_setting_darkens_tumour_nuclei_of_the_same_slides():
    """``dark-nuclei`` is the standard plan (same seeds, targets, truth) with a share of the tumour
    nuclei redrawn solid and as dark as lymphocytes; standard slides stay exactly as before."""
    standard = cells.plan(6, seed=1, size_um=SMALL_UM)
    dark = cells.plan(6, seed=1, setting="dark-nuclei", size_um=SMALL_UM)
    assert [s.params.seed for s in standard] == [s.params.seed for s in dark]
    assert all(s.params.hyperchromatic == 0 for s in standard)
    assert all(0.5 <= s.params.hyperchromatic <= 1.0 for s in dark)
    assert "hyperchromatic" not in repr(standard[0].params)  # cohorts written before it still resume
    p = cells.CellSlide(seed=5, stil_target=20, tumour_fraction=0.5, size_um=(800.0, 640.0))
    pale, hyper = cells.make_scene(p), cells.make_scene(replace(p, hyperchromatic=0.8))
    n_tumour = len(pale.cells["tumour"][0])
    assert "tumour_dark" not in pale.cells
    n_dark = len(hyper.cells["tumour_dark"][0])
    assert n_dark + len(hyper.cells["tumour"][0]) == n_tumour and 0.7 < n_dark / n_tumour < 0.9
    strength = hyper.cells["tumour_dark"][2]  # far darker than the vesicular ones, as dark as lymphocytes
    assert strength.min() > pale.cells["tumour"][2].max()
    assert abs(strength.mean() - hyper.cells["lymph"][2].mean()) < 0.15
    np.testing.assert_array_equal(pale.cells["lymph"][0], hyper.cells["lymph"][0])
    assert float(cells.scene_truth(hyper)["stil"]) == float(cells.scene_truth(pale)["stil"])
    # drawn solid, without the vesicular rim: the centre is as dark as the edge
    kern = optics.kernel_bank("tumour_dark", 0.5)[0]
    c = kern.shape[0] // 2
    assert kern[c - 1 : c + 2, c - 1 : c + 2].mean() > 0.8
    with pytest.raises(ConfigError) as info:  # lattice has no such setting: the fix names the family
        synth.write_cohort(Path("unused"), family="lattice", n=1, setting="dark-nuclei", progress=False)
    assert "cells" in info.value.fix


def test_render_is_deterministic_and_stain_differs_per_slide(tmp_path):
    spec = cells.plan(2, seed=1, size_um=SMALL_UM)
    a1 = spec[0]
    cells.write_slide(a1, tmp_path / "a.svs", tmp_path / "a.npz")
    cells.write_slide(a1, tmp_path / "b.svs", tmp_path / "b.npz")
    assert (tmp_path / "a.svs").read_bytes() == (tmp_path / "b.svs").read_bytes()
    s1, s2 = (optics.draw_stain(np.random.default_rng(k), 2.0) for k in (1, 2))
    assert not np.allclose(s1.h_vec, s2.h_vec)
    assert np.linalg.norm(s1.h_vec) == pytest.approx(1.0)


def test_pathologist_label_rounds_and_grows_noisy():
    rng = np.random.default_rng(0)
    low = np.array([cells.pathologist_label(rng, 5.0) for _ in range(400)])
    high = np.array([cells.pathologist_label(rng, 60.0) for _ in range(400)])
    assert np.all(high % 5 == 0) and set(np.unique(high % 10)) == {0.0, 5.0}
    assert high.std() > 2 * low.std()
    assert abs(high.mean() - 60) < 2 and abs(low.mean() - 5) < 1


def test_registry_and_bad_names(tmp_path):
    assert synth.FAMILIES == ("lattice", "cells", "regions", "voronoi")
    for kwargs in ({"family": "nope"}, {"family": "cells", "setting": "extreme"}):
        with pytest.raises(ConfigError) as info:
            synth.write_cohort(tmp_path, n=1, progress=False, **kwargs)
        assert isinstance(info.value, (WeakstilError, ValueError)) and info.value.fix
    root = synth.write_cohort(tmp_path / "lat", family="lattice", n=2, seed=0, setting="hard",
                              size_um=SMALL_UM, workers=1, progress=False)
    assert len(label_rows(root)) == 2


def test_lattice_hard_plan_keeps_targets_and_standard_is_unchanged():
    standard = lattice.plan_cohort(8, seed=2)
    hard = lattice.plan_cohort(8, seed=2, setting="hard")
    assert [s.params.stil_target for s in standard] == [s.params.stil_target for s in hard]
    assert all(s.params.tumour_share is None and s.params.stain_scale == 1.0 for s in standard)
    shares = [s.params.tumour_share for s in hard]
    assert all(0.1 <= v <= 0.85 for v in shares) and all(s.params.stain_scale == 2.0 for s in hard)
    # the standard stain draw is the one lattice made before the hard setting existed
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    old = np.stack([
        np.clip(246 + rng_b.uniform(-4, 4) + rng_b.uniform(-2, 2, 3), 0, 255),
        np.clip(lattice._H_OD + rng_b.normal(0, 0.05, 3), 0.05, None) * rng_b.uniform(0.8, 1.2),
        np.clip(lattice._E_OD + rng_b.normal(0, 0.05, 3), 0.03, None) * rng_b.uniform(0.7, 1.25),
    ])
    np.testing.assert_allclose(lattice._stain(rng_a, 1.0), old, rtol=1e-12)


def test_lattice_hard_slide_has_intratumoral_lymphocytes():
    base = lattice.SlideParams(seed=3, stil_target=10, size_um=(640.0, 512.0))
    from dataclasses import replace

    plain = lattice.make_scene(replace(base, tumour_share=0.6))
    hard = lattice.make_scene(replace(base, tumour_share=0.6, intratumoral=0.3))
    assert plain.tumour.mean() / plain.tissue.mean() == pytest.approx(0.6, abs=0.05)
    n_plain, n_hard = (len(s.nuclei["lymph"].xy_um) for s in (plain, hard))
    assert n_hard > n_plain + 100
    t_plain = float(lattice.scene_truth(plain)["stil"])
    assert float(lattice.scene_truth(hard)["stil"]) == pytest.approx(t_plain, abs=2)


def test_tile_truth_is_shared_by_both_families(cohort):
    assert lattice.tile_truth is tile_truth
    path = cohort / "truth" / "CEL-000.npz"
    mpp = float(load_truth(path)["slide_mpp"])
    size_l0 = 112 / mpp
    ys, xs = np.mgrid[0 : round(SMALL_UM[1] / mpp) : size_l0, 0 : round(SMALL_UM[0] / mpp) : size_l0]
    tiles = tile_truth(path, np.stack([xs.ravel(), ys.ravel()], 1), size_l0, mpp)
    area = tiles["stroma_fraction"] * size_l0**2
    pooled = np.nansum(tiles["stil"] * area) / area.sum()
    assert pooled == pytest.approx(float(load_truth(path)["stil"]), abs=0.05)


def test_cli_synth_family_and_setting(tmp_path):
    from typer.testing import CliRunner

    from weakstil.cli import app

    result = CliRunner().invoke(app, ["synth", str(tmp_path / "c"), "--family", "cells", "--setting", "hard",
                                      "--n", "1", "--size-um", "320", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c" / "slides" / "CEL-000.svs").is_file()
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "d"), "--family", "nope", "--n", "1"])
    assert bad.exit_code != 0 and "lattice" in bad.output
