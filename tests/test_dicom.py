"""DICOM WSI: a folder of .dcm files is one slide (id = folder name), read through OpenSlide 4.

A synthetic Aperio-like TIFF is converted to DICOM inside the test with wsidicomizer (it copies the
JPEG tiles, no re-encoding); `check` must list the DICOM slide with the TIFF's mpp and levels, and
`extract` must cache the same tiles with the same features. wsidicomizer needs the system library
libturbojpeg (`apt-get install -y libturbojpeg0`); without it these tests skip (and fail in CI).
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import write_tiny_slide
from weakstil.cli import app
from weakstil.errors import DuplicateSlideIdError, UnsupportedFormatError
from weakstil.wsi.slide import find_slides, open_slide, slide_id_from_path

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
SIZE = (4000, 3200)  # 1000 × 800 µm at 0.25 µm/px: two levels, ~20 tissue tiles at 0.5 µm/px


def _missing() -> str | None:
    try:
        import wsidicomizer  # noqa: F401
    except ImportError:
        return "wsidicomizer not installed: pip install -e '.[dev]'"
    if ctypes.util.find_library("turbojpeg") is None:
        return "libturbojpeg not found (wsidicomizer needs it): apt-get install -y libturbojpeg0 (CI does)"
    return None


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """tiff/case.svs and the same slide as dicom/case-dcm/*.dcm, plus a mixed folder of both."""
    reason = _missing()
    if reason and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} — the CI set-up must install it")
    if reason:
        pytest.skip(reason)
    from wsidicomizer import WsiDicomizer

    root = tmp_path_factory.mktemp("dicom")
    (root / "tiff").mkdir()
    tiff = write_tiny_slide(root / "tiff" / "case.svs", size=SIZE)
    (root / "dicom").mkdir()
    WsiDicomizer.convert(tiff, root / "dicom" / "case-dcm")
    mixed = root / "mixed"
    shutil.copytree(root / "dicom" / "case-dcm", mixed / "scanner-export" / "case-dcm")
    shutil.copy(tiff, mixed / "other.svs")
    return {"root": root, "tiff": tiff, "dicom": root / "dicom" / "case-dcm", "mixed": mixed}


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def test_a_dicom_folder_is_one_slide_named_after_the_folder(cohort):
    assert find_slides(cohort["mixed"]) == [cohort["mixed"] / "other.svs",
                                            cohort["mixed"] / "scanner-export" / "case-dcm"]
    assert find_slides(cohort["dicom"]) == [cohort["dicom"]]  # the DICOM folder itself
    any_dcm = next(cohort["dicom"].glob("*.dcm"))
    assert find_slides(any_dcm) == [cohort["dicom"]]
    assert slide_id_from_path(cohort["dicom"]) == "case-dcm"


def test_dicom_opens_with_the_tiffs_geometry_mpp_and_pixels(cohort):
    with open_slide(cohort["tiff"]) as tiff, open_slide(cohort["dicom"]) as dcm:
        assert (dcm.slide_id, dcm.backend, dcm.vendor) == ("case-dcm", "openslide", "dicom")
        assert dcm.mpp == pytest.approx(tiff.mpp) and dcm.mpp_source == "openslide.mpp"
        assert dcm.level_dimensions == tiff.level_dimensions and len(dcm.level_dimensions) == 2
        assert dcm.level_downsamples == pytest.approx(tiff.level_downsamples)
        a = tiff.read_region((1200, 900), 0, (300, 200)).astype(int)
        b = dcm.read_region((1200, 900), 0, (300, 200)).astype(int)
        assert np.abs(a - b).mean() < 2.0  # the same JPEG tiles (decoders may differ by a level)
    with open_slide(any_dcm := next(cohort["dicom"].glob("*.dcm"))) as dcm:
        assert dcm.path == any_dcm.parent and dcm.slide_id == "case-dcm"


def test_dicom_refuses_backends_that_cannot_read_it_and_duplicate_ids(cohort, tmp_path):
    with pytest.raises(UnsupportedFormatError, match="DICOM") as err:
        open_slide(cohort["dicom"], backend="tiffslide")
    assert "--backend auto" in err.value.fix
    shutil.copytree(cohort["dicom"], tmp_path / "a" / "case")
    shutil.copy(cohort["tiff"], tmp_path / "case.svs")
    with pytest.raises(DuplicateSlideIdError, match="case"):
        find_slides(tmp_path)


def test_check_lists_the_dicom_slide_with_mpp_and_levels(cohort, tmp_path):
    import pandas as pd

    result = invoke("check", cohort["mixed"], "--out", tmp_path / "check.csv")
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "check.csv").set_index("slide_id")
    assert set(rows.index) == {"case-dcm", "other"} and (rows["status"] == "ok").all()
    assert rows.loc["case-dcm", "vendor"] == "dicom"
    assert rows.loc["case-dcm", "mpp"] == pytest.approx(0.25)
    assert rows.loc["case-dcm", "levels"] == rows.loc["other", "levels"] == 2
    assert "case-dcm" in result.output and "dicom" in result.output


def test_the_dicom_gives_the_tiffs_tile_grid_and_tile_pixels(cohort):
    """What extract caches is this grid, embedded: the same tiles, the same pixels (fast, no encoder)."""
    from weakstil.wsi.reader import plan_blocks, read_block_tiles
    from weakstil.wsi.tiling import TileSpec, plan_tiles
    from weakstil.wsi.tissue import TissueParams

    grids, pixels = {}, {}
    for name in ("tiff", "dicom"):
        with open_slide(cohort[name]) as slide:
            grid = plan_tiles(slide, TileSpec(), tissue=TissueParams())
            order, blocks = plan_blocks(grid.coords_l0, grid.size_l0)
            coords = grid.coords_l0[order]
            tiles = np.concatenate([read_block_tiles(slide, b, coords, size_l0=grid.size_l0, tile_px=224)
                                    for b in blocks])
            grids[name], pixels[name] = coords, tiles
    assert len(grids["tiff"]) >= 10
    assert np.array_equal(grids["tiff"], grids["dicom"])
    # the TIFF goes through the direct JPEG path (DCT-scaled decode), the DICOM through read_region
    assert np.abs(pixels["tiff"].astype(int) - pixels["dicom"].astype(int)).mean() < 2.0


@pytest.mark.slow
def test_extract_caches_the_same_tiles_and_features_as_the_tiff(cohort, tmp_path):
    from weakstil.embed.cache import FeatureCache

    for name, slides in (("tiff", cohort["tiff"]), ("dicom", cohort["dicom"])):
        result = invoke("extract", slides, "--features", tmp_path / name, "--quiet")
        assert result.exit_code == 0, result.output
    tiff = FeatureCache.find(tmp_path / "tiff").read("case")
    dcm = FeatureCache.find(tmp_path / "dicom").read("case-dcm")
    assert tiff.n_tiles >= 10
    assert abs(dcm.n_tiles - tiff.n_tiles) <= 0.02 * tiff.n_tiles
    common = {tuple(c) for c in tiff.coords_l0} & {tuple(c) for c in dcm.coords_l0}
    assert len(common) >= 0.98 * tiff.n_tiles
    index = {tuple(c): i for i, c in enumerate(dcm.coords_l0)}
    a = tiff.features.astype(np.float32)
    b = dcm.features[[index[tuple(c)] for c in tiff.coords_l0 if tuple(c) in index]].astype(np.float32)
    a = a[[tuple(c) in index for c in tiff.coords_l0]]
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert np.median(cosine) > 0.99 and cosine.min() > 0.95


def test_the_viewer_shows_a_dicom_slide_in_deep_zoom(cohort, tmp_path):
    from starlette.testclient import TestClient

    from weakstil.viewer import ViewerConfig, create_app

    results = tmp_path / "results"
    (results / "slides" / "case-dcm").mkdir(parents=True)
    (results / "scores.csv").write_text("slide_id,score,n_tiles,status,error\ncase-dcm,12.5,20,ok,\n")
    app = create_app(ViewerConfig(results_dir=results, slides_dir=cohort["mixed"], check_assets=False))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        info = client.get("/api/slides/case-dcm").json()
        assert info["image"]["width"] == SIZE[0] and info["image"]["mpp"] == pytest.approx(0.25)
        tile = client.get("/api/slides/case-dcm/slide_files/12/0_0.jpeg")
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
        assert client.get("/api/slides/case-dcm/thumbnail.jpg").status_code == 200
