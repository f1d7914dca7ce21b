"""Shared worlds for the fault tests.

* ``world`` (session): two tiny slides in each of two folders, their features cached, and an
  untrained MIL model with the cache's fingerprint (scoring needs no training to be exercised).
* ``results_root`` (per test): ``root/slides/tiny.svs`` (the session's tiny slide) and
  ``root/results/`` with scores.csv and the slide's review files, as `weakstil score` writes them;
  each test gets its own copy (the tests damage it). ``viewer_client(root)`` serves it.
"""


from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import write_tiny_slide
from weakstil.outputs.heatmap import write_slide_outputs
from weakstil.wsi.slide import open_slide

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


def invoke(*args):
    from weakstil.cli import app

    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def run_cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``weakstil ARGS`` in a fresh process (to see exactly what a user sees: stderr, exit code)."""
    return subprocess.run([sys.executable, "-m", "weakstil", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, check=False)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    import torch

    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.model import MILRegressor, TrainedModel
    from weakstil.runs.batch import extract_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    root = tmp_path_factory.mktemp("faults")
    folders = {"A": root / "A", "B": root / "B"}
    paths = []
    for i, (name, folder) in enumerate(folders.items()):
        folder.mkdir()
        for j in range(2):
            paths.append(write_tiny_slide(folder / f"{name}{j}.tif", seed=10 * i + j))
    encoder = create_encoder("resnet18-random")
    result = extract_slides(slide_sources(paths), root / "features", encoder=encoder, spec=TileSpec(),
                            tissue=TissueParams(), opts=ExtractOptions(progress=False), qc=False)
    assert not result.failed, result.failed
    torch.manual_seed(0)
    model = TrainedModel([MILRegressor(encoder.spec.embed_dim)],
                         fingerprint={"encoder": result.cache.encoder_fp, "tiling": result.cache.tiling_fp})
    (root / "model").mkdir()
    model.save(root / "model" / "model.ckpt")
    return {"root": root, "A": folders["A"], "B": folders["B"], "features": root / "features",
            "model": root / "model", "cache": result.cache}


def score_args(world, slides: Path, out: Path, *extra) -> list:
    return ["score", slides, "--model", world["model"], "--features", world["features"], "--out", out,
            "--device", "cpu", "--quiet", *extra]


def copy_world_slides(world, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(world["A"].glob("*.tif")):
        shutil.copy2(path, dest)
    return dest


BASE = "http://127.0.0.1"


@pytest.fixture
def results_root(tmp_path, tiny_slide) -> Path:
    slides, results = tmp_path / "slides", tmp_path / "results"
    slides.mkdir()
    shutil.copy2(tiny_slide, slides / "tiny.svs")
    xs, ys = np.meshgrid(np.arange(0, 1400, 200), np.arange(0, 1100, 200))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    pred = np.linspace(0, 100, len(coords))
    attention = np.full(len(coords), 1.0 / len(coords))
    with open_slide(slides / "tiny.svs") as slide:
        write_slide_outputs(slide, results / "slides" / "tiny", coords_l0=coords, size_l0=200.0, prediction=pred,
                            attention=attention, contribution=attention * pred, score=float((attention * pred).sum()),
                            formats=("csv", "geojson", "png"))
    (results / "scores.csv").write_text("slide_id,score,n_tiles,status,error\ntiny,50.0,42,ok,\n")
    return tmp_path


@pytest.fixture
def viewer_client():
    """``viewer_client(root)``: a Starlette test client of the viewer over ``root/results`` and ``root/slides``."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from weakstil.viewer import ViewerConfig, create_app

    def make(root: Path) -> TestClient:
        config = ViewerConfig(results_dir=root / "results", slides_dir=root / "slides", check_assets=False)
        return TestClient(create_app(config), base_url=BASE)

    return make
