"""The command line as people script against it: every command's --help, and --config files.

Config files: code defaults < config file < flags; top-level keys apply to every command that has
the option, a section named after a command is checked (an unknown key there is exit 2).
"""

from __future__ import annotations

import csv

import pytest
import typer
import yaml
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.synth.lattice import plan_cohort

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}  # rich wraps at 80 columns without a terminal


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)


def test_the_documented_commands_exist():
    assert {"synth", "check", "encoders", "extract", "train", "score", "demo"} <= set(command_names())


@pytest.mark.parametrize("args", [["--help"], ["-h"], []])
def test_top_level_help(args):
    result = invoke(*args)
    # no arguments shows the help too (click exits 2 for a group without a command, with usage)
    assert result.exit_code in ((0,) if args else (0, 2)), result.output
    assert "Usage" in result.output
    for name in command_names():
        assert name in result.output


@pytest.mark.parametrize("name", command_names())
def test_every_command_has_help(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and name in result.output
    assert "--config" in result.output  # every command takes a config file


def test_help_needs_no_torch():
    """`weakstil --help` stays fast: the heavy libraries are imported inside the commands."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from weakstil.cli import app; "
            "r = CliRunner().invoke(app, ['extract', '--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'timm', 'lightning', 'zarr') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- --config ------------------------------------------------------------------------------------
def _labels(root) -> list[dict]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_config_file_sets_options_and_flags_win(tmp_path):
    config = tmp_path / "weakstil.yaml"
    # top level: applies to every command with that option; section: this command only
    config.write_text(yaml.safe_dump({"seed": 5, "synth": {"n": 2, "size-um": 300, "workers": 1,
                                                           "prefix": "CFG"}}))
    out = tmp_path / "from_config"
    result = invoke("synth", out, "--config", config)
    assert result.exit_code == 0, result.output
    rows = _labels(out)
    planned = plan_cohort(2, seed=5, size_um=300, prefix="CFG")
    assert [r["slide_id"] for r in rows] == [s.slide_id for s in planned] == ["CFG-000", "CFG-001"]
    assert [r["patient_id"] for r in rows] == [s.patient_id for s in planned]

    out2 = tmp_path / "flags_win"
    result = invoke("synth", out2, "--config", config, "--n", 3, "--prefix", "FLAG")
    assert result.exit_code == 0, result.output
    assert [r["slide_id"] for r in _labels(out2)] == ["FLAG-000", "FLAG-001", "FLAG-002"]

    # the config flag may come after the flags it yields to, too
    out3 = tmp_path / "flags_first"
    result = invoke("synth", out3, "--n", 1, "--config", config)
    assert result.exit_code == 0, result.output
    assert [r["slide_id"] for r in _labels(out3)] == ["CFG-000"]


def test_config_top_level_keys_of_other_commands_are_ignored(tmp_path):
    """`batch_size` at the top level means nothing to `synth`: not an error there."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 64, "device": "cpu",
                                      "synth": {"n": 1, "size_um": 200, "workers": 1}}))
    result = invoke("synth", tmp_path / "out", "--config", config)
    assert result.exit_code == 0, result.output
    assert len(_labels(tmp_path / "out")) == 1


def test_config_sets_check_output_path(tmp_path):
    """Options of another command (check --out) come from its own section."""
    slides = tmp_path / "cohort"
    assert invoke("synth", slides, "--n", 1, "--size-um", 200, "--workers", 1).exit_code == 0
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"check": {"out": str(tmp_path / "table.csv")}}))
    result = invoke("check", slides / "slides", "--config", config)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "table.csv").is_file()
    result = invoke("check", slides / "slides", "--config", config, "--out", tmp_path / "flag.csv")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flag.csv").is_file()


@pytest.mark.parametrize("command", ["extract", "synth", "train", "score", "check"])
def test_unknown_key_in_a_command_section_is_exit_2(tmp_path, command):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({command: {"batch_sise": 4}}))
    args = [command, tmp_path / "x.csv" if command == "train" else tmp_path, "--config", config]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "batch_sise" in text and "unknown option" in text and str(config.name) in text
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content, needle", [
    ("extract: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "mapping"),
    ("extract: 3\n", "must be a mapping"),
])
def test_bad_config_files_are_exit_2(tmp_path, content, needle):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = invoke("extract", tmp_path, "--config", config)
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


def test_missing_config_file_is_exit_2(tmp_path):
    result = invoke("synth", tmp_path / "o", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2, result.output
    assert "config file not found" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_every_command_may_have_its_own_config_section():
    """A config file's `<command>:` section is validated against config.COMMANDS: every command is there."""
    from typer.main import get_command

    from weakstil.cli import app
    from weakstil.config import COMMANDS

    assert set(get_command(app).commands) == set(COMMANDS)
