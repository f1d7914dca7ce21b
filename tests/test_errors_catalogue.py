"""docs/errors.md lists every error weakstil raises, with the fix it prints (generated, kept current)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weakstil.cli.catalogue import all_errors, catalogue
from weakstil.errors import WeakstilError

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def test_every_error_class_has_a_row_and_a_fix_or_a_meaning():
    errors = all_errors()
    names = {e.__name__ for e in errors}
    # classes defined outside weakstil.errors are found too
    assert {"ResultsNotFoundError", "SchedulerError", "WorkerCrashError", "MissingMppError"} <= names
    table = catalogue()
    for cls in errors:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{cls.__name__}` |"))
        assert row.rstrip(" |").split("|")[-1].strip(), f"{cls.__name__} has neither a docstring nor a fix"
        assert issubclass(cls, WeakstilError)
    assert "FileNotFoundError" in next(r for r in table.splitlines() if "`ModelNotFoundError`" in r)


def test_every_module_that_defines_an_error_is_known_to_the_catalogue():
    """Importing every weakstil module finds no error class outside weakstil.errors and
    DEFINED_ELSEWHERE (such a class would be missing from docs/errors.md in a fresh process)."""
    import importlib
    import pkgutil

    import weakstil
    from weakstil.cli.catalogue import DEFINED_ELSEWHERE

    for info in pkgutil.walk_packages(weakstil.__path__, "weakstil."):
        importlib.import_module(info.name)
    modules = {cls.__module__ for cls in all_errors()}
    assert modules <= {"weakstil.errors", *DEFINED_ELSEWHERE}, modules - {"weakstil.errors", *DEFINED_ELSEWHERE}


def test_docs_errors_md_is_the_current_catalogue():
    if not DOC.exists():
        pytest.skip("docs/ not shipped with this install")
    assert catalogue() in DOC.read_text(encoding="utf-8"), (
        "docs/errors.md is out of date: rewrite its table with weakstil.cli.catalogue.catalogue()")
