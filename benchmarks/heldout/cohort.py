"""Writing a cohort: slides, truth, ``labels.csv``, ``render_log.csv`` and ``DONE``."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from weakstil.synth.truth import atomic_open, load_truth, write_truth
from weakstil.wsi.writer import write_aperio_tiff

from .params import VERSION
from .render import render


def _finished(out_dir, sid: str, seed: int, idx: int, setting: str, size_um: float):
    """The row of a slide already written with the same (version, seed, index, setting, size), else
    None: its truth is written last (atomically), so a truth file means a complete slide."""
    truth_path = Path(out_dir) / "truth" / f"{sid}.npz"
    if not (truth_path.exists() and (Path(out_dir) / "slides" / f"{sid}.svs").exists()):
        return None
    try:
        t = load_truth(truth_path)
        plan = json.loads(str(t["plan"]))
        stil, label, mpp = float(t["stil"]), float(t["label"]), float(t["slide_mpp"])
    except (OSError, ValueError, KeyError):
        return None
    same = (plan.get("version"), plan.get("seed"), plan.get("index"), plan.get("setting"), plan.get("size_um"))
    if same != (VERSION, seed, idx, setting, float(size_um)):
        return None
    return sid, stil, label, mpp, 0.0, 0.0, plan["target_stil"]


def make_one(args):
    """Render and write slide ``HOG-NNN`` unless the same one is there; returns (slide id, true sTIL,
    label, mpp, render s, write s, target sTIL)."""
    out_dir, seed, idx, setting, size_um = args
    t0 = time.time()
    sid = f"HOG-{idx:03d}"
    done = _finished(out_dir, sid, seed, idx, setting, size_um)
    if done is not None:
        return done
    img, mpp, q, truth, label, plan, _ = render(seed, idx, setting, size_um)
    t1 = time.time()
    write_aperio_tiff(Path(out_dir) / "slides" / f"{sid}.svs", img, mpp, quality=q, maxworkers=1)
    write_truth(Path(out_dir) / "truth" / f"{sid}.npz", truth, slide_mpp=mpp, plan=json.dumps(plan, sort_keys=True))
    t2 = time.time()
    return sid, float(truth["stil"]), label, mpp, t1 - t0, t2 - t1, plan["target_stil"]


def _report(r):
    print(f"{r[0]} stil={r[1]:.2f} (target {r[6]:.2f}) label={r[2]:g} mpp={r[3]:g} "
          f"render={r[4]:.1f}s write={r[5]:.1f}s", flush=True)


def _write_tables(out, rows):
    with atomic_open(out / "labels.csv", "w") as fh:  # written whole or not at all
        w = csv.writer(fh)
        w.writerow(["slide_id", "patient_id", "stil"])
        for r in rows:
            w.writerow([r[0], r[0], f"{r[2]:g}"])
    with atomic_open(out / "render_log.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "true_stil", "target_stil", "label", "mpp", "render_s", "write_s"])
        for r in rows:
            w.writerow([r[0], f"{r[1]:.4f}", r[6], f"{r[2]:g}", r[3], f"{r[4]:.2f}", f"{r[5]:.2f}"])


def write_cohort(out, *, n=40, seed=1, setting="standard", size_um=1200.0, workers=None, progress=True, start=0):
    """Write slides ``HOG-{start:03d}`` … of one cohort under ``out``; ``workers`` > 1 renders in a
    fork pool (default 2). Slides already written from the same plan are kept (a rerun resumes).
    Returns ``out`` as a Path."""
    out = Path(out)
    workers = 2 if workers is None else int(workers)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, i, setting, size_um) for i in range(start, start + n)]
    rows = []
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers, maxtasksperchild=8) as pool:
            for r in pool.imap_unordered(make_one, jobs):
                rows.append(r)
                if progress:
                    _report(r)
    else:
        for j in jobs:
            r = make_one(j)
            rows.append(r)
            if progress:
                _report(r)
    rows.sort()
    _write_tables(out, rows)
    (out / "DONE").write_text("ok\n")
    return out
