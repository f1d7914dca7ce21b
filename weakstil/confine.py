"""Paths confined to a root folder after symbolic links are resolved.

The viewer serves, and the review writers write, only inside the results (or slides) folder: a
link placed inside it that points elsewhere (``results/slides/x/tiles.csv -> /etc/passwd``, or a
whole slide folder linked to another disk) is refused, not followed. Both sides are resolved, so a
results folder that is itself reached through a link is fine.
"""

from __future__ import annotations

import os
from pathlib import Path

from weakstil.errors import UnsafeOutputPathError


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, with every link resolved, is ``root`` or lies under it (``root`` resolved too)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def results_root_of(slide_folder: str | Path) -> Path:
    """The results folder of ``results/slides/<id>`` (or a staging folder beside it); else the parent."""
    folder = Path(os.path.abspath(slide_folder))
    return folder.parent.parent if folder.parent.name == "slides" else folder.parent


def check_write_target(folder: str | Path, root: str | Path | None = None) -> Path:
    """Refuse to write into ``folder`` when it resolves outside ``root`` (default: its results folder).

    Raises :class:`UnsafeOutputPathError` naming the folder and where the link leads.
    """
    root = results_root_of(folder) if root is None else Path(root)
    if not is_inside(folder, root):
        raise UnsafeOutputPathError(
            f"refusing to write through a link: it leads to {os.path.realpath(folder)}, outside "
            f"the results folder {root}", path=folder)
    return Path(folder)
