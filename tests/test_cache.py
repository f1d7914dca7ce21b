"""The Zarr v3 feature cache: format contract, refusal of mismatches, atomic slide groups."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import weakstil.fs
from weakstil import __version__
from weakstil.embed import cache as cache_module
from weakstil.embed.cache import (
    SCHEMA_VERSION,
    CacheWarning,
    FeatureCache,
    source_attrs,
    store_name,
)
from weakstil.errors import (
    AmbiguousCacheError,
    CacheCorruptError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheWriteError,
    WeakstilError,
)

REPO = Path(__file__).resolve().parents[1]
DIM = 8


def encoder_fp(**changes):
    fp = {"name": "resnet18", "weights": "file:/ckpt/resnet18.pth", "weights_sha256": "a" * 64,
          "embed_dim": DIM, "input_px": 224, "mean": (0.485, 0.456, 0.406),
          "std": (0.229, 0.224, 0.225)}
    fp.update(changes)
    return fp


def tiling_fp(**changes):
    fp = {"tile_px": 224, "mpp": 0.5, "overlap": 0, "min_tissue": 0.5,
          "tissue": {"thumb_mpp": 8.0, "min_area_um2": 2000.0}}
    fp.update(changes)
    return fp


def grid(n):
    return np.stack([np.arange(n) * 448, np.arange(n) * 224 + 7], axis=1)


def feats(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture
def cache(tmp_path):
    return FeatureCache.open(tmp_path / "features", encoder_fp(), tiling_fp())


def write_slide(cache, slide_id, n=20, seed=0, source=None, **kw):
    values = feats(n, seed)
    with cache.slide_writer(slide_id, grid(n), DIM, {"slide_mpp": 0.25, "tile_size_l0": 448},
                            source=source, **kw) as w:
        for start in range(0, n, 6):
            w.write(start, values[start:start + 6])
    return values


def staging_debris(cache):
    return list(cache.staging_dir.iterdir()) if cache.staging_dir.exists() else []


# --- store naming and fingerprints ------------------------------------------------------------
def test_store_name_is_encoder_name_plus_hash_of_both_fingerprints():
    name = store_name(encoder_fp(), tiling_fp())
    assert name.startswith("resnet18-") and name.endswith(".zarr")
    assert len(name) == len("resnet18-") + 10 + len(".zarr")
    assert store_name(encoder_fp(), tiling_fp()) == name
    assert store_name(encoder_fp(weights_sha256="b" * 64), tiling_fp()) != name  # other checkpoint
    assert store_name(encoder_fp(), tiling_fp(mpp=1.0)) != name
    assert store_name(encoder_fp(), tiling_fp(tissue={"thumb_mpp": 16.0})) != name


def test_store_name_ignores_spelling_that_does_not_change_features():
    name = store_name(encoder_fp(), tiling_fp(mpp=1.0))
    assert store_name(encoder_fp(mean=[0.485, 0.456, 0.406]), tiling_fp(mpp=1)) == name
    # the same checkpoint moved elsewhere: same sha256, same store
    assert store_name(encoder_fp(weights="file:/elsewhere.pth"), tiling_fp(mpp=1)) == name
    # without a hash the weights source is all that tells two encoders apart
    a = store_name(encoder_fp(weights_sha256=None, weights="random:0"), tiling_fp())
    assert a != store_name(encoder_fp(weights_sha256=None, weights="random:1"), tiling_fp())


def test_store_name_sanitises_the_encoder_name():
    name = store_name(encoder_fp(name="hf-hub:Org/UNI 2"), tiling_fp())
    assert name.startswith("hf-hub_Org_UNI_2-") and "/" not in name


# --- round trip and the on-disk contract ------------------------------------------------------
def test_round_trip_dtypes_and_attrs(cache, tmp_path):
    source = tmp_path / "S1.svs"
    source.write_bytes(b"x" * 123)
    values = write_slide(cache, "S1", n=20, source=source)
    got = cache.read("S1")
    assert got.features.dtype == np.float16 and got.features.shape == (20, DIM)
    assert got.coords_l0.dtype == np.int32 and got.coords_l0.shape == (20, 2)
    np.testing.assert_array_equal(got.coords_l0, grid(20))
    np.testing.assert_allclose(got.features, values, atol=2e-3, rtol=1e-3)
    a = got.attrs
    assert a["complete"] is True and a["n_tiles"] == 20 and a["embed_dim"] == DIM
    assert a["slide_mpp"] == 0.25 and a["tile_size_l0"] == 448 and a["seconds"] >= 0
    assert a["source_path"] == str(source.resolve()) and a["source_size"] == 123
    assert a["source_mtime"] == pytest.approx(source.stat().st_mtime)
    assert cache.complete_ids() == ["S1"] and cache.is_complete("S1", source)
    assert staging_debris(cache) == []


def test_store_layout_follows_the_contract(cache):
    import zarr

    write_slide(cache, "S1", n=5)
    root = zarr.open_group(str(cache.path), mode="r", use_consolidated=False)
    attrs = root.attrs.asdict()
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["weakstil_version"] == __version__
    assert attrs["encoder"]["weights_sha256"] == "a" * 64 and attrs["encoder"]["embed_dim"] == DIM
    assert attrs["tiling"]["tile_px"] == 224 and attrs["tiling"]["tissue"]["thumb_mpp"] == 8.0
    slide = root["slides"]["S1"]
    assert slide["features"].dtype == np.float16 and slide["coords"].dtype == np.int32
    assert slide["features"].chunks[1] == DIM  # chunked by rows
    assert sorted(os.listdir(cache.path)) == ["slides", "zarr.json"]


def test_writes_in_any_order_with_small_chunks_and_rewrites(cache):
    n, values = 23, feats(23, seed=3)
    with cache.slide_writer("S1", grid(n), DIM, chunk_rows=5) as w:
        for start in (20, 0, 10, 5, 15):
            w.write(start, values[start:start + 5])
        w.write(2, values[2:4] * 0)  # rewrite rows of a chunk already on disk
        w.write(2, values[2:4])
    np.testing.assert_allclose(cache.read("S1").features, values, atol=2e-3, rtol=1e-3)


def test_a_slide_without_tiles_round_trips(cache):
    with cache.slide_writer("empty", np.zeros((0, 2)), DIM):
        pass
    got = cache.read("empty")
    assert got.features.shape == (0, DIM) and got.coords_l0.shape == (0, 2)


# --- opening, refusing, finding ---------------------------------------------------------------
def test_reopen_gives_the_same_store(cache, tmp_path):
    write_slide(cache, "S1", n=3)
    again = FeatureCache.open(tmp_path / "features", encoder_fp(), tiling_fp(), create=False)
    assert again.path == cache.path and again.complete_ids() == ["S1"]


@pytest.mark.parametrize("enc, til, field", [
    (encoder_fp(weights_sha256="b" * 64), tiling_fp(), "encoder.weights_sha256"),
    (encoder_fp(name="vit_small"), tiling_fp(), "encoder.name"),
    (encoder_fp(), tiling_fp(mpp=1.0), "tiling.mpp"),
    (encoder_fp(), tiling_fp(tissue={"thumb_mpp": 8.0}), "tiling.tissue.min_area_um2"),
])
def test_opening_a_store_with_another_encoder_or_tiling_is_refused(cache, enc, til, field):
    with pytest.raises(CacheMismatchError) as info:
        FeatureCache.open(cache.path, enc, til)
    assert field in str(info.value) and isinstance(info.value, ValueError)
    assert info.value.fix


def test_missing_cache_without_create_is_not_found(tmp_path, cache):
    with pytest.raises(CacheNotFoundError) as info:
        FeatureCache.open(tmp_path / "nowhere", encoder_fp(), tiling_fp(), create=False)
    assert isinstance(info.value, FileNotFoundError)
    # a store for the same encoder but another tiling is named with what differs
    with pytest.raises(CacheNotFoundError, match="tiling.mpp"):
        FeatureCache.open(tmp_path / "features", encoder_fp(), tiling_fp(mpp=1.0), create=False)
    assert not (tmp_path / "nowhere").exists()


def test_open_store_reads_fingerprints_and_checks_schema(cache):
    opened = FeatureCache.open_store(cache.path)
    assert opened.encoder_fp["name"] == "resnet18" and opened.tiling_fp["mpp"] == 0.5
    meta = json.loads((cache.path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    (cache.path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="schema version"):
        FeatureCache.open_store(cache.path)
    (cache.path / "zarr.json").write_text('{"zarr_form')
    with pytest.raises(CacheCorruptError):
        FeatureCache.open_store(cache.path)


def test_find_one_store_a_store_path_or_refuse_several(tmp_path, cache):
    features = tmp_path / "features"
    assert FeatureCache.find(features).path == cache.path
    assert FeatureCache.find(cache.path).path == cache.path
    other = FeatureCache.open(features, encoder_fp(name="vit_small"), tiling_fp())
    with pytest.raises(AmbiguousCacheError) as info:
        FeatureCache.find(features)
    assert cache.path.name in str(info.value) and other.path.name in str(info.value)
    assert "--encoder" in info.value.fix
    assert FeatureCache.find(features, encoder="vit_small").path == other.path
    with pytest.raises(CacheNotFoundError, match="resnet18"):
        FeatureCache.find(features, encoder="uni")
    with pytest.raises(CacheNotFoundError):
        FeatureCache.find(tmp_path / "empty")


# --- atomic slide groups ----------------------------------------------------------------------
def test_a_writer_that_raises_leaves_nothing(cache):
    with pytest.raises(RuntimeError, match="encoder blew up"):
        with cache.slide_writer("S1", grid(10), DIM) as w:
            w.write(0, feats(4))
            raise RuntimeError("encoder blew up")
    assert cache.complete_ids() == [] and not (cache.slides_dir / "S1").exists()
    assert not cache.staging_dir.exists()


def test_a_writer_interrupted_by_ctrl_c_leaves_nothing(cache):
    with pytest.raises(KeyboardInterrupt):
        with cache.slide_writer("S1", grid(10), DIM) as w:
            w.write(0, feats(4))
            raise KeyboardInterrupt
    assert not (cache.slides_dir / "S1").exists() and not cache.staging_dir.exists()


@pytest.mark.parametrize("write, match", [
    (lambda w: w.write(0, feats(9)), "only 9 of 10 rows"),
    (lambda w: w.write(0, np.full((10, DIM), np.nan)), "NaN"),
    (lambda w: w.write(0, np.full((10, DIM), 1e6)), "65504"),
    (lambda w: w.write(5, feats(10)), "outside"),
    (lambda w: w.write(0, feats(10)[:, :3]), "shape"),
])
def test_bad_writes_are_refused_and_leave_nothing(cache, write, match):
    with pytest.raises(CacheWriteError, match=match):
        with cache.slide_writer("S1", grid(10), DIM) as w:
            write(w)
    assert cache.complete_ids() == [] and not cache.staging_dir.exists()


def test_bad_writer_arguments_are_refused(cache):
    with pytest.raises(CacheWriteError, match="embed_dim"):
        cache.slide_writer("S1", grid(3), DIM + 1).__enter__()
    with pytest.raises(CacheWriteError, match="coords_l0"):
        cache.slide_writer("S1", grid(3)[:, :1], DIM).__enter__()
    with pytest.raises(CacheWriteError, match="set by the cache"):
        cache.slide_writer("S1", grid(3), DIM, {"complete": True}).__enter__()
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(CacheWriteError):
            cache.slide_writer(bad, grid(3), DIM).__enter__()


@pytest.mark.parametrize("exchange", ["renameat2", "two-step"])
def test_replacing_a_slide_swaps_the_whole_group(cache, monkeypatch, exchange):
    if exchange == "two-step":  # filesystems without RENAME_EXCHANGE (NFS), other OSes
        monkeypatch.setattr(cache_module, "exchange_paths", lambda a, b: False)
    write_slide(cache, "S1", n=20, seed=1)
    values = write_slide(cache, "S1", n=7, seed=2)
    got = cache.read("S1")
    assert got.features.shape == (7, DIM) and got.attrs["n_tiles"] == 7
    np.testing.assert_allclose(got.features, values, atol=2e-3, rtol=1e-3)
    assert cache.complete_ids() == ["S1"] and staging_debris(cache) == []
    if exchange == "renameat2" and sys.platform == "linux":
        assert weakstil.fs._RENAMEAT2 not in (None, False)


def test_remove(cache):
    write_slide(cache, "S1", n=3)
    assert cache.remove("S1") is True and cache.complete_ids() == []
    assert cache.remove("S1") is False
    with pytest.raises(CacheNotFoundError, match="S1"):
        cache.read("S1")


def test_a_group_without_complete_is_absent(cache):
    import zarr

    group = zarr.open_group(str(cache.slides_dir / "S1"), mode="w-", attributes={"n_tiles": 2})
    group.create_array("features", shape=(2, DIM), dtype="float16", chunks=(2, DIM))
    group.create_array("coords", shape=(2, 2), dtype="int32", chunks=(2, 2))
    assert cache.complete_ids() == [] and not cache.is_complete("S1")
    with pytest.raises(CacheCorruptError, match="incomplete"):
        cache.read("S1")
    write_slide(cache, "S1", n=4)  # and writing it again replaces it
    assert cache.complete_ids() == ["S1"]


def test_is_complete_checks_the_source_file(cache, tmp_path):
    source = tmp_path / "S1.svs"
    source.write_bytes(b"slide")
    write_slide(cache, "S1", n=3, source=source)
    assert cache.is_complete("S1", source) and cache.is_complete("S1")
    mtime = source.stat().st_mtime
    os.utime(source, (mtime + 60, mtime + 60))  # the file was replaced
    assert not cache.is_complete("S1", source) and cache.is_complete("S1")
    os.utime(source, (mtime, mtime))
    assert cache.is_complete("S1", source)
    source.write_bytes(b"other slide")
    os.utime(source, (mtime, mtime))
    assert not cache.is_complete("S1", source)
    assert not cache.is_complete("S1", tmp_path / "gone.svs")


@pytest.mark.parametrize("damage", ["truncate", "delete", "garbage"])
def test_a_broken_slide_group_does_not_break_listing(cache, damage):
    write_slide(cache, "good", n=3)
    write_slide(cache, "bad", n=3)
    meta = cache.slides_dir / "bad" / "zarr.json"
    if damage == "truncate":
        meta.write_text(meta.read_text()[:20])
    elif damage == "delete":
        meta.unlink()
    else:
        meta.write_text('{"zarr_format": 3, "node_type": "array"}')
    with pytest.warns(CacheWarning, match="bad"):
        assert cache.complete_ids() == ["good"]
    with pytest.warns(CacheWarning):
        assert not cache.is_complete("bad")
    with pytest.raises(CacheCorruptError):
        cache.read("bad")
    assert cache.read("good").n_tiles == 3


def test_a_missing_chunk_is_detected_on_read(cache):
    write_slide(cache, "S1", n=12, chunk_rows=4)
    chunk = cache.slides_dir / "S1" / "features" / "c" / "1" / "0"
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(CacheCorruptError, match="NaN"):
        cache.read("S1")


def test_sweep_removes_debris_of_dead_processes_only(cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with cache.slide_writer("probe", grid(1), DIM) as w:  # learn this host's tag
            host = next(cache.staging_dir.iterdir()).name.rsplit(".", 1)[0].rsplit("-", 3)[2]
            w.write(0, feats(1))
        cache.staging_dir.mkdir()
        dead_dir = cache.staging_dir / f"S-1-{dead_pid}-{host}-deadbeef.new"
        alive_dir = cache.staging_dir / f"S-2-{alive.pid}-{host}-cafebabe.new"
        foreign = cache.staging_dir / f"S-3-{alive.pid}-00000000-cafebabe.new"
        for d in (dead_dir, alive_dir, foreign):
            (d / "features").mkdir(parents=True)
        removed = cache.sweep_staging()
        assert removed == [dead_dir]
        assert alive_dir.exists() and foreign.exists()  # another host's: kept for a day
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in cache.sweep_staging()) == [alive_dir.name]


KILL_SCRIPT = """
import sys, time
import numpy as np
from weakstil.embed.cache import FeatureCache
cache = FeatureCache.open({features!r}, {enc!r}, {til!r})
with cache.slide_writer("S1", np.zeros((100, 2)), {dim}, chunk_rows=10) as w:
    for row in range(100):
        w.write(row, np.ones((1, {dim})))
        if row == 40:
            print("halfway", flush=True)
        time.sleep(0.005 if row < 40 else 1.0)  # killed while sleeping here
"""


def test_a_writer_killed_mid_slide_leaves_the_store_readable(tmp_path):
    features = tmp_path / "features"
    enc, til = encoder_fp(), tiling_fp()
    cache = FeatureCache.open(features, enc, til)
    write_slide(cache, "S0", n=5)
    script = KILL_SCRIPT.format(features=str(features), enc=enc, til=til, dim=DIM)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "halfway"
        staged = list(cache.staging_dir.iterdir())
        assert len(staged) == 1 and (staged[0] / "features" / "c").is_dir()  # chunks on disk
        assert cache.complete_ids() == ["S0"]  # a slide being written is not listed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    reopened = FeatureCache.open(features, enc, til)  # sweeps the dead writer's debris
    assert staging_debris(reopened) == [] and reopened.complete_ids() == ["S0"]
    assert not reopened.is_complete("S1")
    write_slide(reopened, "S1", n=9)
    assert reopened.complete_ids() == ["S0", "S1"] and reopened.read("S1").n_tiles == 9


def test_errors_are_weakstil_errors_with_a_fix():
    for cls in (AmbiguousCacheError, CacheWriteError, CacheCorruptError, CacheMismatchError):
        assert issubclass(cls, WeakstilError) and issubclass(cls, ValueError) and cls.fix


def test_source_attrs(tmp_path):
    f = tmp_path / "a.svs"
    f.write_bytes(b"12345")
    attrs = source_attrs(f)
    assert attrs["source_size"] == 5 and attrs["source_path"] == str(f.resolve())


def test_a_non_store_folder_is_not_taken_over(tmp_path):
    target = tmp_path / "mine.zarr"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(CacheCorruptError, match="not a feature cache"):
        FeatureCache.open(target, encoder_fp(), tiling_fp())
    shutil.rmtree(target)
    created = FeatureCache.open(target, encoder_fp(), tiling_fp())  # an explicit store path
    assert created.path == target and (target / "zarr.json").is_file()


def test_staging_folder_tidied_away_by_another_writer_mid_mkdir(cache, monkeypatch):
    """Writers make ``.staging/`` and tidy it away when empty; the two can interleave.

    ``Path.mkdir(exist_ok=True)`` raised FileExistsError when another writer removed the folder
    between its mkdir and its is_dir check (seen once in CI in the concurrent test below). Here
    that interleaving is forced: the first mkdir that finds ``.staging/`` removes it, as the other
    writer's tidy would, before the error reaches the caller.
    """
    real_mkdir = os.mkdir
    staging = str(cache.staging_dir)
    raced = []

    def mkdir(path, *args, **kwargs):
        try:
            return real_mkdir(path, *args, **kwargs)
        except FileExistsError:
            if os.fspath(path) == staging and not raced:
                raced.append(path)
                os.rmdir(path)  # the other writer's tidy (it was empty)
            raise

    cache.staging_dir.mkdir()
    monkeypatch.setattr(os, "mkdir", mkdir)
    write_slide(cache, "S1", n=4)
    assert raced and cache.complete_ids() == ["S1"] and staging_debris(cache) == []
    cache.staging_dir.mkdir()
    raced.clear()
    assert cache.remove("S1") and raced and cache.complete_ids() == []


def test_a_file_where_the_staging_folder_goes_is_a_typed_error(cache):
    cache.staging_dir.write_text("not a folder")
    with pytest.raises(CacheWriteError, match="staging folder") as err:
        write_slide(cache, "S1", n=4)
    assert "delete" in err.value.fix and cache.complete_ids() == []


def test_concurrent_writers_and_readers_of_one_slide(cache):
    import threading

    errors = []

    def writer(seed):
        try:
            for i in range(8):
                write_slide(cache, "S1", n=5 + seed + i, seed=seed)
        except Exception as exc:  # collected: a thread's error would be lost
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in (0, 10)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        if cache.is_complete("S1"):
            got = cache.read("S1")
            assert got.features.shape[0] == got.coords_l0.shape[0] == got.attrs["n_tiles"]
    for t in threads:
        t.join()
    assert errors == [] and cache.complete_ids() == ["S1"]
    assert staging_debris(cache) == [] and cache.read("S1").n_tiles in (12, 22)


def test_creation_is_atomic_and_sweeps_a_killed_creators_debris(tmp_path):
    features = tmp_path / "features"
    name = store_name(encoder_fp(), tiling_fp())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    debris = features / f".{name}.{int(dead.stdout)}-abcd1234.creating"
    (debris / "slides").mkdir(parents=True)
    cache = FeatureCache.open(features, encoder_fp(), tiling_fp())
    assert sorted(p.name for p in features.iterdir()) == [name] == [cache.path.name]
