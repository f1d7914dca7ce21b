"""#13.5: a full disk while writing scores.csv, config.yaml, the model or features ends in a
DiskFullError that names the path and the free space: no traceback, no temp file left, the earlier
outputs intact, exit code ≠ 0."""

from __future__ import annotations

import errno
import pathlib
import re
import shutil
import subprocess
import uuid

import numpy as np
import pytest

from tests.faults.conftest import invoke, run_cli, score_args
from weakstil.errors import DiskFullError

TEMP_NAME = re.compile(r"\.partial$|\.old$|\.tmp$|\.creating$|^\.write-test")


def _temp_files(root: pathlib.Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if TEMP_NAME.search(p.name)]


@pytest.fixture
def enospc_on(monkeypatch):
    """Make every write of a file whose name contains ``marker`` fail with ENOSPC."""

    def arm(marker: str) -> None:
        real_write_bytes = pathlib.Path.write_bytes

        def write_bytes(self, data):
            if marker in self.name:
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_write_bytes(self, data)

        monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)

    return arm


def test_scores_csv_on_a_full_disk(world, tmp_path, enospc_on):
    from weakstil.embed.extract import slide_sources
    from weakstil.outputs.score import write_scores_csv

    out = tmp_path / "results"
    out.mkdir()
    (out / "scores.csv").write_text("slide_id,score,n_tiles,status,error\nX,1.00,3,ok,\n")
    enospc_on("scores.csv")
    with pytest.raises(DiskFullError) as info:
        write_scores_csv(out, slide_sources(sorted(world["A"].glob("*.tif"))), {}, "sha")
    assert "scores.csv" in str(info.value) and "free" in str(info.value) and info.value.errno == errno.ENOSPC
    assert (out / "scores.csv").read_text().endswith("X,1.00,3,ok,\n")  # the earlier file intact
    assert _temp_files(out) == []


def test_config_yaml_on_a_full_disk(tmp_path, enospc_on):
    from weakstil.config import save_resolved

    (tmp_path / "config.yaml").write_text("old: 1\n")
    enospc_on("config.yaml")
    with pytest.raises(DiskFullError, match="config.yaml"):
        save_resolved({"a": 1}, tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == "old: 1\n" and _temp_files(tmp_path) == []


def test_the_model_on_a_full_disk(world, tmp_path, enospc_on):
    from weakstil.mil.model import load_model

    model = load_model(world["model"])
    (tmp_path / "model.ckpt").write_bytes(b"earlier")
    enospc_on("model.ckpt")
    with pytest.raises(DiskFullError, match="model.ckpt"):
        model.save(tmp_path / "model.ckpt")
    assert (tmp_path / "model.ckpt").read_bytes() == b"earlier" and _temp_files(tmp_path) == []


def test_features_on_a_full_disk(world, tmp_path, monkeypatch):
    from weakstil.embed.cache import FeatureCache
    from weakstil.embed.cache_writer import SlideWriter

    store = tmp_path / "store.zarr"
    shutil.copytree(world["cache"].path, store)
    cache = FeatureCache.open_store(store)
    before = cache.read("A0")

    def full(self, start_row, feats):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SlideWriter, "write", full)
    with pytest.raises(DiskFullError, match="A0"), cache.slide_writer("A0", before.coords_l0, before.features.shape[1],
                                                                     {"slide_mpp": 0.25, "tile_size_l0": 448.0}) as w:
        w.write(0, before.features)
    after = cache.read("A0")  # the earlier group is still there, whole
    assert np.array_equal(after.features, before.features)
    assert not cache.staging_dir.exists() or not list(cache.staging_dir.iterdir())


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 96 KB tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_scoring_into_a_96kb_tmpfs_ends_with_a_disk_space_error(world, tiny_disk):
    out = tiny_disk / "results"
    first = invoke(*score_args(world, world["A"], out, "--outputs", "csv"))  # small: fits
    earlier = (out / "scores.csv").read_text() if first.exit_code == 0 else None
    done = run_cli(*score_args(world, world["B"], out, "--outputs", "csv,png,tif,geojson,top"),
                   cwd=world["root"])
    assert done.returncode != 0, done.stderr
    text = done.stdout + done.stderr
    assert "Traceback" not in text
    assert "DiskFullError" in text or "disk is full" in text, text[-2000:]
    assert _temp_files(tiny_disk) == []
    if earlier is not None:
        assert "A0" in (out / "scores.csv").read_text()
