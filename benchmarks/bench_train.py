"""Train and Score cases.

**Train**: 5-fold cross-validation (``weakstil.mil.cv.cross_validate``, the default ``TrainConfig``:
gated attention, early stopping on validation R²) on synthetic bags with a planted signal, at several
bag counts. Each run is a subprocess, so its peak RSS is its own. Each tile has a latent sTIL
fraction and a stroma flag; its features are a fixed random projection of (fraction, stroma, noise)
plus Gaussian noise. A slide's label is the mean fraction of its stroma tiles × 100, so the model can
learn it and early stopping behaves as on real features. Bags are float16, as the feature cache
stores them. The curve is reported as seconds per bag relative to the smallest run (1.0 = linear).

**Bootstrap**: time of the pooled 95 % confidence intervals (1,000 resamples of 50 slides).

**Score**: per-slide latency of ``FeatureCache.read`` + ``TrainedModel.predict`` (a 5-member
ensemble, as ``weakstil train`` deploys) on one cached slide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import Row

NOISE_POOL = 1 << 25  # float16 noise values shared by all bags (random windows of it)


def make_bags(n_bags: int, n_tiles: int, dim: int, *, seed: int = 0, noise: float = 1.0):
    """(bags: slide_id -> (n_tiles, dim) float16, labels DataFrame) with a learnable signal.

    Two slides per patient. Noise comes from random windows of one shared pool, so thousands of
    bags are made in seconds rather than minutes.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(3, dim)).astype(np.float32)
    size = n_tiles * dim
    pool_size = int(min(max(n_bags * size // 8, 2 * size), max(NOISE_POOL, 2 * size)))
    pool = (noise * rng.standard_normal(pool_size, dtype=np.float32)).astype(np.float16)
    bags, rows = {}, []
    for s in range(n_bags):
        level = rng.beta(1.2, 2.0)
        stroma = rng.random(n_tiles) < rng.uniform(0.3, 0.7)
        stroma[0] = True
        frac = np.where(stroma, np.clip(level + rng.normal(0, 0.05, n_tiles), 0, 1),
                        rng.random(n_tiles)).astype(np.float32)
        latent = np.stack([frac, stroma.astype(np.float32),
                           rng.standard_normal(n_tiles, dtype=np.float32)], axis=1)
        start = int(rng.integers(0, len(pool) - size))
        feats = (latent @ proj).astype(np.float16)
        feats += pool[start : start + size].reshape(n_tiles, dim)
        slide_id = f"S{s:05d}"
        bags[slide_id] = feats
        rows.append((slide_id, f"P{s // 2:05d}", float(100 * frac[stroma].mean())))
    table = pd.DataFrame(rows, columns=["slide_id", "patient_id", "stil"])
    return bags, table


def time_cv(n_bags: int, n_tiles: int, dim: int, *, max_epochs: int | None = None,
            accelerator: str = "cpu", seed: int = 0) -> dict:
    """One ``cross_validate`` run in this process: seconds (bag generation not counted), R², epochs."""
    import resource

    from weakstil.mil.cv import cross_validate
    from weakstil.mil.fit import TrainConfig

    cfg = TrainConfig(accelerator=accelerator, n_boot=200, seeds=1,  # one model per fold, as the history measured
                      **({"max_epochs": max_epochs, "patience": max_epochs} if max_epochs else {}))
    t0 = time.perf_counter()
    bags, table = make_bags(n_bags, n_tiles, dim, seed=seed)
    gen = time.perf_counter() - t0
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    with TreeMemory() as memory:
        cv = cross_validate(bags, table, cfg, progress=False)
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {"bags": n_bags, "tiles": n_tiles, "dim": dim, "seconds": seconds, "generate_seconds": gen,
            "cpu_seconds": cpu, "cores": _cores(), "cpu_seconds_per_core": cpu / _cores(),
            "r2": float(cv.pooled["r2"]), "epochs": [int(i["epochs_run"]) for i in cv.fold_info],
            "fold_seconds": [float(i["seconds"]) for i in cv.fold_info],
            "bag_gb": n_bags * n_tiles * dim * 2 / 1e9,
            "peak_rss_gb": max(memory.peak_gb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
            "peak_self_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class TreeMemory:
    """Samples (every 0.25 s) this process's RSS plus its child processes' *private* memory (fold
    processes share the bags copy-on-write; counting their full RSS would count the bags again)."""

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval, self.peak_gb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _kb(pid: int | str, fields: tuple[str, ...]) -> int:
        total = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                name = line.split(":", 1)[0]
                if name in fields:
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return total

    def sample(self) -> float:
        kb = self._kb("self", ("Rss",))
        children = set()
        for task in Path("/proc/self/task").glob("*/children"):
            try:
                children.update(task.read_text().split())
            except OSError:
                pass
        for pid in children:
            kb += self._kb(pid, ("Private_Clean", "Private_Dirty"))
        return kb / 2**20

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak_gb = max(self.peak_gb, self.sample())

    def __enter__(self):
        self.peak_gb = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the fold processes)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cv_subprocess(sizes: list[int], mode, accelerator: str) -> list[dict]:
    """Run :func:`time_cv` for each bag count, smallest first, in one fresh subprocess (its peak RSS
    after each run is that run's own, the runs growing)."""
    args = {"n_tiles": mode.train_tiles, "dim": mode.train_dim, "max_epochs": mode.train_epochs,
            "accelerator": accelerator}
    code = ("import gc, json, sys; from benchmarks.bench_train import time_cv\n"
            f"for n in {sorted(sizes)!r}:\n"
            f"    print('RESULT', json.dumps(time_cv(n, **{args!r})), flush=True)\n"
            "    gc.collect()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    done = {r["bags"] for r in results}
    for n in sorted(sizes):
        if n not in done:
            results.append({"bags": n, "error": (proc.stderr or proc.stdout)[-2000:],
                            "returncode": proc.returncode})
    return results


def fits_in_memory(n_bags: int, mode) -> bool:
    """Bags (float16) plus headroom must fit in the machine's available memory."""
    need = n_bags * mode.train_tiles * mode.train_dim * 2 * 1.35 + 3e9
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return True
    return need < avail


def run_train(mode, device: str = "cpu") -> list[Row]:
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    fit = [n for n in mode.train_sizes if fits_in_memory(n, mode)]
    results = _cv_subprocess(fit, mode, accelerator) if fit else []
    results += [{"bags": n, "skipped": "does not fit in the available memory"}
                for n in mode.train_sizes if n not in fit]
    results.sort(key=lambda r: r["bags"])
    rows: list[Row] = []
    done = [r for r in results if "seconds" in r]
    base = done[0] if done else None
    shape = f"{mode.train_tiles:,} tiles × {mode.train_dim}"
    for r in results:
        if "seconds" not in r:
            rows.append(Row("train", f"5-fold CV, {r['bags']:,} bags × {shape}", float("nan"), "s",
                            note=r.get("skipped") or "failed", extra=r))
            continue
        per_bag = r["seconds"] / r["bags"]
        ratio = per_bag / (base["seconds"] / base["bags"])
        target, met = "", None
        if r["bags"] == 1000 and mode.train_tiles == 2000 and mode.train_dim == 512:
            target = "< 300 s, < 24 GB"
            met = r["seconds"] < 300 and r["peak_rss_gb"] < 24
        rows.append(Row("train", f"5-fold CV, {r['bags']:,} bags × {shape}", r["seconds"], "s",
                        f"s/bag at {base['bags']:,} bags (1.00 = linear)" if r is not base else "",
                        base["seconds"] / base["bags"] if r is not base else None,
                        ratio if r is not base else None, target, met,
                        note=f"R² {r['r2']:.2f}, epochs {'/'.join(map(str, r['epochs']))}, "
                             f"CPU time / cores {r['cpu_seconds_per_core']:.0f} s, "
                             f"peak RSS {r['peak_rss_gb']:.1f} GB",
                        extra=r))
    rows.append(run_bootstrap())
    return rows


def run_bootstrap(n_slides: int = 50, n_boot: int = 1000) -> Row:
    """Time of the pooled 95 % bootstrap intervals ``weakstil train`` writes (r2, pearson, … and
    three AUCs) for ``n_slides`` slides; target < 2 s (it runs once per model)."""
    from weakstil.mil.metrics import bootstrap_intervals

    rng = np.random.default_rng(0)
    t = rng.uniform(0, 90, n_slides)
    p = np.clip(t + rng.normal(0, 15, n_slides), 0, 100)
    bootstrap_intervals(t, p, cutoffs=(10, 30, 50), n_boot=10, seed=0)  # imports, not work
    t0 = time.perf_counter()
    ci = bootstrap_intervals(t, p, cutoffs=(10, 30, 50), n_boot=n_boot, seed=0)
    seconds = time.perf_counter() - t0
    return Row("train", f"bootstrap 95 % CIs, {n_boot:,} resamples × {n_slides} slides, 3 cut-offs", seconds,
               "s", target="< 2 s", met=seconds < 2.0, note=f"R² CI {ci['r2'][0]:.2f}–{ci['r2'][1]:.2f}",
               extra={"slides": n_slides, "resamples": n_boot})


def run_score(mode, device: str = "cpu") -> list[Row]:
    import torch

    from weakstil.embed.cache import FeatureCache
    from weakstil.mil.model import MILRegressor, TrainedModel

    n, dim = mode.score_tiles, 512
    torch.manual_seed(0)
    model = TrainedModel([MILRegressor(dim) for _ in range(5)], fingerprint={})
    feats = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    coords = np.zeros((n, 2), dtype=np.int32)
    coords[:, 0] = np.arange(n) * 448
    with tempfile.TemporaryDirectory(prefix="weakstil-bench-score-") as tmp:
        cache = FeatureCache.open(Path(tmp), {"name": "bench", "weights_sha256": "0" * 64, "embed_dim": dim},
                                  {"tile_px": 224, "mpp": 0.5})
        with cache.slide_writer("slide", coords, dim, {"slide_mpp": 0.25, "tile_size_l0": 448.0}) as w:
            w.write(0, feats)
        model.predict(cache.read("slide").features)  # warm-up
        total, predict = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            x = cache.read("slide").features
            t1 = time.perf_counter()
            pred = model.predict(x)
            t2 = time.perf_counter()
            total.append(t2 - t0)
            predict.append(t2 - t1)
    assert np.isfinite(pred.score)
    return [Row("score", f"per-slide latency, {n:,} tiles × {dim}, 5-member ensemble (read + predict)",
                min(total) * 1000, "ms", "predict alone", min(predict) * 1000, min(predict) / min(total),
                extra={"tiles": n, "members": 5})]


if __name__ == "__main__":  # python -m benchmarks.bench_train BAGS TILES DIM [MAX_EPOCHS]
    a = sys.argv[1:]
    print(json.dumps(time_cv(int(a[0]), int(a[1]), int(a[2]), max_epochs=int(a[3]) if len(a) > 3 else None)))
