"""#13 case 1: feature chunks carry a crc32c checksum (schema version 2); a flipped byte on disk is
reported as a corrupt slide group — never read back as other features and scored. Version 1 stores
(zstd only, no checksum) still open and read."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from weakstil.embed import cache_writer
from weakstil.embed.cache import SCHEMA_VERSION, FeatureCache
from weakstil.errors import CacheCorruptError

DIM = 8
ENCODER = {"name": "resnet18", "weights": "file:/ckpt/r.pth", "weights_sha256": "a" * 64, "embed_dim": DIM}
TILING = {"tile_px": 224, "mpp": 0.5, "overlap": 0, "min_tissue": 0.5}


def write_slide(cache, slide_id, n=12):
    values = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float16)
    coords = np.stack([np.arange(n) * 448, np.zeros(n, int)], axis=1)
    with cache.slide_writer(slide_id, coords, DIM, {"slide_mpp": 0.25, "tile_size_l0": 448}, chunk_rows=4) as w:
        w.write(0, values)
    return values


def flip_byte(chunk, offset=20):
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0x01
    chunk.write_bytes(bytes(data))


def codec_names(array_dir):
    return [c["name"] for c in json.loads((array_dir / "zarr.json").read_text())["codecs"]]


def test_new_stores_checksum_features_and_coords(tmp_path):
    cache = FeatureCache.open(tmp_path / "features", ENCODER, TILING)
    write_slide(cache, "S1")
    assert SCHEMA_VERSION == 2 and cache.attrs["schema_version"] == 2
    for name in ("features", "coords"):
        assert codec_names(cache.slides_dir / "S1" / name) == ["bytes", "zstd", "crc32c"]


@pytest.mark.parametrize("array, chunk", [("features", "c/1/0"), ("coords", "c/0/0")])
def test_a_flipped_byte_is_a_corrupt_slide_not_other_features(tmp_path, array, chunk):
    cache = FeatureCache.open(tmp_path / "features", ENCODER, TILING)
    write_slide(cache, "S1")
    flip_byte(cache.slides_dir / "S1" / array / chunk)
    with pytest.raises(CacheCorruptError, match="checksum") as info:
        cache.read("S1")
    assert "'S1'" in str(info.value) and "weakstil extract" in info.value.fix
    assert info.value.path == cache.slides_dir / "S1"


def test_a_version_1_store_without_checksums_still_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_writer, "chunk_codecs", lambda: "auto")  # zarr's default: zstd only
    cache = FeatureCache.open(tmp_path / "features", ENCODER, TILING)
    values = write_slide(cache, "OLD")
    meta = json.loads((cache.path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    (cache.path / "zarr.json").write_text(json.dumps(meta))
    assert codec_names(cache.slides_dir / "OLD" / "features") == ["bytes", "zstd"]
    reopened = FeatureCache.open_store(cache.path)
    assert reopened.attrs["schema_version"] == 1 and reopened.complete_ids() == ["OLD"]
    np.testing.assert_array_equal(reopened.read("OLD").features, values)


def test_scoring_never_uses_the_damaged_features(tmp_path):
    """`weakstil score` end to end: the slide with a flipped byte fails, naming the slide and the fix."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.mil.model import MILRegressor, TrainedModel
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    cohort = synth_cohort(tmp_path / "cohort", n=1, seed=0, size_um=300, progress=False)
    encoder = create_encoder("resnet18-random")
    done = extract_slides(slide_sources(find_slides(cohort / "slides")), tmp_path / "features", encoder=encoder,
                          spec=TileSpec(), tissue=TissueParams(), opts=ExtractOptions(progress=False), qc=False)
    cache = done.cache
    (slide_id,) = cache.complete_ids()
    TrainedModel([MILRegressor(cache.embed_dim, hidden=8)],
                 fingerprint={"encoder": cache.encoder_fp, "tiling": cache.tiling_fp}).save(
        (tmp_path / "model").mkdir() or tmp_path / "model" / "model.ckpt")
    flip_byte(cache.slides_dir / slide_id / "features" / "c" / "0" / "0", offset=100)
    result = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"}).invoke(app_(), [
        "score", str(cohort / "slides"), "--model", str(tmp_path / "model"), "--features", str(tmp_path / "features"),
        "--out", str(tmp_path / "results"), "--device", "cpu", "--quiet", "--outputs", "csv"])
    assert result.exit_code == 1, result.output
    with open(tmp_path / "results" / "scores.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["slide_id"] == slide_id and row["status"] == "failed" and row["score"] == ""
    assert "checksum" in row["error"] and slide_id in row["error"]
    assert not (tmp_path / "results" / "slides" / slide_id / "score.json").exists()


def app_():
    from weakstil.cli import app

    return app
