"""Scoring slides with a trained model: features (extracted when missing) → tile and slide sTIL%.

One per-slide job does everything for a slide: extract its features into the cache if they are not
there, predict, and write the review bundle (tiles.csv, heatmap.png/.tif, tiles.geojson,
top_tiles.png, score.json) into a staging folder that is renamed to ``results/slides/<slide_id>``
when complete. ``results/scores.csv`` is rebuilt from the finished slides' ``score.json`` files
plus the failures of this run, after every slide, so an interrupted run loses nothing and a rerun
skips every slide already scored by the same model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from weakstil.embed.extract import (
    ExtractOptions,
    SlideExtractor,
    SlideSource,
    TileEmbedder,
    open_cache,
    resolve_device,
)
from weakstil.errors import CacheMismatchError, ModelMismatchError, OutputWriteError
from weakstil.fingerprint import file_sha256
from weakstil.runs.runner import staging_name

SCORE_COLUMNS = ("slide_id", "score", "n_tiles", "status", "error")
SCORE_JSON = "score.json"




def tiling_from_fingerprint(tiling_fp: dict):
    """(TileSpec, TissueParams) that reproduce a cache's or model's tiling fingerprint."""
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    try:
        spec = TileSpec(tile_px=int(tiling_fp["tile_px"]), mpp=float(tiling_fp["mpp"]),
                        overlap=int(tiling_fp["overlap"]), min_tissue=float(tiling_fp["min_tissue"]))
        tissue = TissueParams(**tiling_fp["tissue"])
    except (KeyError, TypeError) as exc:
        raise ModelMismatchError(f"the model's tiling fingerprint is incomplete ({exc})",
                                 fix="retrain the model with this version of weakstil") from exc
    return spec, tissue


def encoder_from_fingerprint(encoder_fp: dict, weights: str | None = None, *, seed: int = 0):
    """Rebuild the encoder a model was trained on; refuse when its weights differ.

    ``weights`` overrides where the weights are read from (the file may have moved since training);
    they must still hash to the model's ``weights_sha256``.
    """
    from weakstil.embed.cache import identity
    from weakstil.embed.encoders import create_encoder

    name = encoder_fp.get("name")
    if not name:
        raise ModelMismatchError("the model does not name its encoder", fix="retrain the model")
    source = weights or encoder_fp.get("weights")
    if source in (None, "", "random-init"):
        source = None
    encoder = create_encoder(name, source, seed=seed)
    ours, theirs = identity(encoder.fingerprint(), {}), identity(encoder_fp, {})
    if ours != theirs:
        raise ModelMismatchError(
            f"encoder {name!r} with weights {source or 'random-init'} is not the one this model was "
            f"trained on (weights sha256 {encoder.weights_sha256[:12]}… vs "
            f"{str(encoder_fp.get('weights_sha256'))[:12]}…)",
            fix="pass --weights file:/path/to/the/checkpoint the model was trained with")
    return encoder


@dataclass
class ScoreResult:
    out_dir: Path
    outcomes: list
    scores_csv: Path
    run_json: Path
    seconds: float = 0.0

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]


@dataclass
class SlideScorer:
    """The per-slide job of ``weakstil score`` (model, encoder and cache built once per process)."""

    model: object  # TrainedModel
    model_sha256: str
    extractor: SlideExtractor
    out_dir: Path
    formats: tuple = ("csv", "png", "tif", "geojson", "top")
    cutoff: float = 30.0
    extra: dict = field(default_factory=dict)

    def is_done(self, source: SlideSource) -> bool:
        info = read_score_json(slide_dir(self.out_dir, source.slide_id))
        return (info is not None and info.get("model_sha256") == self.model_sha256
                and self.extractor.is_done(source))

    def __call__(self, source: SlideSource) -> dict:
        from weakstil.outputs.heatmap import write_slide_outputs
        from weakstil.wsi.slide import open_slide

        started = time.perf_counter()
        if not self.extractor.is_done(source):
            self.extractor(source)
        cached = self.extractor.cache.read(source.slide_id)
        prediction = self.model.predict(cached.features)
        size_l0 = float(cached.attrs["tile_size_l0"])
        info = {"slide_id": source.slide_id, "score": round(float(prediction.score), 4),
                "n_tiles": int(cached.features.shape[0]), "status": "ok", "error": "",
                "model_sha256": self.model_sha256, "source_path": str(source.path),
                "slide_mpp": cached.attrs.get("slide_mpp"), "tile_size_l0": size_l0,
                "aggregation": self.model.aggregation, "cutoff": self.cutoff,
                "scored": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        final = slide_dir(self.out_dir, source.slide_id)
        staging = final.parent / staging_name(source.slide_id)
        try:
            staging.mkdir(parents=True)
            with open_slide(source.path, **source.open_kwargs) as slide:
                write_slide_outputs(slide, staging, coords_l0=cached.coords_l0, size_l0=size_l0,
                                    prediction=prediction.tile_pred, attention=prediction.attention,
                                    contribution=prediction.contribution, score=prediction.score,
                                    formats=self.formats, cutoff=self.cutoff)
            info["seconds"] = round(time.perf_counter() - started, 3)
            (staging / SCORE_JSON).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            install_dir(staging, final)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputWriteError(f"cannot write the results of {source.slide_id}: {exc}", path=final) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return info


def slide_dir(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "slides" / slide_id


def read_score_json(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / SCORE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def install_dir(staging: Path, final: Path) -> None:
    """Rename a finished folder into place; an old one is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(staging_name(final.name, "old"))
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
    try:
        os.rename(staging, final)
    except OSError:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the old results back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_scores_csv(out_dir: Path, sources: list[SlideSource], outcomes: dict, model_sha256: str) -> Path:
    """``scores.csv``: one row per slide of this run (ok from score.json, failed with the error).

    Rebuilt under a file lock, so two runs sharing a results folder never put back an older state.
    """
    from weakstil.runs.runner import file_lock

    with file_lock(Path(out_dir) / ".scores.lock"):
        return _write_scores_csv(out_dir, sources, outcomes, model_sha256)


def _write_scores_csv(out_dir: Path, sources: list[SlideSource], outcomes: dict, model_sha256: str) -> Path:
    import csv

    from weakstil.runs.runner import staging_name

    path = Path(out_dir) / "scores.csv"
    tmp = path.with_name(staging_name("scores.csv"))
    earlier = _failed_rows(path)  # a slide that failed before keeps its row until this run reaches it
    try:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(SCORE_COLUMNS)
            for source in sources:
                sid = source.slide_id
                info = read_score_json(slide_dir(out_dir, sid))
                outcome = outcomes.get(sid)
                if outcome is not None and outcome.status == "failed":
                    error = f"{outcome.reason}: {outcome.error}" if outcome.reason else outcome.error
                    writer.writerow([sid, "", "", "failed", error])
                elif info is not None and info.get("model_sha256") == model_sha256:
                    writer.writerow([sid, f"{float(info['score']):.2f}", info["n_tiles"], "ok", ""])
                elif outcome is not None and outcome.reason in ("locked", "stopped"):
                    writer.writerow([sid, "", "", "pending", outcome.error])
                elif outcome is None and sid in earlier:
                    writer.writerow(earlier[sid])
                else:
                    writer.writerow([sid, "", "", "pending", "not scored yet"])
        if not (path.is_file() and path.read_bytes() == tmp.read_bytes()):  # a rerun that changed nothing
            os.replace(tmp, path)                                          # leaves the file untouched
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _failed_rows(path: Path) -> dict[str, list[str]]:
    """The ``failed`` rows of an existing scores.csv, by slide id (empty if none or unreadable)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows or tuple(rows[0]) != SCORE_COLUMNS:
        return {}
    return {row[0]: row for row in rows[1:] if len(row) == len(SCORE_COLUMNS) and row[3] == "failed"}


def write_run_json(out_dir: Path, outcomes: list, *, run_id: str, info: dict) -> Path:
    """``runs/<run_id>.json``: what this run did to each slide (status, seconds, error)."""
    runs = Path(out_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{run_id}.json"
    doc = {**info, "slides": [{"slide_id": o.key, "status": o.status, "reason": o.reason,
                               "seconds": round(o.seconds, 3), "error": o.error, "fix": o.fix}
                              for o in outcomes]}
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_out_dir(out_dir: Path) -> None:
    """Fail early, before any work, when the results folder cannot be written."""
    try:
        (out_dir / "slides").mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputWriteError(f"the results folder is not writable ({exc.strerror or exc})", path=out_dir) from exc


def make_scorer(model_dir: Path, features_dir: Path, out_dir: Path, *, weights: str | None = None,
                opts: ExtractOptions | None = None, roi_dir: Path | None = None,
                formats=("csv", "png", "tif", "geojson", "top"), cutoff: float = 30.0, qc: bool = True,
                tiles_task=None) -> SlideScorer:
    """Load the model, rebuild its encoder and tiling, open the matching cache (refusing mismatches)."""
    from weakstil.mil.model import check_fingerprint, load_model

    model_dir = Path(model_dir)
    model = load_model(model_dir)
    ckpt = model_dir if model_dir.is_file() else model_dir / "model.ckpt"
    fp = model.fingerprint
    spec, tissue = tiling_from_fingerprint(fp.get("tiling", {}))
    encoder = encoder_from_fingerprint(fp.get("encoder", {}), weights)
    opts = opts or ExtractOptions()
    try:
        cache = open_cache(features_dir, encoder, spec, tissue)
    except CacheMismatchError as exc:  # --features named one store, made with another encoder or tiling
        raise ModelMismatchError(
            f"the model {model_dir} was trained on other features than the cache {exc.path}: {exc.problem}",
            fix="point --features at the folder that holds the caches (the model's own one is used, or made), "
                "or score with a model trained on this cache") from exc
    check_fingerprint(model, cache)
    embedder = TileEmbedder(encoder, resolve_device(opts.device))
    extractor = SlideExtractor(cache, embedder, spec, tissue, opts, roi_dir=roi_dir, qc=qc, tiles_task=tiles_task)
    return SlideScorer(model, file_sha256(ckpt), extractor, Path(out_dir), tuple(formats), cutoff)


def score_slides(sources: list[SlideSource], model_dir: Path, *, features_dir: Path, out_dir: Path,
                 weights: str | None = None, opts: ExtractOptions | None = None, roi_dir: Path | None = None,
                 formats=("csv", "png", "tif", "geojson", "top"), cutoff: float = 30.0,
                 lock: bool = True) -> ScoreResult:
    """Score every slide (extracting what is missing); one bad slide never stops the others."""
    from weakstil.embed.extract import _progress
    from weakstil.runs.runner import run_batch, sweep_partials

    opts = opts or ExtractOptions()
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    for folder in (out_dir, out_dir / "slides"):  # leftovers of killed runs
        sweep_partials(folder)
    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    with _progress(opts.progress) as progress:
        slides_task = progress.add_task("slides", total=len(sources), unit="slides")
        tiles_task = progress.add_task("tiles", total=None, unit="tiles")
        scorer = make_scorer(model_dir, features_dir, out_dir, weights=weights, opts=opts, roi_dir=roi_dir,
                             formats=formats, cutoff=cutoff,
                             tiles_task=lambda n: progress.update(tiles_task, advance=n))
        by_id: dict = {}
        last_write = [0.0]

        def record(outcome):  # scores.csv at most every 5 s (it is rebuilt from every slide folder)
            by_id[outcome.key] = outcome
            progress.update(slides_task, advance=1)
            if time.perf_counter() - last_write[0] >= 5.0:
                write_scores_csv(out_dir, sources, by_id, scorer.model_sha256)
                last_write[0] = time.perf_counter()

        outcomes = run_batch(sources, scorer, key=lambda s: s.slide_id, is_done=scorer.is_done, desc="score",
                             lock_dir=out_dir / ".locks" if lock else None, progress=False, on_outcome=record)
    scores_csv = write_scores_csv(out_dir, sources, by_id, scorer.model_sha256)
    run_json = write_run_json(out_dir, outcomes, run_id=run_id,
                              info={"run_id": run_id, "model": str(model_dir), "model_sha256": scorer.model_sha256,
                                    "features": str(scorer.extractor.cache.path), "host": os.uname().nodename,
                                    "pid": os.getpid()})
    return ScoreResult(out_dir, outcomes, scores_csv, run_json, time.perf_counter() - started)


def read_scores(path: Path):
    """``scores.csv`` as a DataFrame (slide_id as str)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"slide_id": str})

