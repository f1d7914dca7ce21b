"""Rewrite the per-slide review bundle of a results folder without the model (``weakstil heatmap``).

``weakstil score`` leaves, per slide, ``results/slides/<slide_id>/`` with ``tiles.csv`` (every tile's
level-0 box, prediction, attention, contribution) and ``score.json`` (the slide score, the slide
file it read, its mpp and the exact tile size). That is all the review files need, so
:func:`regenerate` reopens each slide and rewrites ``heatmap.png``, ``heatmap.tif``,
``tiles.geojson`` and ``top_tiles.png`` from them — after a change of colour map, a new version of
the outputs, or a deleted file — one slide at a time (:func:`regenerate_slide`; the batch over a results folder is
:func:`weakstil.runs.batch.regenerate`), so one bad slide is recorded and the others go on.

Where the slide file is: ``slides_dir`` (a folder searched like ``weakstil score`` does, or one file),
matched by slide id; otherwise, or when it is not there, the ``source_path`` in ``score.json``.
Its mpp: ``mpp`` if given, else the one ``score.json`` records (the mpp the slide was scored at),
else what the slide states.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from weakstil.errors import HeatmapInputError, SlideNotFoundError, WeakstilError
from weakstil.outputs.colors import DEFAULT_CMAP
from weakstil.outputs.heatmap import FILENAMES, write_slide_outputs
from weakstil.outputs.tiles import TilesTable, read_tiles_csv

REGENERATE_FORMATS = ("png", "tif", "geojson", "top")
DEFAULT_CUTOFF = 30.0
SCORE_JSON = "score.json"  # as weakstil.outputs.score.SCORE_JSON (not imported: that module pulls in torch)


class ResultsNotFoundError(WeakstilError, FileNotFoundError):
    fix = "pass the folder that `weakstil score --out` wrote (it holds scores.csv and slides/<id>/tiles.csv)"


@dataclass(frozen=True)
class ScoredSlide:
    """One ``results/slides/<slide_id>/`` folder with a tiles.csv; ``info`` is its score.json ({} if none)."""

    slide_id: str
    folder: Path
    info: dict = field(default_factory=dict, compare=False)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def scored_slides(results_dir: str | Path, slide_ids=None) -> list[ScoredSlide]:
    """Every scored slide folder of a results folder (sorted; hidden staging folders skipped).

    ``slide_ids``, if given, keeps only those (an unknown id is an error naming it).
    """
    results_dir = Path(results_dir)
    root = results_dir / "slides"
    if not root.is_dir():
        raise ResultsNotFoundError("no slides/ folder: this is not a weakstil results folder", path=results_dir)
    found = [ScoredSlide(p.name, p, _read_json(p / SCORE_JSON)) for p in sorted(root.iterdir())
             if p.is_dir() and not p.name.startswith(".") and (p / FILENAMES["csv"]).is_file()]
    if slide_ids is not None:
        wanted = list(dict.fromkeys(str(s) for s in slide_ids))
        by_id = {s.slide_id: s for s in found}
        missing = [s for s in wanted if s not in by_id]
        if missing:
            raise ResultsNotFoundError(f"no tiles.csv for slide(s) {', '.join(missing)}", path=root,
                                       fix="score them first (weakstil score), or check the ids")
        found = [by_id[s] for s in wanted]
    if not found:
        raise ResultsNotFoundError("no slide folder with a tiles.csv under slides/", path=results_dir)
    return found


def recorded_cutoff(item: ScoredSlide) -> float:
    """The sTIL-high cutoff the slide's outputs were written with: score.json's ``cutoff``, else the
    one recorded at the end of its tiles.geojson, else 30."""
    value = item.info.get("cutoff")
    if value is None:
        try:
            with open(item.folder / FILENAMES["geojson"], "rb") as fh:
                fh.seek(0, 2)
                fh.seek(max(0, fh.tell() - 4096))
                tail = fh.read().decode("utf-8", "replace")
            match = re.search(r'"weakstil":\{[^{}]*"cutoff":\s*(-?[0-9.eE+]+)', tail)
            value = float(match.group(1)) if match else None
        except (OSError, ValueError):
            value = None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return DEFAULT_CUTOFF
    return value if math.isfinite(value) else DEFAULT_CUTOFF


def slide_score(item: ScoredSlide, tiles: TilesTable) -> float:
    """score.json's score; without one, the sum of the contributions, or the mean tile prediction."""
    try:
        score = float(item.info["score"])
        if math.isfinite(score):
            return score
    except (KeyError, TypeError, ValueError):
        pass
    if tiles.contribution is not None:
        return float(np.nansum(tiles.contribution))
    finite = tiles.prediction[np.isfinite(tiles.prediction)]
    return float(finite.mean()) if finite.size else math.nan


def locate_slide(item: ScoredSlide, slide_files: dict[str, Path] | None = None,
                 slides_dir: Path | None = None) -> Path:
    """The slide file of a scored slide: from ``slide_files`` (id → path), else score.json's source_path."""
    if slide_files and item.slide_id in slide_files:
        return slide_files[item.slide_id]
    source = item.info.get("source_path")
    if source and Path(source).exists():  # a file, or a DICOM WSI folder
        return Path(source)
    where = f"not in {slides_dir}" if slides_dir is not None else "no --slides folder given"
    recorded = f"score.json's source_path {source} does not exist" if source else "score.json names no source_path"
    raise SlideNotFoundError(f"cannot find the slide file of {item.slide_id}: {where}, and {recorded}",
                             path=item.folder, fix="pass --slides DIR, the folder (or file) holding the slide")


def _tile_size(item: ScoredSlide, tiles: TilesTable) -> float:
    try:
        size = float(item.info["tile_size_l0"])  # exact (tiles.csv rounds it)
        if math.isfinite(size) and size > 0:
            return size
    except (KeyError, TypeError, ValueError):
        pass
    return float(np.median(tiles.width)) if len(tiles.width) else 1.0


def regenerate_slide(item: ScoredSlide, *, slide_files: dict[str, Path] | None = None,
                     slides_dir: Path | None = None, backend: str = "auto", mpp: float | None = None,
                     formats=REGENERATE_FORMATS, cmap: str = DEFAULT_CMAP,
                     cutoff: float | None = None) -> dict[str, str]:
    """Rewrite one slide's review files in its folder (each atomically); return {format: path}."""
    from weakstil.wsi.slide import open_slide

    tiles = read_tiles_csv(item.folder / FILENAMES["csv"])
    path = locate_slide(item, slide_files, slides_dir)
    size = _tile_size(item, tiles)
    use_mpp = mpp if mpp is not None else item.info.get("slide_mpp")
    kwargs = {"backend": backend}
    if use_mpp is not None:
        kwargs.update(mpp=float(use_mpp), mpp_override=True)
    with open_slide(path, **kwargs) as slide:
        width, height = slide.dimensions
        if len(tiles.coords_l0):
            right = int(np.max(tiles.coords_l0[:, 0] + tiles.width))
            bottom = int(np.max(tiles.coords_l0[:, 1] + tiles.width))
            if right > width + 1 or bottom > height + 1:
                raise HeatmapInputError(
                    f"tiles.csv reaches ({right}, {bottom}) but {path.name} is {width}x{height} px: "
                    f"it is not the slide these tiles were scored on", path=item.folder,
                    fix="pass --slides DIR holding the slide files that were scored")
        paths = write_slide_outputs(
            slide, item.folder, coords_l0=tiles.coords_l0, size_l0=size, prediction=tiles.prediction,
            attention=tiles.attention, contribution=tiles.contribution, score=slide_score(item, tiles),
            formats=tuple(formats), cmap=cmap, cutoff=recorded_cutoff(item) if cutoff is None else cutoff,
            stroma=tiles.stroma)
    return {fmt: str(p) for fmt, p in paths.items()}
