"""The error catalogue of docs/errors.md: every :class:`~weakstil.errors.WeakstilError` class, what
builtin it also is (catch either), what it means and the fix it prints.

It lives with the command line, the one floor that may import every stage: most classes are in
:mod:`weakstil.errors`, a few next to the code that raises them (:data:`DEFINED_ELSEWHERE`; a test
imports every module and fails when one is missing here).
"""

from __future__ import annotations

from weakstil.errors import WeakstilError

DEFINED_ELSEWHERE = ("weakstil.embed.encoder_folders", "weakstil.embed.loader", "weakstil.outputs.bundle",
                     "weakstil.runs.executors")  # modules with their own error classes


def all_errors() -> list[type[WeakstilError]]:
    """Every :class:`WeakstilError` subclass weakstil defines (the modules above imported), by name."""
    import weakstil.embed.encoder_folders  # noqa: F401 -- each defines error classes of its own
    import weakstil.embed.loader  # noqa: F401
    import weakstil.outputs.bundle  # noqa: F401
    import weakstil.runs.executors  # noqa: F401

    seen, todo = set(), [WeakstilError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in seen and sub.__module__.startswith("weakstil."):
                seen.add(sub)
                todo.append(sub)
    return sorted(seen, key=lambda c: c.__name__)


def catalogue() -> str:
    """The markdown table of docs/errors.md: each error, the classes it also is, and what it means
    and the fix printed with it (a raise site may give a more specific fix)."""
    rows = ["| error | also a | what it means · what to do |", "|---|---|---|"]
    for cls in all_errors():
        also = [b.__name__ for b in cls.__mro__[1:]
                if b not in (WeakstilError, Exception, BaseException, object)
                and (b.__module__ == "builtins" or issubclass(b, WeakstilError))]
        doc = " ".join((cls.__dict__.get("__doc__") or "").split("\n\n")[0].split())
        text = " · ".join(t for t in (doc, cls.fix) if t).replace("|", "/")
        rows.append(f"| `{cls.__name__}` | {', '.join(also)} | {text} |")
    return "\n".join(rows) + "\n"
