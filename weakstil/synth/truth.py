"""The on-disk truth of a synthetic slide, shared by every family, and the per-tile truth read from it.

``truth/<slide_id>.npz`` holds area-fraction maps at ``um_per_px`` µm per pixel (16 µm): ``stroma``,
``lymph_in_stroma`` (lymphocyte area inside stroma), ``tumour``, ``fat``, ``tissue`` (a family may add
more, e.g. ``necrosis``), the slide's true ``stil`` (0-100), its scan ``slide_mpp`` and the ``plan``
string a rerun compares to recognise a finished slide. A family writes these maps from its own
scene; scoring (tile truth, slide sTIL%) is the same for all families.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

TRUTH_UM = 16.0  # µm per pixel of the ground-truth maps
TRUTH_KEYS = ("stroma", "lymph_in_stroma", "tumour", "fat", "tissue")


def stil_from_truth(truth: dict) -> float:
    """Slide sTIL% = lymphocyte area in stroma / stroma area x 100 (0 without stroma)."""
    stroma = float(np.sum(truth["stroma"], dtype=np.float64))
    return 100.0 * float(np.sum(truth["lymph_in_stroma"], dtype=np.float64)) / stroma if stroma else 0.0


def load_truth(path: str | Path) -> dict:
    """Read ``truth/<slide_id>.npz`` into a dict of arrays."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _integral_at(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integral of a map from (0, 0) to (x, y) in map pixels, bilinear in its summed-area table (exact)."""
    x, y = np.clip(x, 0, table.shape[1] - 1), np.clip(y, 0, table.shape[0] - 1)
    ix, iy = np.minimum(x.astype(int), table.shape[1] - 2), np.minimum(y.astype(int), table.shape[0] - 2)
    fx, fy = x - ix, y - iy
    top = table[iy, ix] * (1 - fx) + table[iy, ix + 1] * fx
    return top * (1 - fy) + (table[iy + 1, ix] * (1 - fx) + table[iy + 1, ix + 1] * fx) * fy


def tile_truth(truth: str | Path | dict, coords_l0, size_l0: float, slide_mpp: float) -> dict:
    """Per-tile ground truth for square tiles at level-0 ``coords_l0`` (N, 2) of side ``size_l0``.

    Returns ``stroma_fraction`` (N,) in 0-1, ``stil`` (N,) in 0-100 (NaN for a tile without stroma)
    and, where the maps have ``tumour`` (every family's do), ``tumour_fraction`` (N,) in 0-1.
    """
    maps = truth if isinstance(truth, dict) else load_truth(truth)
    um_per_px = float(maps["um_per_px"])
    xy = np.asarray(coords_l0, dtype=np.float64).reshape(-1, 2) * slide_mpp / um_per_px
    side = size_l0 * slide_mpp / um_per_px
    x0, y0, x1, y1 = xy[:, 0], xy[:, 1], xy[:, 0] + side, xy[:, 1] + side
    sums = {}
    for key in ("stroma", "lymph_in_stroma", "tumour"):
        if key not in maps:
            continue
        table = np.pad(maps[key].astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        sums[key] = (_integral_at(table, x1, y1) - _integral_at(table, x0, y1)
                     - _integral_at(table, x1, y0) + _integral_at(table, x0, y0))
    stroma = sums["stroma"]
    with np.errstate(invalid="ignore", divide="ignore"):
        stil = np.where(stroma > 1e-6 * side * side, 100 * sums["lymph_in_stroma"] / stroma, np.nan)
    out = {"stroma_fraction": stroma / (side * side), "stil": np.clip(stil, 0, 100)}
    if "tumour" in sums:
        out["tumour_fraction"] = sums["tumour"] / (side * side)
    return out


@contextmanager
def atomic_open(path: Path, mode: str):
    """Open a temp sibling of ``path`` for writing (:func:`weakstil.fs.atomic_path`) and rename it
    into place once written."""
    from weakstil.fs import atomic_path

    with atomic_path(path) as tmp, open(tmp, mode, **({"newline": ""} if "b" not in mode else {})) as fh:
        yield fh


def write_truth(path: str | Path, truth: dict, *, slide_mpp: float, plan: str) -> None:
    """Write a slide's truth maps atomically (``plan`` lets a rerun recognise a finished slide)."""
    with atomic_open(Path(path), "wb") as fh:
        np.savez_compressed(fh, **truth, slide_mpp=slide_mpp, plan=np.str_(plan))


def finished_stil(truth_path: Path, slide_path: Path, plan: str) -> float | None:
    """The stored sTIL% of a slide already written from the same ``plan``, else None."""
    if not (slide_path.exists() and truth_path.exists()):
        return None
    try:
        old = load_truth(truth_path)
    except (OSError, ValueError):
        return None
    return float(old["stil"]) if str(old.get("plan")) == plan else None
