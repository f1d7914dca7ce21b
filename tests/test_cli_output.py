"""Readable command-line output: tables that are never cut, help that describes every option,
`--version`, summaries that say what to run next, and input mistakes reported before any work.

Output goes to a non-terminal here (CliRunner), as in a log file or CI job: tables must come out as
plain lines, whole.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import typer
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from weakstil import __version__
from weakstil.cli import app
from weakstil.textout import emit, fit_to_terminal, fits, plain_lines

REPO = Path(__file__).resolve().parents[1]
ENV = {"COLUMNS": "80", "NO_COLOR": "1"}  # an 80-column non-terminal, like a CI log


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def commands() -> dict[str, click.Command]:
    return typer.main.get_command(app).commands


# --- --version and --help -------------------------------------------------------------------------
def test_version_prints_the_package_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"weakstil {__version__}"


def test_every_option_of_every_command_is_described():
    missing = [f"{name} {'/'.join(p.opts)}" for name, cmd in commands().items()
               for p in cmd.params if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("name", ["train", "extract", "score", "heatmap", "view", "check", "demo"])
def test_help_shows_flags_as_flags(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert "--quiet" in result.output or name in ("check", "view")


def test_heatmap_mpp_help_names_no_option_heatmap_lacks():
    text = " ".join(invoke("heatmap", "--help").output.split())
    assert "--mpp" in text and "--force-mpp" not in text


# --- tables: plain lines off a terminal, fitted in one ------------------------------------------------
LONG = "none stated (no LICENSE file; issue #14): research use, ask before redistributing"


def _table() -> Table:
    table = Table(title="metrics", caption="line one of the caption\nline two")
    table.add_column("model", no_wrap=True)
    table.add_column("R² pooled [95% CI]", justify="right")
    table.add_column("note")
    table.add_row("stil-attention", "0.8312 [0.7654, 0.9021]", LONG)
    table.add_row("[bold]stil-mean[/]", "0.80 [0.70, 0.88]", "(NOT pretrained)")
    return table


def test_tables_off_a_terminal_are_whole_plain_lines(tmp_path):
    lines = plain_lines(_table())
    assert lines[0] == "metrics" and lines[-2:] == ["line one of the caption", "line two"]
    assert lines[1].split() == ["model", "R²", "pooled", "[95%", "CI]", "note"]
    assert LONG in lines[2] and "0.8312 [0.7654, 0.9021]" in lines[2]
    assert lines[3].startswith("stil-mean ") and "(NOT pretrained)" in lines[3]  # markup gone
    assert not any("…" in line for line in lines)
    with (tmp_path / "log.txt").open("w") as log:
        emit(_table(), file=log)
    assert (tmp_path / "log.txt").read_text().splitlines() == lines


@pytest.mark.parametrize("width", [80, 100])
def test_tables_in_a_terminal_fit_its_width_and_cut_nothing(width):
    console = Console(force_terminal=True, width=width, color_system=None)
    table = fit_to_terminal(_table())
    assert fits(console, table)
    with console.capture() as capture:
        console.print(table)
    text = capture.get()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text and "0.8312 [0.7654, 0.9021]" in text and "stil-attention" in text
    assert "pretrained)" in text


def test_encoders_in_an_80_column_log_keep_every_licence_on_one_line():
    from weakstil.embed.encoders import list_encoders

    result = invoke("encoders")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for spec in list_encoders():
        assert any(spec.name in line and spec.licence in line for line in lines), spec.name
    assert "…" not in result.output
    assert lines[-1].startswith("next: weakstil extract")


def test_batch_summary_keeps_long_errors_whole():
    from weakstil.runs.runner import Outcome, summarize

    error = "CorruptSlideError: cannot decode the image data (JPEG stream ends early at tile 12,7) " * 2
    outcomes = [Outcome(key="a-very-long-slide-name-from-the-scanner-0001.svs", status="failed", reason="corrupt",
                        error=error.strip(), fix="re-export the slide from the scanner software")]
    lines = plain_lines(summarize(outcomes))
    assert any(error.strip() in line for line in lines)
    assert not any("…" in line for line in lines)


# --- summaries and checks before work ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_output")
    result = invoke("synth", root, "--n", 2, "--size-um", 500, "--workers", 1)
    assert result.exit_code == 0, result.output
    assert f"wrote 2 slides to {root / 'slides'}" in " ".join(result.output.split())
    assert "next: weakstil check" in result.output
    return root


def test_check_summary_says_where_the_table_is_and_what_next(cohort, tmp_path):
    result = invoke("check", cohort / "slides", "--out", tmp_path / "check.csv")
    assert result.exit_code == 0, result.output
    assert f"check: 2 ok, 0 failed — table written to {tmp_path / 'check.csv'}" in result.output
    assert f"next: weakstil extract {cohort / 'slides'}" in result.output
    assert "…" not in result.output and "│" not in result.output  # plain lines, no box


def test_a_bad_labels_header_fails_before_anything_is_created(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,score\nSYN-000,30\n")
    result = invoke("train", labels, "--features", tmp_path / "features", "--models", tmp_path / "models")
    assert result.exit_code == 2
    assert "missing required column(s) slide_id, patient_id" in " ".join(result.output.split())
    assert not (tmp_path / "models").exists()


def test_a_missing_model_fails_before_any_output_folder_or_progress(cohort, tmp_path):
    result = invoke("score", cohort / "slides", "--model", tmp_path / "nope", "--out", tmp_path / "results",
                    "--features", tmp_path / "features")
    assert result.exit_code == 2 and "no model here" in result.output
    assert "tiles/s" not in result.output and "slides/s" not in result.output
    assert not (tmp_path / "results").exists() and not (tmp_path / "features").exists()


@pytest.mark.parametrize("args, expected", [
    (["extract", "{slides}", "--encoder", "resnet18-randon"], "did you mean resnet18-random"),
    (["extract", "{slides}", "--encoder", "retccl", "--weights", "file:{tmp}/none.pth"], "weights file not found"),
    (["extract", "{slides}", "--roi", "{tmp}/no-roi"], "--roi: the folder does not exist"),
    (["score", "{slides}", "--model", "{tmp}", "--outputs", "png,pdf"], "unknown pdf"),
    (["heatmap", "{tmp}/no-results"], "RESULTS: the folder does not exist"),
    (["train", "{tmp}/labels.csv", "--columns", "morph"], "'all', 'measured'"),
    (["view", "{tmp}/no-results"], "RESULTS: the folder does not exist"),
    (["view", "{tmp}", "--labels", "{tmp}/labels.csv"], "labels file does not exist"),
])
def test_input_mistakes_are_reported_before_any_work(cohort, tmp_path, args, expected):
    result = invoke(*[a.format(slides=cohort / "slides", tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_checks_run_before_torch_is_imported(tmp_path):
    """A wrong labels column is reported by a fresh process that never imported torch."""
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,stil\nSYN-000,30\n")
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from weakstil.cli import app
        result = CliRunner().invoke(app, ["train", {str(labels)!r}, "--models", {str(tmp_path / 'm')!r}])
        print(result.exit_code, "torch" in sys.modules, "lightning" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    assert out == ["2", "False", "False"]
