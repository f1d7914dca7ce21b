"""#13 case 8: config mistakes are errors before any work starts, never silently ignored.

A typo'd key names the closest valid option (top level and command sections); a path that must
exist (--roi) is checked up front; booleans accept only true/false, yes/no, 1/0.
"""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.config import defaults_for, strict_bool
from weakstil.errors import ConfigError

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize("config", [{"batch_sise": 8}, {"extract": {"batch_sise": 8}}])
def test_a_key_typo_names_the_closest_option(tmp_path, config):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("extract", tmp_path / "slides", "--features", tmp_path / "f", "--config", path)
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "batch_sise" in text and "did you mean `batch_size`" in text and path.name in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "f").exists()


def test_top_level_option_of_another_command_is_still_fine():
    known = {"n", "seed"}
    got = defaults_for({"batch_size": 4, "seed": 1}, "synth", known, all_options={"batch_size", "n", "seed"})
    assert got == {"seed": 1}
    with pytest.raises(ConfigError, match="did you mean `seed`"):
        defaults_for({"sed": 1}, "synth", known, all_options={"batch_size", "n", "seed"})


def test_missing_roi_folder_is_refused_before_work(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    features = tmp_path / "features"
    result = invoke("extract", slides, "--features", features, "--roi", tmp_path / "nonexistent")
    assert result.exit_code == 2, result.output
    assert "nonexistent" in flat(result.output) and "does not exist" in flat(result.output)
    assert not features.exists()


@pytest.mark.parametrize("value", ["banana", "on", "y", 7, 2.5])
def test_booleans_are_strict(tmp_path, value):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"quiet": value}))
    result = invoke("extract", tmp_path / "slides", "--config", path)
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "'quiet' must be true or false" in text and path.name in text


@pytest.mark.parametrize("value, expected", [(True, True), ("yes", True), ("No", False), (1, True), ("0", False),
                                             ("false", False)])
def test_boolean_words_that_are_accepted(value, expected):
    assert strict_bool("lock", value) is expected
