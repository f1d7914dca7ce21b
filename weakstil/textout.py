"""Printing tables and summaries that are never cut.

In a terminal a rich Table is fitted to the width: text columns wrap at words rather than ending
in "…", name and number columns keep their full width, so a number or a warning is never lost; a
table that cannot fit that way (a very narrow terminal) is printed as plain lines. Anywhere else (a log file, a pipe, a CI
job) tables become plain lines: the title, a header line, one line per row with the columns padded
and separated by two spaces, then the caption; no line is ever wrapped or cut, so the output greps
and diffs well. Rich Groups (several tables) and plain strings are handled the same way.
"""

from __future__ import annotations

from typing import Any, TextIO

GAP = "  "


def _plain(text: Any) -> str:
    """Text without rich markup (a string that is not valid markup is kept as it is)."""
    from rich.errors import MarkupError
    from rich.text import Text

    if isinstance(text, Text):
        return text.plain
    try:
        return Text.from_markup(str(text)).plain
    except MarkupError:
        return str(text)


def cell_text(cell: Any) -> str:
    """The plain text of a table cell (markup removed, line breaks as " — ")."""
    from rich.text import Text

    if isinstance(cell, (Text, str)):
        text = _plain(cell)
    else:
        text = "" if cell is None else str(cell)
    return " — ".join(part.strip() for part in text.splitlines() if part.strip())


def table_lines(table) -> list[str]:
    """A rich Table as plain lines: title, header, rows (columns padded), caption."""
    columns = list(table.columns)
    header = [cell_text(c.header) for c in columns]
    rows = [[cell_text(cell) for cell in col.cells] for col in columns]
    n_rows = max((len(r) for r in rows), default=0)
    body = [[rows[j][i] if i < len(rows[j]) else "" for j in range(len(columns))] for i in range(n_rows)]
    widths = [max([len(header[j])] + [len(row[j]) for row in body]) for j in range(len(columns))]
    right = [c.justify == "right" for c in columns]

    def line(cells: list[str]) -> str:
        padded = [cells[j].rjust(widths[j]) if right[j] else cells[j].ljust(widths[j]) for j in range(len(cells))]
        return GAP.join(padded).rstrip()

    out = [cell_text(table.title)] if table.title else []
    out += [line(header)] + [line(row) for row in body]
    if table.caption:
        out += cell_text_lines(table.caption)
    return out


def cell_text_lines(caption: Any) -> list[str]:
    """Caption text as separate lines (captions keep their line breaks)."""
    return [line.rstrip() for line in _plain(caption).splitlines()]


def plain_lines(renderable: Any) -> list[str]:
    """Tables, Groups of them and strings as plain lines (see the module docstring)."""
    from rich.console import Group
    from rich.table import Table

    if isinstance(renderable, Table):
        return table_lines(renderable)
    if isinstance(renderable, Group):
        out: list[str] = []
        for part in renderable.renderables:
            out += ([""] if out else []) + plain_lines(part)
        return out
    return cell_text_lines(renderable) if isinstance(renderable, str) else [cell_text(renderable)]


def fit_to_terminal(renderable: Any) -> Any:
    """Make the tables in ``renderable`` wrap instead of cutting with "…": text columns wrap at words
    (folding a word longer than the column), name and number columns (``no_wrap`` or right-justified)
    keep their widest cell's width."""
    from rich.console import Group
    from rich.table import Table

    if isinstance(renderable, Table):
        for column in renderable.columns:
            column.overflow = "fold"
            if column.no_wrap or column.justify == "right":  # names and numbers: never split
                column.width = max(len(cell_text(c)) for c in [column.header, *column.cells])
            column.no_wrap = False
    elif isinstance(renderable, Group):
        for part in renderable.renderables:
            fit_to_terminal(part)
    return renderable


def fits(console, renderable: Any) -> bool:
    """Whether ``renderable`` can be drawn within the console's width without cutting anything."""
    from rich.console import Group
    from rich.measure import Measurement

    parts = renderable.renderables if isinstance(renderable, Group) else [renderable]
    return all(Measurement.get(console, console.options, part).minimum <= console.width for part in parts)


def emit(renderable: Any, *, stderr: bool = False, file: TextIO | None = None) -> None:
    """Print a table/summary: fitted to a terminal, or as plain lines anywhere else."""
    from rich.console import Console

    console = Console(stderr=stderr, file=file, highlight=False)
    if console.is_terminal and fits(console, fit_to_terminal(renderable)):
        console.print(renderable)
        return
    stream = console.file
    for line in plain_lines(renderable):
        stream.write(line + "\n")
    stream.flush()
