"""What the viewer serves: the cohort in ``results/``, the slide files, per-slide tiles and layers.

Every path the viewer opens comes from a listing made here, never from a request: slide files from
``find_slides`` (the slides folder), review files as ``results/slides/<dir>/<fixed name>`` where
``<dir>`` is a name found by listing ``results/slides``. A request only names a slide id, which is
looked up in these tables; anything not found is a 404.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weakstil.errors import AnisotropicMppError, MissingMppError
from weakstil.outputs.heatmap import FILENAMES, TILE_COLUMNS, colormap_lut, layer_scale
from weakstil.viewer.deepzoom import TileLayer
from weakstil.wsi.slide import find_slides, open_kwargs_for, open_slide

log = logging.getLogger(__name__)

SCORES_CSV = "scores.csv"
LAYERS = ("prediction", "attention", "contribution")  # colour scales: weakstil.outputs.heatmap.LAYERS (fixed)
REVIEW_FILES = {  # download name -> (file in results/slides/<id>/, media type)
    FILENAMES["png"]: "image/png",
    FILENAMES["top"]: "image/png",
    FILENAMES["csv"]: "text/csv; charset=utf-8",
    FILENAMES["geojson"]: "application/geo+json",
    FILENAMES["tif"]: "image/tiff",
}
MAX_OPEN_SLIDES = 8
DIRS_TTL_S = 2.0


def safe_id(slide_id: str) -> bool:
    """A slide id that can only ever name one entry of a folder (no separators, no dot names)."""
    return (bool(slide_id) and slide_id not in {".", ".."} and not slide_id.startswith(".")
            and not any(c in slide_id for c in "/\\\x00") and len(slide_id) <= 255)


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def json_floats(values: np.ndarray) -> list:
    """A float array as a JSON-ready list (NaN → None)."""
    return [None if not math.isfinite(v) else v for v in np.asarray(values, dtype=np.float64).tolist()]


@dataclass
class TilesData:
    """tiles.csv of one slide as arrays."""

    x: np.ndarray
    y: np.ndarray
    width: np.ndarray
    height: np.ndarray
    values: dict[str, np.ndarray]  # prediction, attention, contribution (float64, NaN = none)
    stamp: tuple = ()  # (path, size, mtime_ns) of the file read: a cache key for what is drawn from it

    def __len__(self) -> int:
        return len(self.x)

    def layer(self, layer: str) -> TileLayer:
        """Tiles with a value for ``layer``, coloured on its fixed scale (as heatmap.png and heatmap.tif)."""
        values = self.values[layer]
        has = np.isfinite(values)
        rgb = layer_scale(layer).rgb(values, int(has.sum()))[has]
        return TileLayer(x=self.x[has], y=self.y[has], size=np.maximum(self.width[has], self.height[has]), rgb=rgb)

    def as_json(self) -> dict:
        return {"x": self.x.tolist(), "y": self.y.tolist(), "width": self.width.tolist(),
                "height": self.height.tolist(), **{k: json_floats(v) for k, v in self.values.items()}}


def read_tiles_csv(path: Path) -> TilesData:
    """Read tiles.csv (columns as ``weakstil.outputs.heatmap.TILE_COLUMNS``; empty fields are NaN)."""
    import pandas as pd

    stat = path.stat()
    frame = pd.read_csv(path)
    missing = [c for c in TILE_COLUMNS[:4] if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: tiles.csv lacks columns {missing}")
    values = {}
    for name in LAYERS:
        column = frame[name] if name in frame.columns else pd.Series(np.nan, index=frame.index)
        values[name] = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    geometry = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=np.float64) for c in TILE_COLUMNS[:4]}
    ok = np.all([np.isfinite(v) for v in geometry.values()], axis=0) if len(frame) else np.zeros(0, bool)
    return TilesData(x=geometry["x"][ok].astype(np.int64), y=geometry["y"][ok].astype(np.int64),
                     width=geometry["width"][ok], height=geometry["height"][ok],
                     values={k: v[ok] for k, v in values.items()},
                     stamp=(str(path), stat.st_size, stat.st_mtime_ns))


def legend(layer: str, stops: int = 11) -> dict:
    """What the page needs to draw a layer's colour bar: the fixed scale of ``weakstil.outputs.heatmap.LAYERS``,
    the same on every slide and in heatmap.png. Attention and contribution are shown × N (N = tiles
    with a value), on log scales; ``ticks`` give each labelled value's place on the bar (0–100 %)."""
    scale = layer_scale(layer)
    lut = colormap_lut(scale.cmap)
    colours = ["#%02x%02x%02x" % tuple(lut[round(i * 255 / (stops - 1))]) for i in range(stops)]
    at = scale.position(np.asarray(scale.ticks, dtype=np.float64)) * 100.0
    return {"layer": layer, "cmap": scale.cmap, "vmin": scale.vmin, "vmax": scale.vmax, "log": scale.log,
            "times_n": scale.times_n, "colors": colours, "label": scale.label, "fixed": True,
            "ticks": [{"at": round(float(a), 3), "label": t} for a, t in zip(at, scale.tick_labels)]}


class _FileCache:
    """Values computed from a file, recomputed when the file's size or mtime changes."""

    def __init__(self, maxsize: int = 64):
        self._items: OrderedDict[Any, tuple[tuple, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def get(self, key, path: Path, compute):
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(key)
                return hit[1]
        value = compute(path)
        with self._lock:
            self._items[key] = (stamp, value)
            self._items.move_to_end(key)
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value


@dataclass
class OpenSlides:
    """Slide handles opened on demand, at most ``MAX_OPEN_SLIDES`` at a time, one lock each."""

    open_kwargs: dict
    _handles: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, path: Path):
        """(handle, lock) of the slide at ``path``; reads must hold the lock."""
        with self._lock:
            if path in self._handles:
                self._handles.move_to_end(path)
                return self._handles[path]
        try:
            handle = open_slide(path, **open_kwargs_for(path, **self.open_kwargs))
        except (MissingMppError, AnisotropicMppError):
            # showing a slide needs no resolution: open it anyway and say the mpp is unknown
            handle = open_slide(path, backend=self.open_kwargs.get("backend", "auto"), mpp=1.0, mpp_override=True)
            handle.mpp_source = "unknown"
        with self._lock:
            if path in self._handles:  # opened twice at once: keep the first
                handle.close()
                return self._handles[path]
            self._handles[path] = (handle, threading.Lock())
            while len(self._handles) > MAX_OPEN_SLIDES:
                _, (old, old_lock) = self._handles.popitem(last=False)
                with old_lock:
                    old.close()
            return self._handles[path]

    def close(self) -> None:
        with self._lock:
            for handle, lock in self._handles.values():
                with lock:
                    handle.close()
            self._handles.clear()


class Cohort:
    """The results folder and the slides folder, as the viewer sees them."""

    def __init__(self, results_dir: Path, slide_paths: dict[str, Path], open_kwargs: dict):
        self.results_dir = results_dir
        self.slide_paths = slide_paths
        self.slides = OpenSlides(open_kwargs)
        self._scores = _FileCache(maxsize=1)
        self._tiles = _FileCache(maxsize=32)
        self._dirs: tuple[float, dict[str, Path]] = (-math.inf, {})
        self._dirs_lock = threading.Lock()

    # --- scores.csv and the per-slide folders ---
    def result_dirs(self) -> dict[str, Path]:
        """{slide id: results/slides/<id>} for the folders that exist (names found by listing; the
        listing is reused for ``DIRS_TTL_S`` so that tile requests do not list the folder each time)."""
        with self._dirs_lock:
            stamp, dirs = self._dirs
            if time.monotonic() - stamp < DIRS_TTL_S:
                return dirs
        root = self.results_dir / "slides"
        dirs = {p.name: p for p in root.iterdir() if p.is_dir() and safe_id(p.name)} if root.is_dir() else {}
        with self._dirs_lock:
            self._dirs = (time.monotonic(), dirs)
        return dirs

    def known(self, slide_id: str) -> bool:
        """Whether the id is one of the cohort's (cheap: for every tile request)."""
        return safe_id(slide_id) and (slide_id in self.result_dirs()
                                      or any(r["slide_id"] == slide_id for r in self.score_rows()))

    def score_rows(self) -> list[dict]:
        path = self.results_dir / SCORES_CSV
        if not path.is_file():
            return []
        return self._scores.get("scores", path, _read_scores)

    def rows(self) -> list[dict]:
        """Every slide of the cohort: the rows of scores.csv, then result folders it does not list."""
        dirs = self.result_dirs()
        rows, seen = [], set()
        for row in self.score_rows():
            rows.append(row)
            seen.add(row["slide_id"])
        for slide_id in sorted(set(dirs) - seen):
            rows.append({"slide_id": slide_id, "score": None, "n_tiles": None, "status": "not in scores.csv",
                         "error": "", "label": None})
        for row in rows:
            sid = row["slide_id"]
            row["has_slide"] = sid in self.slide_paths
            row["has_tiles"] = sid in dirs and (dirs[sid] / FILENAMES["csv"]).is_file()
        return rows

    def row(self, slide_id: str) -> dict | None:
        if not safe_id(slide_id):
            return None
        return next((r for r in self.rows() if r["slide_id"] == slide_id), None)

    def has_label(self) -> bool:
        return any("label" in r.get("_columns", ()) for r in self.score_rows()[:1])

    def review_file(self, slide_id: str, name: str) -> Path | None:
        """results/slides/<id>/<name> if ``name`` is one of the review files and it exists."""
        if name not in REVIEW_FILES:
            return None
        folder = self.result_dirs().get(slide_id)
        if folder is None:
            return None
        path = folder / name
        return path if path.is_file() else None

    def tiles(self, slide_id: str) -> TilesData | None:
        path = self.review_file(slide_id, FILENAMES["csv"])
        if path is None:
            return None
        return self._tiles.get(("tiles", slide_id), path, read_tiles_csv)

    def close(self) -> None:
        self.slides.close()


def _read_scores(path: Path) -> list[dict]:
    """scores.csv rows: slide_id, score, n_tiles, status, error (and label when the file has one)."""
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = tuple(c.strip() for c in reader.fieldnames or ())
        rows = []
        for raw in reader:
            raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if isinstance(k, str)}
            slide_id = raw.get("slide_id", "")
            if not safe_id(slide_id):
                log.warning("%s: skipping a row with slide_id %r", path, slide_id)
                continue
            rows.append({
                "slide_id": slide_id,
                "score": _float(raw.get("score")),
                "n_tiles": _int(raw.get("n_tiles")),
                "status": raw.get("status", "") or "",
                "error": raw.get("error", "") or "",
                "label": _float(raw.get("label")) if "label" in columns else None,
                "_columns": columns,
            })
    return rows


def discover_slides(results_dir: Path, slides_dir: Path | None) -> tuple[dict[str, Path], Path | None, str]:
    """({slide id: file}, the folder used, how it was chosen).

    ``slides_dir`` given: its slides (errors if it holds none). Otherwise ``slides/`` beside the
    results folder (DESIGN.md's default layout), if it exists and holds slides; otherwise none, and
    slide pages show the static pictures only.
    """
    if slides_dir is not None:
        return {p.stem: p for p in find_slides(slides_dir)}, Path(slides_dir), "given"
    guess = Path(os.path.abspath(results_dir)).parent / "slides"
    if guess.is_dir():
        try:
            return {p.stem: p for p in find_slides(guess)}, guess, "beside the results folder"
        except (FileNotFoundError, ValueError) as exc:
            log.warning("no slides under %s: %s", guess, exc)
    return {}, None, "none found"
