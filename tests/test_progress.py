"""The one progress display: rich bars with a rate in a terminal, short plain lines in a log."""

from __future__ import annotations

from dataclasses import replace

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from weakstil.progress import (
    MAX_LINE,
    NullProgress,
    PlainProgress,
    RichProgress,
    progress,
    rate_text,
)
from weakstil.runs.runner import run_batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def log_lines(text: str) -> list[str]:
    assert "\r" not in text
    lines = text.splitlines()
    assert all(len(line) <= MAX_LINE for line in lines), max(lines, key=len)
    return lines


@pytest.mark.parametrize(("n", "seconds", "unit", "expected"), [
    (300, 2.0, "tiles", "150 tiles/s"),
    (3, 2.0, "slides", "1.5 slides/s"),
    (2, 5.0, "slides", "2.5 s/slide"),
    (1, 4.0, "folds", "4.0 s/fold"),
    (0, 3.0, "slides", ""),
    (3, 0.0, "slides", ""),
])
def test_rate_text(n, seconds, unit, expected):
    assert rate_text(n, seconds, unit) == expected


def test_the_display_follows_the_console():
    assert isinstance(progress(False), NullProgress) and not isinstance(progress(False), PlainProgress)
    assert isinstance(progress(True, console=Console(file=io.StringIO())), PlainProgress)
    assert isinstance(progress(True, console=Console(file=io.StringIO(), force_terminal=True)), RichProgress)


def test_plain_lines_one_per_finished_item_with_count_rate_and_stats():
    out, clock = io.StringIO(), FakeClock()
    with progress(True, console=Console(file=out), clock=clock) as bar:
        task = bar.add_task("extract", total=3, unit="slides")
        for i in range(3):
            clock.now += 2.0
            bar.update(task, description=f"extract S{i}")  # not a finished item: no line
            bar.update(task, advance=1, description="extract", stats=f"{i + 1} done")
    lines = log_lines(out.getvalue())
    assert lines == ["extract: 1/3 slides, 2.0 s/slide, 2 s, 1 done",
                     "extract: 2/3 slides, 2.0 s/slide, 4 s, 2 done",
                     "extract: 3/3 slides, 2.0 s/slide, 6 s, 3 done"]


def test_plain_lines_of_an_open_count_come_every_interval_and_at_the_end():
    out, clock = io.StringIO(), FakeClock()
    with progress(True, console=Console(file=out), clock=clock, interval_s=10) as bar:
        tiles = bar.add_task("tiles", unit="tiles")
        for _ in range(25):  # 25 s of 100 tiles a second
            clock.now += 1.0
            bar.update(tiles, advance=100)
    lines = log_lines(out.getvalue())
    assert lines == ["tiles: 1,000 tiles, 100 tiles/s, 10 s",
                     "tiles: 2,000 tiles, 100 tiles/s, 20 s",
                     "tiles: 2,500 tiles, 100 tiles/s, 25 s"]


def test_a_given_rate_wins_and_long_or_multiline_text_stays_on_one_short_line():
    out = io.StringIO()
    with progress(True, console=Console(file=out), clock=FakeClock()) as bar:
        task = bar.add_task("score", total=1, unit="slides")
        bar.update(task, advance=1, rate="9 slides/s", stats="error:\r\n" + "x" * 1000)
    (line,) = log_lines(out.getvalue())
    assert line.startswith("score: 1/1 slides, 9 slides/s, 0 s, error: xxx")
    assert len(line) == MAX_LINE and line.endswith("…")


def test_the_terminal_bar_shows_count_rate_and_stats():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with progress(True, console=console) as bar:
        task = bar.add_task("extract", total=4, unit="slides")
        for i in range(4):
            bar.update(task, advance=1, rate="2.0 slides/s", stats=f"{i + 1} done")
        tiles = bar.add_task("tiles", unit="tiles")
        bar.update(tiles, advance=500)
    text = out.getvalue()
    assert "extract" in text and "4/4" in text and "2.0 slides/s" in text and "4 done" in text
    assert "tiles/s" in text  # computed from the tiles task's own count and time


def test_run_batch_reports_each_slide_in_a_log(capsys):
    outcomes = run_batch(["a", "b"], lambda item: None, progress=True, desc="score")
    assert [o.status for o in outcomes] == ["done", "done"]
    lines = log_lines(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines] == ["score: 1/2 slides", "score: 2/2 slides"]
    assert lines[-1].endswith("2 done, 0 skipped, 0 failed")


def test_run_batch_quiet_writes_nothing(capsys):
    run_batch(["a", "b"], lambda item: None, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# --- the commands, written to a log file ----------------------------------------------------------
def run_to_log(args: list, log: Path) -> str:
    script = Path(sys.executable).with_name("weakstil")
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "weakstil.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TERM")}
    with open(log, "w") as fh:
        proc = subprocess.run(launcher + [str(a) for a in args], stdout=fh, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env, timeout=600, check=False)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


@pytest.mark.slow
def test_extract_and_train_write_short_plain_lines_into_a_log(tmp_path):
    from weakstil.synth.lattice import synth_cohort

    cohort = synth_cohort(tmp_path / "cohort", n=6, seed=1, size_um=500, progress=False)
    features = tmp_path / "features"
    lines = log_lines(run_to_log(["extract", cohort / "slides", "--features", features, "--batch-size", 16],
                                 tmp_path / "extract.log"))
    assert sum(line.startswith("extract: ") and " slides, " in line for line in lines) == 6
    assert any(line.startswith("tiles: ") and "tiles/s" in line for line in lines)
    lines = log_lines(run_to_log(["train", cohort / "labels.csv", "--features", features, "--models",
                                  tmp_path / "models", "--folds", 2, "--max-epochs", 3, "--device", "cpu"],
                                 tmp_path / "train.log"))
    # the default encoder has the morphometry: every column candidate is cross-validated (mil.select)
    from weakstil.mil.select import CANDIDATES, WIDE

    cv_lines = [line for line in lines if re.match(r"cross-validation \(.*\): \d+/\d+ (folds|models)", line)]
    assert [line.split(",")[0] for line in cv_lines if "more seed" not in line] == [
        f"cross-validation ({c}): {k}/2 folds" for c in CANDIDATES + WIDE for k in (1, 2)]
    # then the deployed sets' other seeds (their share of three), one short line per fold or model
    assert all(re.match(r"cross-validation \([a-z-]+, \d more seeds?\): \d+/\d+ (folds|models), ", line)
               for line in cv_lines if "more seed" in line), cv_lines


def test_fit_one_shows_epochs_in_the_display_not_lightnings_bar(capsys):
    import numpy as np

    from weakstil.mil.fit import TrainConfig, fit_one

    rng = np.random.default_rng(0)
    bags = [(rng.normal(size=(8, 4)).astype(np.float32), float(y)) for y in (10, 40, 70)]
    fit_one(bags, bags[:2], TrainConfig(hidden=8, max_epochs=2, patience=5, accelerator="cpu"),
            progress_bar=True)
    lines = log_lines(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines] == ["epochs: 1/2 epochs", "epochs: 2/2 epochs"]
    assert all("val R²" in line for line in lines)


def test_cross_validation_writes_one_short_line_per_fold_into_a_log(capsys):
    """What `weakstil train > log` shows (the slow test above runs the command itself)."""
    import numpy as np
    import pandas as pd

    from weakstil.mil.cv import cross_validate
    from weakstil.mil.fit import TrainConfig

    rng = np.random.default_rng(0)
    ids = [f"S{i}" for i in range(12)]
    table = pd.DataFrame({"slide_id": ids, "patient_id": [f"P{i}" for i in range(12)],
                          "stil": np.linspace(5, 90, 12)})
    bags = {s: rng.normal(size=(6, 4)).astype(np.float32) for s in ids}
    cfg = TrainConfig(hidden=8, max_epochs=2, patience=5, n_folds=3, n_boot=10, accelerator="cpu", seeds=1)
    cross_validate(bags, table, cfg, progress=True)
    lines = log_lines(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines] == [f"cross-validation: {k}/3 folds" for k in (1, 2, 3)]
    assert all("epoch 2 val R²" in line for line in lines)
    cross_validate(bags, table, replace(cfg, seeds=2), progress=True)  # several models per fold: counted as models
    lines = log_lines(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines] == [f"cross-validation: {k}/6 models" for k in range(1, 7)]
