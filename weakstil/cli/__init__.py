"""The `weakstil` command line: one Typer app, its commands grouped by stage in this package.

Exit codes: 0 everything succeeded; 1 some slides failed (the rest were done, see the summary);
2 bad input that stopped the command (the message says how to fix it).
"""

from __future__ import annotations

from weakstil.cli.app import _fail, app
from weakstil.errors import WeakstilError

# Importing the command modules registers their commands, in the order `--help` lists them.
from weakstil.cli import start, slides, train, review  # noqa: E402, F401, I001

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="weakstil")
    except WeakstilError as exc:  # a library error that escaped a command
        _fail(exc)

