"""The benchmark suite runs (smoke sizes) so that it cannot rot; parallel folds train what sequential do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_entry_point_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, WEAKSTIL_BENCH_DIR=str(tmp_path / "slides"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["failures"] == {}
    cases = {row["case"] for row in doc["rows"]}
    assert cases == {"read", "extract", "whole", "precision", "cache", "train", "score", "memory"}
    for row in doc["rows"]:
        assert row["value"] is not None and row["value"] > 0, row
        if row["ref_value"] is not None:
            assert row["ratio"] is not None and row["ratio"] > 0, row
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["cpu_model"] is not None
    assert "| case | figure |" in proc.stdout  # the markdown table


def test_parallel_folds_train_what_sequential_folds_do():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import FAST, make_cohort

    from weakstil.mil.cv import cross_validate, fold_parallelism

    bags, table = make_cohort(n_slides=20, n_tiles=24)
    cfg = replace(FAST, max_epochs=4, patience=4, n_boot=50, seeds=2)  # two models per fold: 6 in the pool
    one = cross_validate(bags, table, replace(cfg, fold_processes=1), progress=False)
    two = cross_validate(bags, table, replace(cfg, fold_processes=2), progress=False)
    assert np.allclose(one.predictions, two.predictions, atol=1e-4)
    assert len(two.models) == 2 * cfg.n_folds and two.member_folds.tolist() == one.member_folds.tolist()
    assert [i["seed"] for i in two.member_info] == [i["seed"] for i in one.member_info]
    assert np.allclose(one.member_scores, two.member_scores, atol=1e-4, equal_nan=True)
    assert [h.best_epoch for h in one.histories] == [h.best_epoch for h in two.histories]
    x = next(iter(bags.values()))
    assert np.allclose(one.models[0].predict_bag(__import__("torch").from_numpy(x))[0],
                       two.models[0].predict_bag(__import__("torch").from_numpy(x))[0], atol=1e-5)
    assert fold_parallelism(replace(cfg, fold_processes=1), 10**9) == (1, 0)
    assert fold_parallelism(cfg, 10)[0] == 1  # small cohorts: not worth the processes
