"""The `weakstil` command line: one Typer app, its commands grouped by stage in this package.

Exit codes: 0 everything succeeded; 1 some slides failed (the rest were done, see the summary);
2 bad input that stopped the command (the message says how to fix it); 3 some slides were left to
another process that holds their lock (none failed; they are named; rerun, or pass --wait).
"""

from __future__ import annotations

from weakstil.cli.app import _fail, app
from weakstil.errors import WeakstilError

# Importing the command modules registers their commands, in the order `--help` lists them.
from weakstil.cli import start, slides, train, review  # noqa: E402, F401, I001
from weakstil.cli import pretrain  # noqa: E402, F401, I001

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    try:
        try:
            app(prog_name="weakstil")
        except WeakstilError as exc:  # a library error that escaped a command
            _fail(exc)
    except SystemExit as exc:
        _exit_now(exc)
        raise


def _exit_now(exc: SystemExit) -> None:
    """End the process without the interpreter's teardown once a command that imported torch is done.

    Tearing down torch's modules takes 0.4 s at exit (0.8 s with torchvision and dynamo loaded) and
    does nothing for the user: every output is committed by then. The exit handlers still run
    (multiprocessing joins its readers, logging flushes), then stdout and stderr are flushed and the
    process exits with the command's code. Skipped while a non-daemon thread still runs, when torch
    was never imported, and with ``WEAKSTIL_SLOW_EXIT=1`` (e.g. for a profiler that reports at teardown).
    """
    import os
    import sys
    import threading

    if "torch" not in sys.modules or os.environ.get("WEAKSTIL_SLOW_EXIT") == "1":
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    code = 0 if exc.code is None else exc.code
    if not isinstance(code, int):  # SystemExit("message"): printed, exit status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)

