"""Cache case: FeatureCache write and read MB/s (float16 features), time to load one bag.

Writes ``cache_slides`` slide groups of ``cache_tiles`` × 512 float16 random features through
``slide_writer`` (in 256-row batches, as extraction hands them over), then reads them back with
``FeatureCache.read`` (which checks shape, dtype and finiteness). The bag load time is ``read`` plus
the float32 conversion training does (:func:`weakstil.mil.fit.load_bags`). The reference for both rates
is ``numpy.save``/``numpy.load`` of the same bytes to the same disk (uncompressed, no checks).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Row

DIM = 512
BATCH_ROWS = 256


def run(mode, device: str = "cpu") -> list[Row]:
    from weakstil.embed.cache import FeatureCache
    from weakstil.mil.fit import load_bags

    rng = np.random.default_rng(0)
    n, slides = mode.cache_tiles, mode.cache_slides
    feats = rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
    coords = np.stack(np.divmod(np.arange(n), 1000), axis=1)[:, ::-1].astype(np.int32) * 448
    mb = feats.nbytes / 1e6
    encoder_fp = {"name": "bench", "weights_sha256": "0" * 64, "embed_dim": DIM}
    tiling_fp = {"tile_px": 224, "mpp": 0.5, "overlap": 0}
    with tempfile.TemporaryDirectory(prefix="weakstil-bench-cache-") as tmp:
        cache = FeatureCache.open(Path(tmp), encoder_fp, tiling_fp)
        write_s = []
        for s in range(slides):
            t0 = time.perf_counter()
            with cache.slide_writer(f"slide{s}", coords, DIM, {"slide_mpp": 0.25, "tile_size_l0": 448.0}) as w:
                for start in range(0, n, BATCH_ROWS):
                    w.write(start, feats[start : start + BATCH_ROWS])
            write_s.append(time.perf_counter() - t0)
        read_s, load_s = [], []
        for s in range(slides):
            t0 = time.perf_counter()
            got = cache.read(f"slide{s}").features
            read_s.append(time.perf_counter() - t0)
            assert got.shape == feats.shape
            t0 = time.perf_counter()
            load_bags(cache, [f"slide{s}"])
            load_s.append(time.perf_counter() - t0)
        raw = Path(tmp) / "raw.npy"
        np_w, np_r = [], []
        for _ in range(slides):
            t0 = time.perf_counter()
            np.save(raw, feats)
            np_w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.load(raw)
            np_r.append(time.perf_counter() - t0)
        disk = sum(f.stat().st_size for f in (cache.slides_dir / "slide0").rglob("*") if f.is_file())
    w_rate, r_rate = mb / min(write_s), mb / min(read_s)
    extra = {"tiles": n, "dim": DIM, "slides": slides, "mb_per_slide": round(mb, 2),
             "stored_mb_per_slide": round(disk / 1e6, 2)}
    return [
        Row("cache", f"write {n:,} × {DIM} float16 per slide", w_rate, "MB/s", "numpy.save", mb / min(np_w),
            w_rate / (mb / min(np_w)), extra=extra),
        Row("cache", "read (FeatureCache.read, checked)", r_rate, "MB/s", "numpy.load", mb / min(np_r),
            r_rate / (mb / min(np_r))),
        Row("cache", f"load one {n:,}-tile bag as float32 (load_bags)", min(load_s), "s",
            "FeatureCache.read alone", min(read_s), min(read_s) / min(load_s)),
    ]
