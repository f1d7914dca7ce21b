"""Scoring slides with a trained model: features (extracted when missing) → tile and slide sTIL%.

One per-slide job does everything for a slide: extract its features into the cache if they are not
there, predict, and write the review bundle (tiles.csv, heatmap.png/.tif, tiles.geojson,
top_tiles.png, score.json) into a staging folder that is renamed to ``results/slides/<slide_id>``
when complete. ``results/scores.csv`` is rebuilt from the finished slides' ``score.json`` files
plus the failures of this run, after every slide, so an interrupted run loses nothing and a rerun
skips every slide already scored by the same model. Rows of slides this run did not touch (an
earlier run on another folder into the same ``--out``) are kept: scores.csv is merged by slide id,
the latest run winning per slide. The batch over a folder is :func:`weakstil.runs.batch.score_slides`.
"""

from __future__ import annotations

import json
import os
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
from weakstil.errors import (
    CacheMismatchError,
    ModelMismatchError,
    OutputWriteError,
    WeakstilError,
)
from weakstil.fingerprint import file_sha256
from weakstil.fs import disk_errors, file_lock, staging_dir, write_csv, write_json

SCORE_COLUMNS = ("slide_id", "score", "n_tiles", "status", "error", "qc")  # qc: outputs/qc.py flags
SCORE_JSON = "score.json"




def tiling_from_fingerprint(tiling_fp: dict):
    """(TileSpec, TissueParams) that reproduce a cache's or model's tiling fingerprint."""
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    try:
        spec = TileSpec(tile_px=int(tiling_fp["tile_px"]), mpp=float(tiling_fp["mpp"]),
                        overlap=int(tiling_fp["overlap"]), min_tissue=float(tiling_fp["min_tissue"]),
                        stain=str(tiling_fp.get("stain", "none")))
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
    from weakstil.embed.encoders import create_encoder
    from weakstil.fingerprint import same_encoder

    name = encoder_fp.get("name")
    if not name:
        raise ModelMismatchError("the model does not name its encoder", fix="retrain the model")
    source = weights or encoder_fp.get("weights")
    if source in (None, "", "random-init"):
        source = None
    encoder = create_encoder(name, source, seed=seed)
    current = encoder.fingerprint()
    if not same_encoder(current, encoder_fp):
        now, then = current.get("arch"), encoder_fp.get("arch")
        if then and now != then:  # the same name computes other features in this version of weakstil
            from weakstil.mil.model import older_morphometry_fix

            raise ModelMismatchError(
                f"the model was trained on {then} features; this weakstil computes {now} for encoder {name!r}",
                fix=older_morphometry_fix({"encoder": encoder_fp}, {"encoder": current})
                or "retrain the model on features this version extracts, or score with the version it was trained with")
        raise ModelMismatchError(
            f"encoder {name!r} with weights {source or 'random-init'} is not the one this model was "
            f"trained on (weights sha256 {encoder.weights_sha256[:12]}… vs "
            f"{str(encoder_fp.get('weights_sha256'))[:12]}…)",
            fix="pass --weights file:/path/to/the/checkpoint the model was trained with")
    return encoder


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
    qc_reference: dict | None = None  # the model's qc_reference.json (None: an older model)

    def is_done(self, source: SlideSource) -> bool:
        info = read_score_json(slide_dir(self.out_dir, source.slide_id))
        return (info is not None and info.get("model_sha256") == self.model_sha256
                and self.extractor.is_done(source))

    def __call__(self, source: SlideSource) -> dict:
        from weakstil.embed.encoders import stroma_estimate
        from weakstil.outputs.heatmap import write_slide_outputs
        from weakstil.outputs.qc import check_slide
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
                "scored": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "qc": check_slide(self.qc_reference, self.model, cached.features, mpp=cached.attrs.get("slide_mpp"),
                                  attrs=cached.attrs)}
        final = slide_dir(self.out_dir, source.slide_id)
        try:
            with staging_dir(final) as staging, open_slide(source.path, **source.open_kwargs) as slide:
                write_slide_outputs(slide, staging, coords_l0=cached.coords_l0, size_l0=size_l0,
                                    prediction=prediction.tile_pred, attention=prediction.attention,
                                    contribution=prediction.contribution, score=prediction.score,
                                    formats=self.formats, cutoff=self.cutoff,
                                    stroma=stroma_estimate(cached.features, self.extractor.cache.encoder_fp))
                info["seconds"] = round(time.perf_counter() - started, 3)
                write_json(staging / SCORE_JSON, info)
        except WeakstilError:  # a full disk (DiskFullError) or bad input: as it is
            raise
        except OSError as exc:
            raise OutputWriteError(f"cannot write the results of {source.slide_id}: {exc}", path=final) from exc
        return info


def slide_dir(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / "slides" / slide_id


def read_score_json(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / SCORE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_scores_csv(out_dir: Path, sources: list, outcomes: dict, model_sha256: str) -> Path:
    """``scores.csv``: the rows of earlier runs merged with this run's (one per slide, this run's win).

    A slide of this run: ``ok`` from its score.json, ``failed`` with the error, ``pending`` when it
    was left to another process or not reached yet (an earlier row of it is kept until this run
    reaches it). Slides of earlier runs that this run did not touch keep their rows. Rebuilt under a
    file lock and written atomically, so two runs sharing a results folder never put back an older
    state; a rerun that changed nothing leaves the file untouched.
    """
    path = Path(out_dir) / "scores.csv"
    with file_lock(Path(out_dir) / ".scores.lock"):
        rows = _earlier_rows(path)
        for source in sources:
            sid = source.slide_id
            row = _score_row(sid, slide_dir(out_dir, sid), outcomes.get(sid), model_sha256, rows.get(sid))
            rows[sid] = row
        return write_csv(path, SCORE_COLUMNS, rows.values(), only_if_changed=True)


def _score_row(sid: str, folder: Path, outcome, model_sha256: str, earlier: list | None) -> list:
    info = read_score_json(folder)
    if outcome is not None and outcome.status == "failed":
        error = f"{outcome.reason}: {outcome.error}" if outcome.reason else outcome.error
        return [sid, "", "", "failed", error, ""]
    if info is not None and info.get("model_sha256") == model_sha256:
        return [sid, f"{float(info['score']):.2f}", info["n_tiles"], "ok", "", info.get("qc", "")]
    if outcome is not None and outcome.reason in ("locked", "stopped"):
        return [sid, "", "", "pending", outcome.error, ""]
    if outcome is None and earlier is not None:
        return earlier
    return [sid, "", "", "pending", "not scored yet", ""]


def _earlier_rows(path: Path) -> dict[str, list[str]]:
    """The rows of an existing scores.csv, by slide id, in file order (empty if none or unreadable)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    if not rows or tuple(rows[0]) != SCORE_COLUMNS[:len(rows[0])]:  # also a file from before the qc column
        return {}
    width = len(rows[0])
    pad = [""] * (len(SCORE_COLUMNS) - width)
    return {row[0]: row + pad for row in rows[1:] if len(row) == width}


def write_run_json(out_dir: Path, outcomes: list, *, run_id: str, info: dict) -> Path:
    """``runs/<run_id>.json``: what this run did to each slide (status, seconds, error)."""
    doc = {**info, "slides": [{"slide_id": o.key, "status": o.status, "reason": o.reason,
                               "seconds": round(o.seconds, 3), "error": o.error, "fix": o.fix}
                              for o in outcomes]}
    return write_json(Path(out_dir) / "runs" / f"{run_id}.json", doc)


def check_out_dir(out_dir: Path) -> None:
    """Fail early, before any work, when the results folder cannot be written."""
    try:
        with disk_errors(out_dir):
            (out_dir / "slides").mkdir(parents=True, exist_ok=True)
            probe = out_dir / f".write-test.{os.getpid()}"
            try:
                probe.write_bytes(b"ok")
            finally:
                probe.unlink(missing_ok=True)
    except WeakstilError:
        raise
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
    from weakstil.mil.qc_reference import load_reference

    return SlideScorer(model, file_sha256(ckpt), extractor, Path(out_dir), tuple(formats), cutoff,
                       qc_reference=load_reference(model_dir))


def read_scores(path: Path):
    """``scores.csv`` as a DataFrame (slide_id as str)."""
    import pandas as pd

    return pd.read_csv(path, dtype={"slide_id": str})

