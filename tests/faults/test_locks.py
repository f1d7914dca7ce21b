"""#13.7: an empty or foreign lock file never makes a rerun skip a slide silently with exit 0.

An empty lock older than its grace period is debris and is taken over; a slide held by another live
process is named, and the run exits 3 ("left to another process"), or waits for it with --wait.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from tests.faults.conftest import invoke, score_args
from weakstil.cli.app import EXIT_LEFT_TO_OTHERS
from weakstil.fs import EMPTY_LOCK_GRACE_S, acquire_lock


def _age(path, seconds):
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_an_old_empty_lock_is_debris_and_is_taken_over(tmp_path):
    path = tmp_path / "S1.lock"
    path.write_bytes(b"")
    _age(path, EMPTY_LOCK_GRACE_S + 5)
    lock, holder = acquire_lock(tmp_path, "S1")
    assert lock is not None, holder
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_an_old_garbage_lock_is_taken_over_too(tmp_path):
    path = tmp_path / "S1.lock"
    path.write_bytes(b"\x00\xffnot a lock")
    _age(path, EMPTY_LOCK_GRACE_S + 5)
    lock, _ = acquire_lock(tmp_path, "S1")
    assert lock is not None
    lock.release()


def test_a_slide_left_to_a_live_process_is_named_and_exits_3(world, tmp_path):
    out = tmp_path / "results"
    locks = out / ".locks"
    locks.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (locks / "A1.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                    "start": None, "token": "x", "since": "now"}))
        result = invoke(*score_args(world, world["A"], out, "--outputs", "csv"))
        assert result.exit_code == EXIT_LEFT_TO_OTHERS == 3, result.output
        assert "A1" in result.output and "another process" in result.output and str(holder.pid) in result.output
        rows = (out / "scores.csv").read_text()
        assert "A0,"in rows and ",ok," in rows and "A1,,,pending" in rows
    finally:
        holder.kill()
        holder.wait()


def test_wait_waits_for_the_other_process_and_then_scores(world, tmp_path, monkeypatch):
    from weakstil.runs import runner

    monkeypatch.setattr(runner, "WAIT_POLL_S", 0.2)
    out = tmp_path / "results"
    locks = out / ".locks"
    locks.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    (locks / "A1.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                "start": None, "token": "x", "since": "now"}))
    try:
        result = invoke(*score_args(world, world["A"], out, "--outputs", "csv", "--wait"))
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert "A1,,,pending" not in (out / "scores.csv").read_text()
