"""#13 case 9: a YAML alias bomb in a config file is refused before it expands (no MemoryError)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.config import load_config_file
from weakstil.errors import ConfigError


def bomb(levels: int = 9) -> str:
    """Nested lists of ten aliases each: 10**levels leaves once expanded (10**9 for 9 levels)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]")
    lines.append(f"extract:\n  batch_size: *a{levels}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))
    with pytest.raises(ConfigError, match="aliases are not allowed") as info:
        load_config_file(path)
    assert info.value.path == path and "anchor" in info.value.fix


def test_alias_bomb_on_the_command_line_is_exit_2(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["extract", str(tmp_path), "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert "aliases are not allowed" in " ".join(result.output.split())
    assert "Traceback" not in result.output and "MemoryError" not in result.output


def test_a_single_harmless_alias_is_refused_too_and_plain_files_load(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text("base: &b 4\nextract:\n  batch_size: *b\n")
    with pytest.raises(ConfigError, match=r"alias \*b at line 3"):
        load_config_file(path)
    path.write_text("extract:\n  batch_size: 4\n")
    assert load_config_file(path) == {"extract": {"batch_size": 4}}
