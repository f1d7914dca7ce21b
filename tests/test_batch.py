"""The per-slide batch runner: skip done, lock, run, record, go on."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from weakstil.errors import DuplicateSlideIdError, MissingMppError
from weakstil.fs import _proc_start, acquire_lock
from weakstil.runs.runner import (
    ALREADY_DONE,
    LOCKED,
    Outcome,
    counts,
    run_batch,
    summarize,
    write_outcomes_csv,
)

REPO = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(lock_dir: Path, key: str, **holder) -> Path:
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{key}.lock"
    content = {"pid": os.getpid(), "host": socket.gethostname(), "start": None,
               "token": "t", "since": "2026-01-01T00:00:00+00:00"}
    content.update(holder)
    path.write_text(json.dumps(content))
    return path


def test_one_failure_does_not_stop_the_batch():
    def job(item):
        if item == "a":
            raise MissingMppError("no mpp in the file")
        if item == "b":
            raise ValueError("boom")
        return item.upper()

    outcomes = run_batch(["a", "b", "c"], job, progress=False)
    a, b, c = outcomes
    assert (a.status, a.reason, a.error) == ("failed", "MissingMppError", "no mpp in the file")
    assert "--mpp" in a.fix and a.traceback == ""
    assert (b.status, b.reason, b.error) == ("failed", "ValueError", "boom")
    assert "Traceback" in b.traceback and "boom" in b.traceback and b.fix
    assert (c.status, c.result, c.ok) == ("done", "C", True)
    assert not a.ok and counts(outcomes) == {"done": 1, "skipped": 0, "failed": 2}


def test_an_output_folder_that_vanishes_stops_the_batch_with_one_clear_error(tmp_path):
    """Deleting the folder a batch writes into fails the slide at hand; every later slide would fail
    the same way, so the run stops there with a typed error naming the folder (not the same
    FileNotFoundError on every slide left), and a failure with the folder in place stays one slide's."""
    import shutil

    from weakstil.runs.jobs import _Job

    out = tmp_path / "features"
    out.mkdir()

    class Writer(_Job):
        def build(self):
            return True

        def is_done(self, item):
            return False

        def key(self, item):
            return item

        def output_roots(self):
            return [out]

        def run(self, item):
            if item == "bad":
                raise ValueError("a slide's own problem")
            if item == "b":
                shutil.rmtree(out)  # someone deletes the folder while b is written
            (out / f"{item}.txt").write_text(item)
            return item

    outcomes = run_batch(["bad", "a", "b", "c", "d"], Writer(), progress=False, lock_dir=None)
    bad, a, b, c, d = outcomes
    assert (bad.status, bad.reason, bad.fatal) == ("failed", "ValueError", False)  # the folder was there
    assert a.status == "done"
    assert (b.status, b.reason, b.fatal) == ("failed", "OutputFolderGoneError", True)
    assert str(out) in b.error and "disappeared" in b.error and "FileNotFoundError" in b.error
    assert "restore that folder" in b.fix
    assert [o.reason for o in (c, d)] == ["stopped", "stopped"] and not out.exists()


def test_done_items_are_skipped_without_running():
    ran = []
    outcomes = run_batch(["a", "b"], ran.append, is_done=lambda item: item == "a", progress=False)
    assert ran == ["b"]
    assert [(o.key, o.status, o.reason) for o in outcomes] == [("a", "skipped", ALREADY_DONE),
                                                               ("b", "done", "")]


def test_an_is_done_that_raises_fails_that_item_only():
    def is_done(item):
        if item == "a":
            raise OSError("unreadable cache")
        return False

    outcomes = run_batch(["a", "b"], lambda item: None, is_done=is_done, progress=False)
    assert [o.status for o in outcomes] == ["failed", "done"] and outcomes[0].reason == "OSError"


def test_keys_default_to_path_stems_and_must_be_unique(tmp_path):
    outcomes = run_batch([tmp_path / "S1.svs", tmp_path / "x" / "S2.tif"], lambda p: None,
                         progress=False)
    assert [o.key for o in outcomes] == ["S1", "S2"]
    with pytest.raises(DuplicateSlideIdError, match="S1"):
        run_batch([tmp_path / "S1.svs", tmp_path / "x" / "S1.tif"], lambda p: None, progress=False)


def test_the_lock_is_held_while_running_and_released_after(tmp_path):
    locks = tmp_path / "locks"
    seen = {}

    def job(item):
        lock = json.loads((locks / f"{item}.lock").read_text())
        seen[item] = lock
        if item == "b":
            raise RuntimeError("fails")

    outcomes = run_batch(["a", "b"], job, lock_dir=locks, progress=False)
    assert [o.status for o in outcomes] == ["done", "failed"]
    assert seen["a"]["pid"] == os.getpid() and seen["a"]["host"] == socket.gethostname()
    assert list(locks.iterdir()) == []


def test_ctrl_c_releases_the_lock_and_propagates(tmp_path):
    locks = tmp_path / "locks"

    def job(item):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(["a", "b"], job, lock_dir=locks, progress=False)
    assert list(locks.iterdir()) == []


def test_a_live_lock_is_respected(tmp_path, sleeper):
    locks = tmp_path / "locks"
    lock = write_lock(locks, "a", pid=sleeper.pid, start=_proc_start(sleeper.pid))
    ran = []
    outcomes = run_batch(["a", "b"], ran.append, lock_dir=locks, progress=False)
    assert ran == ["b"]
    a = outcomes[0]
    assert (a.status, a.reason) == ("skipped", LOCKED)
    assert str(sleeper.pid) in a.error and str(lock) in a.fix
    assert lock.exists() and json.loads(lock.read_text())["pid"] == sleeper.pid


def test_a_lock_from_another_host_is_respected(tmp_path):
    locks = tmp_path / "locks"
    write_lock(locks, "a", pid=dead_pid(), host="some-other-node")
    outcomes = run_batch(["a"], lambda item: None, lock_dir=locks, progress=False)
    assert (outcomes[0].status, outcomes[0].reason) == ("skipped", LOCKED)
    assert "some-other-node" in outcomes[0].error


@pytest.mark.parametrize("holder", ["dead pid", "reused pid", "our pid, not ours", "garbage"])
def test_a_stale_lock_is_taken_over(tmp_path, sleeper, holder):
    locks = tmp_path / "locks"
    if holder == "dead pid":
        lock = write_lock(locks, "a", pid=dead_pid())
    elif holder == "reused pid":  # a live process, but not the one that took the lock
        lock = write_lock(locks, "a", pid=sleeper.pid, start=-1)
    elif holder == "our pid, not ours":  # a previous container run that had our pid
        lock = write_lock(locks, "a", pid=os.getpid(), token="from-a-previous-life")
    else:
        lock = write_lock(locks, "a")
        lock.write_text("{trunc")
        os.utime(lock, (0, 0))  # written long ago, never completed
    ran = []
    outcomes = run_batch(["a"], ran.append, lock_dir=locks, progress=False)
    assert ran == ["a"] and outcomes[0].status == "done"
    assert not lock.exists() and list(locks.iterdir()) == []


def test_a_fresh_empty_lock_counts_as_live(tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "a.lock").write_text("")  # another process between O_EXCL create and write
    lock, holder = acquire_lock(locks, "a")
    assert lock is None and "just taking" in holder


DIE_TAKING_LOCK = """
import os, signal, sys
import weakstil.fs as fs
def die(*args, **kwargs):  # killed between creating a lock's file (or its staging copy) and finishing it
    os.kill(os.getpid(), signal.SIGKILL)
os.link = os.fdopen = die
fs.acquire_lock(sys.argv[1], "a")
"""


def test_a_process_killed_while_taking_a_lock_does_not_hold_the_slide(tmp_path):
    """A run killed the moment it takes a slide's lock (as a SIGKILL right after a slide finishes
    meets it) must not leave an empty lock file that keeps the slide from the next run for a minute."""
    locks = tmp_path / "locks"
    locks.mkdir()
    done = subprocess.run([sys.executable, "-c", DIE_TAKING_LOCK, str(locks)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    assert not (locks / "a.lock").exists()
    lock, holder = acquire_lock(locks, "a")
    assert lock is not None, holder
    lock.release()
    assert [p.name for p in locks.iterdir()]  # the killed process's staging copy is still there
    run_batch([], lambda item: None, lock_dir=locks, progress=False)  # a batch sweeps it
    assert list(locks.iterdir()) == []


def test_without_hard_links_a_lock_is_still_created_whole(tmp_path, monkeypatch):
    import weakstil.fs as fs

    def no_link(*args):
        raise PermissionError(1, "Operation not permitted")  # some SMB / FAT mounts

    monkeypatch.setattr(fs.os, "link", no_link)
    lock, holder = acquire_lock(tmp_path, "a")
    assert lock is not None, holder
    assert json.loads((tmp_path / "a.lock").read_text())["pid"] == os.getpid()
    assert acquire_lock(tmp_path, "a")[0] is None  # held: a second taker is refused
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_is_done_is_checked_again_once_locked(tmp_path):
    calls = []

    def is_done(item):
        calls.append(item)
        return len(calls) > 1  # another process finished it while we took the lock

    outcomes = run_batch(["a"], lambda item: pytest.fail("must not run"), is_done=is_done,
                         lock_dir=tmp_path / "locks", progress=False)
    assert (outcomes[0].status, outcomes[0].reason) == ("skipped", ALREADY_DONE)


SHARE_SCRIPT = """
import sys, time
from pathlib import Path
from weakstil.runs.runner import run_batch
out = Path({out!r})
def job(item):
    time.sleep(0.15)
    with open(out / "log.txt", "a") as f:
        f.write(item + "\\n")
    (out / (item + ".done")).touch()
outcomes = run_batch([f"s{{i}}" for i in range(6)], job, lock_dir=out / "locks", progress=False,
                     is_done=lambda item: (out / (item + ".done")).exists())
print(",".join(o.status for o in outcomes))
"""


def test_two_processes_share_a_folder_without_doing_work_twice(tmp_path):
    script = textwrap.dedent(SHARE_SCRIPT.format(out=str(tmp_path)))
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    statuses = [p.communicate(timeout=60)[0].strip().split(",") for p in procs]
    assert all(p.returncode == 0 for p in procs)
    done = sorted((tmp_path / "log.txt").read_text().split())
    assert done == [f"s{i}" for i in range(6)]  # each once
    assert sum(s.count("done") for s in statuses) == 6
    assert list((tmp_path / "locks").iterdir()) == []


def test_on_outcome_sees_each_outcome_as_it_comes():
    seen = []
    run_batch(["a", "b"], lambda item: None, progress=False, on_outcome=seen.append)
    assert [o.key for o in seen] == ["a", "b"]


def sample_outcomes():
    return [Outcome("S1", "done", 1.5), Outcome("S2", "skipped", reason=ALREADY_DONE),
            Outcome("S3", "skipped", reason=LOCKED, error="locked by pid 7"),
            Outcome("S4", "failed", 0.2, error="no mpp, here", reason="MissingMppError",
                    fix="pass --mpp")]


def test_summary_counts_statuses_with_reasons_and_lists_failures():
    console = Console(record=True, width=160)
    console.print(summarize(sample_outcomes()))
    text = console.export_text()
    assert "done" in text and "skipped" in text and "failed" in text
    assert "already_done 1" in text and "locked 1" in text and "MissingMppError 1" in text
    assert "S4" in text and "pass --mpp" in text
    console = Console(record=True, width=160)
    console.print(summarize(sample_outcomes()[:1]))
    assert "failures" not in console.export_text()


def test_outcomes_csv_is_written_atomically(tmp_path):
    path = write_outcomes_csv(sample_outcomes(), tmp_path / "out" / "outcomes.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["key"] for r in rows] == ["S1", "S2", "S3", "S4"]
    assert rows[3] == {"key": "S4", "status": "failed", "seconds": "0.200",
                       "reason": "MissingMppError", "error": "no mpp, here", "fix": "pass --mpp"}
    assert sorted(os.listdir(path.parent)) == ["outcomes.csv"]


def test_a_done_items_stale_lock_is_cleared_and_a_live_one_kept(tmp_path, sleeper):
    """A run killed between finishing an item and releasing its lock leaves the lock behind; the
    next run finds the item done and skips it — and removes the dead run's lock, never a live one's."""
    locks = tmp_path / "locks"
    stale = write_lock(locks, "a", pid=dead_pid())
    live = write_lock(locks, "b", pid=sleeper.pid)
    ran = []
    outcomes = run_batch(["a", "b"], ran.append, is_done=lambda item: True, lock_dir=locks, progress=False)
    assert ran == [] and [(o.status, o.reason) for o in outcomes] == [("skipped", ALREADY_DONE)] * 2
    assert not stale.exists()
    assert live.exists() and json.loads(live.read_text())["pid"] == sleeper.pid


def test_a_done_item_stays_skipped_when_its_stale_lock_cannot_be_cleared(tmp_path, monkeypatch):
    """A lock folder that refuses writes (read-only mount) must not turn a finished item into a failure."""
    import weakstil.fs

    locks = tmp_path / "locks"
    write_lock(locks, "a", pid=dead_pid())

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(weakstil.fs, "acquire_lock", refuse)
    outcomes = run_batch(["a"], lambda item: None, is_done=lambda item: True, lock_dir=locks, progress=False)
    assert [(o.status, o.reason) for o in outcomes] == [("skipped", ALREADY_DONE)]
