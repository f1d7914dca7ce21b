"""A small results folder for the viewer fault tests: ``root/slides/tiny.svs`` (the session's tiny
slide) and ``root/results/`` with scores.csv and the slide's review files, as `weakstil score` writes
them. Each test gets its own copy (the tests damage it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from weakstil.outputs.heatmap import write_slide_outputs
from weakstil.wsi.slide import open_slide

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
