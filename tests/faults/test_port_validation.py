"""#13 case 10: `weakstil view --port` outside 1-65535 is a clear usage error, not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from weakstil.cli import app


@pytest.mark.parametrize("port", ["70000", "-1", "0", "65536"])
def test_out_of_range_port_is_a_usage_error(tmp_path, port):
    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, ["view", str(tmp_path), "--port", port])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())
    assert "--port" in text and "a port is a number from 1 to 65535, not" in text
    assert "Traceback" not in result.output and "OverflowError" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit)
