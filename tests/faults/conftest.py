"""A small scored world for the fault tests: two tiny slides in each of two folders, their
features cached, and an untrained MIL model with the cache's fingerprint (scoring needs no training
to be exercised)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_tiny_slide

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
