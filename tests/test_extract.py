"""Acceptance of the foundation (issue 2): synth → check → extract, resuming, bad input, resolution.

One tiny synthetic cohort (6 slides, 600 µm wide, a mix of 0.25 and 0.5 µm/px scans) is written
once per module with `weakstil synth`; every test copies what it changes. The CLI runs in-process
(typer's CliRunner) except where a real process is needed (SIGKILL).

The OpenSlide/TiffSlide pixel contract is in tests/test_slide.py (``TestBackendContract``: both
backends against the pixels tifffile decodes, same geometry, thumbnails identical).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.embed.cache import FeatureCache
from weakstil.embed.encoders import MORPH_DIM
from weakstil.synth.lattice import plan_cohort

N, SEED, SIZE_UM = 6, 3, 600
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}  # rich wraps tables at 80 columns without a terminal


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output with runs of whitespace (table wrapping) collapsed."""
    return " ".join(text.split())


def store_of(features: Path) -> FeatureCache:
    return FeatureCache.find(features)


def complete_groups(features: Path) -> dict[str, bool]:
    """{slide_id: complete} for every group folder listed under slides/ (read from zarr.json)."""
    out = {}
    for meta in Path(features).glob("*.zarr/slides/*/zarr.json"):
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        out[meta.parent.name] = attrs.get("complete") is True
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    result = invoke("synth", root, "--n", N, "--seed", SEED, "--size-um", SIZE_UM, "--workers", 2)
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def first_extract(cohort, tmp_path_factory):
    """`weakstil extract` twice on the cohort: timings, outputs and the cache (read-only for tests)."""
    from weakstil.embed.encoders import create_encoder

    create_encoder("resnet18-random")  # import torch/timm before timing: compare work, not imports
    out = tmp_path_factory.mktemp("extract")
    config = out / "weakstil.yaml"
    config.write_text(yaml.safe_dump({"extract": {"batch_size": 16}}))
    features = out / "features"
    args = ["extract", cohort / "slides", "--features", features, "--quiet", "--config", config]
    t0 = time.perf_counter()
    first = invoke(*args)
    t1 = time.perf_counter()
    stamps = {p: p.stat().st_mtime_ns for p in features.glob("*.zarr/slides/*/**/*") if p.is_file()}
    second = invoke(*args)
    t2 = time.perf_counter()
    return {"first": first, "second": second, "t_first": t1 - t0, "t_second": t2 - t1,
            "features": features, "stamps": stamps, "config": config}


# --- synth → check → extract → rerun ------------------------------------------------------------
def test_check_lists_every_synthetic_slide_ok_at_its_mpp(cohort, tmp_path):
    import pandas as pd

    table = tmp_path / "check.csv"
    result = invoke("check", cohort / "slides", "--out", table)
    assert result.exit_code == 0, result.output
    assert f"{N} ok, 0 failed" in flat(result.output)
    rows = pd.read_csv(table, dtype={"slide_id": str})
    planned = {s.slide_id: s.mpp for s in plan_cohort(N, SEED, size_um=SIZE_UM)}
    assert set(rows["slide_id"]) == set(planned)
    assert (rows["status"] == "ok").all()
    for _, row in rows.iterrows():
        assert row["mpp"] == pytest.approx(planned[row["slide_id"]], rel=1e-6), row["slide_id"]
        assert row["levels"] >= 1 and row["width"] > 0 and row["tissue_fraction"] > 0.2
    assert set(planned.values()) == {0.25, 0.5}  # both scan resolutions are exercised


def test_extract_fills_the_cache_and_a_rerun_skips_every_slide(first_extract, cohort):
    first, second = first_extract["first"], first_extract["second"]
    assert first.exit_code == 0, first.output
    assert f"{N} done, 0 skipped, 0 failed" in flat(first.output)
    cache = store_of(first_extract["features"])
    ids = sorted(p.stem for p in (cohort / "slides").glob("*.svs"))
    assert cache.complete_ids() == ids
    for sid in ids:
        cached = cache.read(sid)
        assert cached.n_tiles > 0 and cached.features.shape == (cached.n_tiles, 512 + MORPH_DIM)  # resnet18 + stainmorph
        assert cached.attrs["slide_mpp"] in (0.25, 0.5)
        assert cached.attrs["tile_size_l0"] == pytest.approx(224 * 0.5 / cached.attrs["slide_mpp"])
    assert (first_extract["features"] / "qc" / f"{ids[0]}.png").is_file()

    assert second.exit_code == 0, second.output
    assert f"0 done, {N} skipped, 0 failed" in flat(second.output)
    assert "already_done" in second.output
    # nothing in the cache was rewritten by the rerun
    after = {p: p.stat().st_mtime_ns for p in first_extract["stamps"]}
    assert after == first_extract["stamps"]

    ratio = first_extract["t_second"] / first_extract["t_first"]
    print(f"\nextract first run {first_extract['t_first']:.2f} s, rerun {first_extract['t_second']:.2f} s, "
          f"ratio {ratio:.3f} (in-process; acceptance < 0.1; a figure, not a test: see benchmarks/)")


def test_extract_saves_its_resolved_config(first_extract):
    saved = list(first_extract["features"].glob("runs/*.extract.yaml"))
    assert len(saved) == 1
    doc = yaml.safe_load(saved[0].read_text())
    assert doc["command"] == "extract"
    assert doc["batch_size"] == 16  # from the config file
    assert doc["encoder"] == "resnet18-random+stainmorph" and doc["tile_mpp"] == 0.5  # code defaults
    assert doc["quiet"] is True  # a flag
    assert doc["config_file"] == str(first_extract["config"])


# --- SIGKILL partway through --------------------------------------------------------------------
def test_sigkill_partway_then_rerun_completes_every_slide(cohort, first_extract, tmp_path):
    features = tmp_path / "features"
    script = Path(sys.executable).with_name("weakstil")  # the installed console script
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "weakstil.cli"]
    cmd = launcher + ["extract", str(cohort / "slides"), "--features", str(features), "--quiet", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # kill once a slide is complete and, preferably, the next one is half-written in staging
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            n_complete = sum(complete_groups(features).values())
            writing = any(features.glob("*.zarr/.staging/*/features"))
            if n_complete >= 1 and (writing or n_complete >= N - 2):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "extract finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    store = next(features.glob("*.zarr"))
    debris = list((store / ".staging").glob("*")) if (store / ".staging").exists() else []
    groups = complete_groups(features)
    done_before = sorted(k for k, v in groups.items() if v)
    print(f"\nkilled with {len(done_before)}/{N} slides complete, {len(debris)} staging leftover(s), "
          f"{sum(not v for v in groups.values())} incomplete group(s) listed")
    assert 1 <= len(done_before) < N
    # only whole groups are ever listed: every group under slides/ is complete and reads back
    assert all(groups.values()), groups
    cache = FeatureCache.open_store(store)  # also sweeps the dead writer's staging debris
    assert not list(store.glob(".staging/*"))
    assert cache.complete_ids() == done_before
    for sid in done_before:
        assert cache.read(sid).n_tiles > 0

    result = invoke("extract", cohort / "slides", "--features", features, "--quiet")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert f"{N - len(done_before)} done, {len(done_before)} skipped, 0 failed" in text
    reference = store_of(first_extract["features"])
    cache = FeatureCache.open_store(store)
    assert cache.complete_ids() == reference.complete_ids()
    for sid in cache.complete_ids():
        got, want = cache.read(sid), reference.read(sid)
        assert got.attrs["complete"] is True
        np.testing.assert_array_equal(got.coords_l0, want.coords_l0)
        np.testing.assert_allclose(got.features.astype(np.float32), want.features.astype(np.float32),
                                   rtol=0, atol=2e-2)
    assert not list(store.glob(".staging/*"))
    assert not any((store / ".locks").glob("*.lock"))  # the killed run's lock was taken over, then released


# --- a folder with bad files --------------------------------------------------------------------
@pytest.fixture()
def mixed_folder(cohort, bad_slides, tmp_path) -> tuple[Path, list[str], dict[str, str]]:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(p.stem for p in (cohort / "slides").glob("*.svs"))[:2]
    for sid in good:
        shutil.copy(cohort / "slides" / f"{sid}.svs", folder)
    bad = {}
    for path, reason in ((bad_slides.empty, "EmptySlideFileError"),
                         (bad_slides.truncated, "TruncatedSlideError"),
                         (bad_slides.not_a_slide, "NotASlideError"),
                         (bad_slides.no_mpp, "MissingMppError")):
        assert path.suffix == ".svs"
        shutil.copy(path, folder)
        bad[path.name] = reason
    assert (folder / "empty.svs").stat().st_size == 0
    return folder, good, bad


def test_bad_files_are_named_with_their_reason_and_the_rest_is_done(mixed_folder, tmp_path):
    folder, good, bad = mixed_folder
    features = tmp_path / "features"
    result = invoke("extract", folder, "--features", features, "--quiet")
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert f"{len(good)} done, 0 skipped, {len(bad)} failed" in text
    lines = result.output.splitlines()
    for name, reason in bad.items():
        # the file is named on a line that also gives its reason
        assert any(name in line and reason in line for line in lines), (name, reason, result.output)
    assert "Traceback" not in result.output
    assert store_of(features).complete_ids() == good

    # --mpp gives the slide without one a resolution; the broken files still fail, the good are skipped
    result = invoke("extract", folder, "--features", features, "--quiet", "--mpp", "0.5")
    assert result.exit_code == 1, result.output
    text = flat(result.output)
    assert f"1 done, {len(good)} skipped, {len(bad) - 1} failed" in text
    assert "MissingMppError" not in text
    for name, reason in bad.items():
        if reason != "MissingMppError":
            assert name in text and reason in text
    cache = store_of(features)
    assert cache.complete_ids() == sorted(good + ["no_mpp"])
    no_mpp = cache.read("no_mpp")
    assert no_mpp.n_tiles > 0 and no_mpp.attrs["slide_mpp"] == 0.5
    assert no_mpp.attrs["tile_size_l0"] == pytest.approx(224.0)

    # the exit code says whether everything succeeded: 0 once the broken files are gone
    for name, reason in bad.items():
        if reason != "MissingMppError":
            (folder / name).unlink()
    result = invoke("extract", folder, "--features", features, "--quiet", "--mpp", "0.5")
    assert result.exit_code == 0, result.output
    assert f"0 done, {len(good) + 1} skipped, 0 failed" in flat(result.output)


# --- the same tissue at 0.25 and 0.5 µm/px ------------------------------------------------------
def _centered_rows_r(a: np.ndarray, b: np.ndarray, mean: np.ndarray) -> np.ndarray:
    a, b = a - mean, b - mean
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def test_same_content_at_two_resolutions_gives_the_same_tiles_and_embeddings(tmp_path):
    """Tile grids within 2 % in count; embeddings of the tiles at the same physical position agree.

    Tiles are matched by their top-left corner in µm (coords_l0 × slide mpp). Two correlations per
    matched tile: the Pearson r of the two 512-d feature vectors as they are (the acceptance
    measure, ≥ 0.95 for every tile), and the stricter r of the vectors minus the mean embedding of
    all tiles (raw vectors of a random-init ResNet share a large common profile, so even unrelated
    tiles correlate ~0.99; centred, unrelated tiles are ~0 and matched ones must still agree).
    """
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.synth.lattice import SlideParams, write_slide
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    params = SlideParams(seed=7, stil_target=30.0, size_um=(1600.0, 1280.0))  # ~110 tiles
    paths = []
    for mpp in (0.25, 0.5):
        paths.append(tmp_path / f"scan{int(mpp * 100):03d}.svs")
        write_slide(paths[-1], params, mpp)
    result = extract_slides(slide_sources(paths), tmp_path / "features", encoder=create_encoder("resnet18-random"),
                            spec=TileSpec(), tissue=TissueParams(), opts=ExtractOptions(progress=False), qc=False)
    assert [o.status for o in result.outcomes] == ["done", "done"], result.outcomes
    fine, coarse = result.cache.read("scan025"), result.cache.read("scan050")
    assert fine.attrs["tile_size_l0"] == 448.0 and coarse.attrs["tile_size_l0"] == 224.0

    n_fine, n_coarse = fine.n_tiles, coarse.n_tiles
    count_diff = abs(n_fine - n_coarse) / max(n_fine, n_coarse)
    at_fine = {tuple(np.round(xy * 0.25, 3)): i for i, xy in enumerate(fine.coords_l0)}
    at_coarse = {tuple(np.round(xy * 0.5, 3)): i for i, xy in enumerate(coarse.coords_l0)}
    common = sorted(at_fine.keys() & at_coarse.keys())
    a = np.stack([fine.features[at_fine[k]] for k in common]).astype(np.float64)
    b = np.stack([coarse.features[at_coarse[k]] for k in common]).astype(np.float64)
    raw = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)])
    mean = (a.mean(0) + b.mean(0)) / 2
    centred = _centered_rows_r(a, b, mean)
    unrelated = _centered_rows_r(a, np.roll(b, len(b) // 2, axis=0), mean)
    print(f"\ntiles {n_fine} at 0.25 µm/px vs {n_coarse} at 0.5 µm/px (count difference {count_diff:.2%}), "
          f"{len(common)} at the same position; per-tile Pearson r of the feature vectors: min {raw.min():.4f}, "
          f"median {np.median(raw):.4f}; mean-centred: min {centred.min():.3f}, 5th pct "
          f"{np.percentile(centred, 5):.3f}, median {np.median(centred):.3f} (unrelated pairs: median "
          f"{np.median(unrelated):.3f})")
    assert n_fine >= 80 and count_diff <= 0.02
    assert len(common) >= 0.98 * max(n_fine, n_coarse)
    assert raw.min() >= 0.95
    assert np.median(centred) >= 0.95 and np.percentile(centred, 5) >= 0.9
    assert np.median(unrelated) < 0.5  # the centred measure does tell tiles apart
