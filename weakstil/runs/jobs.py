"""The per-slide jobs of a batch: extract, score, regenerate.

Each is a small picklable object with ``key(item)``, ``is_done(item)`` (compared against the full
fingerprint: see :mod:`weakstil.fingerprint`), ``run(item)`` and ``lock_dir``. The heavy parts
(encoder on its device, model, feature cache) are built by :meth:`prepare`, once per process, and
are not pickled: a Dask worker builds its own from the same arguments. The per-slide computation
itself lives below, in :mod:`weakstil.embed.extract` (:class:`SlideExtractor`),
:mod:`weakstil.outputs.score` (:class:`SlideScorer`) and :mod:`weakstil.outputs.bundle`
(:func:`regenerate_slide`); this module only wires it to the runner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class _Job:
    """What every job shares: lazily built state that stays in its process."""

    _built: Any = field(default=None, init=False, repr=False, compare=False)
    tiles_task: Callable[[int], None] | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_built": None, "tiles_task": None}

    def key(self, item: Any) -> str:
        return item.slide_id

    @property
    def built(self) -> Any:
        if self._built is None:
            self._built = self.build()
        return self._built

    def prepare(self) -> _Job:
        """Build the heavy state now (loads weights, opens the cache); returns self."""
        _ = self.built
        return self

    def build(self) -> Any:
        raise NotImplementedError

    def is_done(self, item: Any) -> bool:
        return self.built.is_done(item)

    def run(self, item: Any) -> Any:
        return self.built(item)

    def output_roots(self) -> list[Path]:
        """Folders the job writes into; the runner stops the batch when one vanishes mid-run."""
        return []

    def outputs_missing(self) -> list[Path]:
        """Those of :meth:`output_roots` and the lock folder that are no longer folders (deleted,
        moved, unmounted; a slide's own writes may have remade the root, never its lock folder)."""
        locks = getattr(self, "lock_dir", None) if getattr(self, "lock", False) else None
        roots = [Path(p) for p in self.output_roots()] + ([Path(locks)] if locks is not None else [])
        return [p for p in roots if not p.is_dir()]

    def close(self) -> None:
        """Release what :meth:`prepare` built in this process (reader processes, threads), if anything."""
        close = getattr(self._built, "close", None)
        if callable(close):
            close()

    def for_worker(self, opts: Any) -> _Job:
        """A copy for a worker process with its own extract options (device, readers)."""
        if not hasattr(self, "opts"):
            return self
        return dataclasses.replace(self, opts=opts)


@dataclass
class ExtractJob(_Job):
    """Tiles → features of one slide into the cache (``encoder``: a name or an Encoder object)."""

    features: Path
    encoder: Any
    spec: Any
    tissue: Any
    opts: Any
    weights: str | None = None
    roi_dir: Path | None = None
    qc: bool = True
    lock: bool = True

    def build(self):
        from weakstil.embed.encoders import create_encoder
        from weakstil.embed.extract import (
            SlideExtractor,
            TileEmbedder,
            open_cache,
            resolve_device,
        )

        encoder = create_encoder(self.encoder, self.weights) if isinstance(self.encoder, str) else self.encoder
        cache = open_cache(self.features, encoder, self.spec, self.tissue)
        embedder = TileEmbedder(encoder, resolve_device(self.opts.device))
        return SlideExtractor(cache, embedder, self.spec, self.tissue, self.opts, roi_dir=self.roi_dir,
                              qc=self.qc, tiles_task=self.tiles_task)

    @property
    def cache(self):
        return self.built.cache

    @property
    def lock_dir(self) -> Path | None:
        return self.cache.path / ".locks" if self.lock else None

    def output_roots(self) -> list[Path]:
        # the store once it is open here (cheap), else the folder it lives in (no encoder is built
        # in a process that only dispatches to workers)
        return [self._built.cache.path if self._built is not None else Path(self.features)]


@dataclass
class ScoreJob(_Job):
    """Score one slide (extracting its features first when missing) into ``out/slides/<id>/``."""

    model: Path
    features: Path
    out: Path
    opts: Any
    weights: str | None = None
    roi_dir: Path | None = None
    formats: tuple = ("csv", "png", "tif", "geojson", "top")
    cutoff: float = 30.0
    qc: bool = True
    lock: bool = True

    def build(self):
        from weakstil.outputs.score import make_scorer

        return make_scorer(self.model, self.features, self.out, weights=self.weights, opts=self.opts,
                           roi_dir=self.roi_dir, formats=self.formats, cutoff=self.cutoff, qc=self.qc,
                           tiles_task=self.tiles_task)

    @property
    def model_sha256(self) -> str:
        return self.built.model_sha256

    @property
    def lock_dir(self) -> Path | None:
        return Path(self.out) / ".locks" if self.lock else None

    def output_roots(self) -> list[Path]:
        return [Path(self.out)]


@dataclass
class RegenerateJob(_Job):
    """Rewrite one scored slide's review files from its tiles.csv (no model needed)."""

    results_dir: Path
    slide_files: dict | None = None
    slides_dir: Path | None = None
    backend: str = "auto"
    mpp: float | None = None
    formats: tuple = ("png", "tif", "geojson", "top")
    cmap: str | None = None  # None: the outputs' default colour map
    cutoff: float | None = None
    lock: bool = True

    def build(self):
        return True  # nothing heavy: each slide opens its own file

    def is_done(self, item: Any) -> bool:
        return False  # asked for explicitly: always rewritten

    def run(self, item: Any) -> dict[str, str]:
        from weakstil.outputs.bundle import regenerate_slide

        return regenerate_slide(item, slide_files=self.slide_files, slides_dir=self.slides_dir,
                                backend=self.backend, mpp=self.mpp, formats=self.formats, cutoff=self.cutoff,
                                **({"cmap": self.cmap} if self.cmap else {}))

    @property
    def lock_dir(self) -> Path | None:
        return Path(self.results_dir) / ".locks" if self.lock else None

    def output_roots(self) -> list[Path]:
        return [Path(self.results_dir)]
