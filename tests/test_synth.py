"""Synthetic cohort generator: files, labels, ground truth, physical rendering, determinism."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from weakstil.errors import ConfigError, WeakstilError
from weakstil.synth import lattice as synth

SMALL_UM = (480.0, 384.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return synth.synth_cohort(out, n=5, seed=3, size_um=SMALL_UM, workers=2, progress=False)


def read_labels(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_cohort_layout_and_labels(cohort):
    rows = read_labels(cohort)
    assert list(rows[0]) == ["slide_id", "patient_id", "stil"]
    assert [r["slide_id"] for r in rows] == [f"SYN-{i:03d}" for i in range(5)]
    assert all(0 <= float(r["stil"]) <= 100 for r in rows)
    for r in rows:
        assert (cohort / "slides" / f"{r['slide_id']}.svs").is_file()
        assert (cohort / "truth" / f"{r['slide_id']}.npz").is_file()
    assert not list(cohort.rglob("*.partial"))


def test_label_equals_stil_recomputed_from_truth(cohort):
    for r in read_labels(cohort):
        truth = synth.load_truth(cohort / "truth" / f"{r['slide_id']}.npz")
        recomputed = 100 * truth["lymph_in_stroma"].sum() / truth["stroma"].sum()
        assert float(r["stil"]) == pytest.approx(recomputed, abs=0.01)
        assert float(truth["um_per_px"]) == synth.TRUTH_UM
        for key in ("stroma", "lymph_in_stroma", "tumour", "fat"):
            assert truth[key].shape == (24, 30) and truth[key].min() >= 0 and truth[key].max() <= 1
        assert np.all(truth["lymph_in_stroma"] <= truth["stroma"] + 1e-6)
        parts = truth["stroma"] + truth["tumour"] + truth["fat"]
        np.testing.assert_allclose(parts, truth["tissue"], atol=1e-5)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_slides_open_with_both_readers_at_their_mpp(cohort, backend):
    reader = pytest.importorskip(backend)
    mpps = set()
    for path in sorted((cohort / "slides").glob("*.svs")):
        mpp = float(synth.load_truth(cohort / "truth" / f"{path.stem}.npz")["slide_mpp"])
        mpps.add(mpp)
        slide = reader.open_slide(str(path))
        try:
            assert float(slide.properties[f"{backend}.mpp-x"]) == pytest.approx(mpp)
            assert slide.dimensions == (round(SMALL_UM[0] / mpp), round(SMALL_UM[1] / mpp))
            region = np.asarray(slide.read_region((0, 0), 0, (64, 64)))[..., :3]
            assert region.mean() > 200  # the canvas corner is background
        finally:
            slide.close()
    assert mpps == {0.25, 0.5}


def test_same_scene_at_two_resolutions_is_the_same_picture(tmp_path):
    tiffslide = pytest.importorskip("tiffslide")
    params = synth.SlideParams(seed=11, stil_target=40, size_um=SMALL_UM)
    images, labels = {}, {}
    for mpp in (0.25, 0.5):
        labels[mpp] = synth.write_slide(tmp_path / f"s{mpp}.svs", params, mpp)
        slide = tiffslide.open_slide(str(tmp_path / f"s{mpp}.svs"))
        images[mpp] = np.asarray(slide.read_region((0, 0), 0, slide.dimensions), np.float64)[..., :3]
        slide.close()
    assert labels[0.25] == labels[0.5]  # the truth lives in µm, not in pixels
    fine = images[0.25]
    down = fine.reshape(fine.shape[0] // 2, 2, fine.shape[1] // 2, 2, 3).mean(axis=(1, 3))
    assert down.shape == images[0.5].shape
    for c in range(3):
        assert np.corrcoef(down[..., c].ravel(), images[0.5][..., c].ravel())[0, 1] >= 0.95


def test_rendering_is_deterministic_and_seed_dependent():
    a = synth.render_slide(synth.SlideParams(seed=5, size_um=SMALL_UM), 0.5)
    b = synth.render_slide(synth.SlideParams(seed=5, size_um=SMALL_UM), 0.5)
    c = synth.render_slide(synth.SlideParams(seed=6, size_um=SMALL_UM), 0.5)
    assert a.dtype == np.uint8 and a.shape == (768, 960, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 10
    assert synth.plan_cohort(12, seed=4) == synth.plan_cohort(12, seed=4)
    assert synth.plan_cohort(12, seed=4) != synth.plan_cohort(12, seed=5)


def test_scene_has_tissue_blob_with_background_and_compartments():
    scene = synth.make_scene(synth.SlideParams(seed=2, stil_target=20))
    assert 0.55 <= scene.tissue.mean() <= 0.8
    assert not scene.tissue[0].any() and not scene.tissue[-1].any()
    assert np.array_equal(scene.stroma | scene.tumour | scene.fat, scene.tissue)
    assert not (scene.stroma & scene.tumour).any() and not (scene.fat & scene.tumour).any()
    assert scene.stroma.mean() > 0.1 and scene.tumour.mean() > 0.1
    rgb = synth.render_scene(scene, 0.5)
    assert rgb.shape == (3200, 4000, 3)
    assert rgb[:20, :20].min() > 220  # white background
    in_tissue = synth._resize(scene.tissue.astype(np.float32), rgb.shape[:2]) > 0.5
    assert rgb[in_tissue].mean() < 200


def test_rendered_lymphocytes_match_the_truth():
    """Dark blue pixels per truth cell follow the truth map's lymphocyte fraction."""
    params = synth.SlideParams(seed=8, stil_target=35, size_um=(640.0, 640.0))
    scene = synth.make_scene(params)
    truth = synth.scene_truth(scene)
    rgb = synth.render_scene(scene, 0.5).astype(np.float32)
    dark_blue = (rgb.sum(axis=2) < 330) & (rgb[..., 2] > rgb[..., 1] + 25)
    cells = dark_blue.reshape(40, 32, 40, 32).mean(axis=(1, 3))
    lymph = synth._block_mean(synth.lymph_cover(scene), 16)  # in and outside the stroma
    assert np.corrcoef(cells.ravel(), lymph.ravel())[0, 1] > 0.9
    assert truth["stil"] == pytest.approx(35, abs=6)


def test_tile_truth_agrees_with_the_maps():
    truth = {"stroma": np.zeros((4, 6), np.float32), "lymph_in_stroma": np.zeros((4, 6), np.float32),
             "um_per_px": np.float64(16.0)}
    truth["stroma"][1, 2] = 0.5
    truth["lymph_in_stroma"][1, 2] = 0.2
    # one truth cell = 16 µm = 32 px at 0.5 µm/px = 64 px at 0.25 µm/px
    for mpp, cell_px in ((0.5, 32), (0.25, 64)):
        coords = np.array([[2 * cell_px, cell_px], [0, 0], [2 * cell_px, 0], [100 * cell_px, 0]])
        got = synth.tile_truth(truth, coords, 2 * cell_px, mpp)
        np.testing.assert_allclose(got["stroma_fraction"], [0.125, 0, 0.125, 0])
        np.testing.assert_allclose(got["stil"][[0, 2]], [40, 40])
        assert np.isnan(got["stil"][[1, 3]]).all()
    half = synth.tile_truth(truth, [[2 * 32 + 16, 32]], 16, 0.5)  # a quarter of the cell
    np.testing.assert_allclose(half["stroma_fraction"], [0.5])


def test_tile_truth_over_whole_slide_gives_the_slide_label(cohort):
    row = read_labels(cohort)[0]
    path = cohort / "truth" / f"{row['slide_id']}.npz"
    mpp = float(synth.load_truth(path)["slide_mpp"])
    size_l0 = 112 / mpp  # 224 px at 0.5 µm/px
    ys, xs = np.mgrid[0 : round(SMALL_UM[1] / mpp) : size_l0, 0 : round(SMALL_UM[0] / mpp) : size_l0]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    tiles = synth.tile_truth(path, coords, size_l0, mpp)
    assert tiles["stil"].shape == (len(coords),)
    stroma_area = tiles["stroma_fraction"] * size_l0**2
    pooled = np.nansum(tiles["stil"] * stroma_area) / stroma_area.sum()
    assert pooled == pytest.approx(float(row["stil"]), abs=0.05)
    assert np.nanmax(tiles["stil"]) - np.nanmin(tiles["stil"]) > 5  # varies within the slide


def test_plan_spreads_labels_and_groups_patients():
    specs = synth.plan_cohort(40, seed=0)
    targets = np.array([s.params.stil_target for s in specs])
    assert len(specs) == 40 and len({s.slide_id for s in specs}) == 40
    assert (targets >= 30).mean() >= 0.25 and (targets < 10).mean() >= 0.25
    assert targets.min() >= 0.5 and targets.max() <= 92
    patients = [s.patient_id for s in specs]
    assert any(patients.count(p) == 2 for p in patients)
    assert {s.mpp for s in specs} == {0.25, 0.5}
    assert sum(s.mpp == 0.25 for s in specs) == 20
    assert synth.plan_cohort(3, size_um=600)[0].params.size_um == (600.0, 480.0)  # one number: the width


def test_rerun_keeps_finished_slides(cohort, capsys):
    svs = cohort / "slides" / "SYN-000.svs"
    before = svs.stat().st_mtime_ns
    labels = (cohort / "labels.csv").read_text()
    synth.synth_cohort(cohort, n=5, seed=3, size_um=SMALL_UM, workers=1, progress=True)
    assert svs.stat().st_mtime_ns == before
    assert (cohort / "labels.csv").read_text() == labels
    assert "5/5" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"mpps": ()}, {"mpps": (0.5, -1)}, {"size_um": (10, 10)}, {"size_um": (1, 2, 3)}]
)
def test_bad_options_are_config_errors(tmp_path, kwargs):
    with pytest.raises(ConfigError) as info:
        synth.synth_cohort(tmp_path, **{"n": 2, **kwargs}, progress=False)
    assert isinstance(info.value, (WeakstilError, ValueError)) and info.value.fix


@pytest.mark.parametrize(("family", "prefix"), [("regions", "REG"), ("voronoi", "VOR")])
def test_families_without_dark_nuclei_refuse_it_and_run_from_the_cli(tmp_path, family, prefix):
    """The held-out families have standard and hard only: other settings are ConfigErrors with the fix
    (nothing written); `weakstil synth --family F` writes PREFIX-000 …, and its help names F."""
    from importlib import import_module

    from typer.testing import CliRunner

    from synth_checks import label_rows
    from weakstil import synth as families
    from weakstil.cli import app

    with pytest.raises(ConfigError) as info:
        families.write_cohort(tmp_path / "x", family=family, n=1, setting="dark-nuclei", progress=False)
    assert family in str(info.value) and "dark-nuclei" in str(info.value)
    assert "standard, hard" in info.value.fix and "cells" in info.value.fix
    for setting in ("dark-nuclei", "extreme"):
        with pytest.raises(ConfigError):
            import_module(f"weakstil.synth.{family}").plan(1, 0, setting=setting)
    assert not (tmp_path / "x").exists()
    runner = CliRunner()
    result = runner.invoke(app, ["synth", str(tmp_path / "c"), "--family", family, "--n", "2", "--size-um", "300",
                                 "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert [r["slide_id"] for r in label_rows(tmp_path / "c")] == [f"{prefix}-000", f"{prefix}-001"]
    assert (tmp_path / "c" / "slides" / f"{prefix}-001.svs").is_file()
    bad = runner.invoke(app, ["synth", str(tmp_path / "d"), "--family", family, "--setting", "dark-nuclei",
                              "--n", "1"])
    assert bad.exit_code != 0 and family in bad.output
    helptext = runner.invoke(app, ["synth", "--help"])
    assert helptext.exit_code == 0 and family in helptext.output
