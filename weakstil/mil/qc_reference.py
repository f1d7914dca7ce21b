"""The training cohort's QC reference: what a slide's embedding, tile count, mpp and member scores
looked like in training, saved next to the model (qc_reference.json) at training time.

Scoring compares every slide with it (:mod:`weakstil.outputs.qc` explains each flag and threshold).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

REFERENCE_FILE = "qc_reference.json"


REFERENCE_VERSION = 3  # 2: stain_range (slides extracted with stain normalisation), OOD_MAX_FACTOR; 3: measured_range


MIN_TILES_FLOOR = 4


MIN_TILES_FRACTION = 0.25


MPP_TOLERANCE = 0.10


OOD_PERCENTILE = 99.0


OOD_MEDIAN_FACTOR = 2.0


OOD_MAX_FACTOR = 1.25  # new slides like the training ones reach ~1.2x the training slides' own maximum


STAIN_TOLERANCE = 1.5  # a stain amount beyond the training range x/÷ this is flagged


MEASURE_TOLERANCE = 0.25  # a measurement of sTIL% beyond the training range widened by this share of it is flagged


LITTLE_STROMA_MM2 = 0.125  # estimated stroma below this (ten 112-µm tiles' worth) is flagged: too little to score


STD_FLOOR = 0.1


DISAGREE_MIN_SD = 10.0


DISAGREE_FACTOR = 1.5


# --- statistics -------------------------------------------------------------------------------
def slide_embedding(features: np.ndarray) -> np.ndarray:
    """The slide's mean tile embedding (D,), float64."""
    return np.asarray(features, dtype=np.float64).mean(axis=0)


def _floored(std: np.ndarray) -> np.ndarray:
    floor = STD_FLOOR * float(np.median(std)) if std.size else 0.0
    return np.maximum(std, max(floor, 1e-12))


def embedding_distance(embedding: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """Root-mean-square z-score of ``embedding`` against a cohort's per-dimension mean and SD."""
    z = (np.asarray(embedding, dtype=np.float64) - mean) / _floored(np.asarray(std, dtype=np.float64))
    return float(np.sqrt(np.mean(z**2)))


def loo_distances(embeddings: np.ndarray) -> np.ndarray:
    """Each slide's :func:`embedding_distance` to the mean and SD (ddof=1) of all the others (n ≥ 3)."""
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"leave-one-out distances need at least 3 slides, got {n}")
    total, squares = x.sum(axis=0), (x**2).sum(axis=0)
    out = np.empty(n)
    for i in range(n):
        mean = (total - x[i]) / (n - 1)
        var = np.maximum((squares - x[i] ** 2 - (n - 1) * mean**2) / (n - 2), 0.0)
        out[i] = embedding_distance(x[i], mean, np.sqrt(var))
    return out


def member_scores(model, features: np.ndarray) -> np.ndarray:
    """Each ensemble member's slide score (sTIL% 0-100) for one slide's features (N, D)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    return np.array([100.0 * float(member.predict_bag(x)[0]) for member in model.members])


# --- the reference ------------------------------------------------------------------------------
def stain_amounts(attrs: Mapping | None) -> list[float] | None:
    """A slide's hematoxylin and eosin amounts (99th-percentile concentrations) from its cache
    attrs, or None when its tiles were not stain-normalised (:mod:`weakstil.embed.stain`)."""
    stain = (attrs or {}).get("stain") or {}
    amounts = stain.get("max_c")
    return [float(v) for v in amounts] if amounts else None


QC_MEASURES = ("lymph_per_stroma_sized", "lymph_per_stroma", "lymph_per_stroma_loose", "stroma_est")


def measured_columns(encoder_fp: Mapping | None) -> dict[str, int]:
    """{name: column offset from the end} of the morphometry's readings of sTIL% in the stroma and of
    its stroma estimate (:data:`QC_MEASURES`; not the share inside nests, a confounder with a narrow
    range on a standard cohort) for features with this morphometry's column layout
    (:data:`~weakstil.embed.encoders.MEASURED_ARCHS`), else {}: what
    ``measurement-out-of-range`` checks."""
    from weakstil.embed.encoders import MEASURED_ARCHS
    from weakstil.embed.morph import NAMES

    if not str((encoder_fp or {}).get("arch", "")).endswith(MEASURED_ARCHS):
        return {}
    return {name: NAMES.index(name) - len(NAMES) for name in QC_MEASURES}


def slide_measurements(features: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """The slide's mean of the stain morphometry's measurement ``columns`` (offsets from the last
    column, -1 being the last)."""
    return np.asarray(features, dtype=np.float64)[:, list(columns)].mean(axis=0)


def build_reference(embeddings: np.ndarray, n_tiles: Sequence[int], mpps: Sequence[float | None],
                    member_sd: Sequence[float] | None = None,
                    stains: Sequence[Sequence[float] | None] | None = None,
                    measured: np.ndarray | None = None, measured_columns: Mapping[str, int] | None = None) -> dict:
    """The statistics and thresholds QC needs, from the training slides (one row each).

    ``stains``: each slide's (H, E) amounts (:func:`stain_amounts`; None where unknown);
    ``measured``: each slide's mean of the morphometry's measurements of sTIL% (n, len(measured_columns);
    :func:`slide_measurements`) and ``measured_columns`` {name: column offset from the end}, for
    features that have them."""
    names = list(measured_columns or {})
    x = np.asarray(embeddings, dtype=np.float64)
    tiles = np.asarray(n_tiles, dtype=np.float64)
    known_mpp = [float(m) for m in mpps if m is not None and math.isfinite(float(m))]
    loo = loo_distances(x)
    sd = np.asarray(member_sd if member_sd is not None else [], dtype=np.float64)
    amounts = np.array([a for a in (stains or []) if a is not None], dtype=np.float64).reshape(-1, 2)
    thresholds = {
        "min_tiles": int(max(MIN_TILES_FLOOR, math.ceil(MIN_TILES_FRACTION * np.percentile(tiles, 5)))),
        "mpp_range": [min(known_mpp) * (1 - MPP_TOLERANCE), max(known_mpp) * (1 + MPP_TOLERANCE)]
        if known_mpp else None,
        "max_distance": float(max(OOD_MAX_FACTOR * np.percentile(loo, OOD_PERCENTILE),
                                  OOD_MEDIAN_FACTOR * np.median(loo))),
        "max_member_sd": (float(max(DISAGREE_MIN_SD, DISAGREE_FACTOR * np.percentile(sd, 99)))
                          if sd.size else None),
        "stain_range": ([[float(lo) / STAIN_TOLERANCE, float(hi) * STAIN_TOLERANCE]
                         for lo, hi in zip(amounts.min(axis=0), amounts.max(axis=0))] if len(amounts) else None),
        "measured_range": _measured_range(measured, names),
    }
    return {
        "version": REFERENCE_VERSION, "n_slides": int(x.shape[0]),
        "mean": x.mean(axis=0).tolist(), "std": x.std(axis=0, ddof=1).tolist(),
        "loo_distance": {"median": float(np.median(loo)), "max": float(loo.max()), "percentile": OOD_PERCENTILE},
        "training": {"n_tiles_p05": float(np.percentile(tiles, 5)), "n_tiles_median": float(np.median(tiles)),
                     "mpp": sorted(set(known_mpp)),
                     "member_sd_p99": float(np.percentile(sd, 99)) if sd.size else None,
                     "measured_columns": {str(k): int(v) for k, v in (measured_columns or {}).items()} or None,
                     "stain_amounts": ({"min": amounts.min(axis=0).tolist(), "median": np.median(amounts, axis=0).tolist(),
                                        "max": amounts.max(axis=0).tolist()} if len(amounts) else None)},
        "thresholds": thresholds,
        "rules": describe_rules(),
    }


def _measured_range(measured: np.ndarray | None, names: Sequence[str]) -> dict | None:
    """{name: [lo, hi]}: each measurement's training range widened by :data:`MEASURE_TOLERANCE` of it."""
    if measured is None or not len(names):
        return None
    m = np.asarray(measured, dtype=np.float64).reshape(-1, len(names))
    lo, hi = m.min(axis=0), m.max(axis=0)
    pad = MEASURE_TOLERANCE * (hi - lo)
    return {str(n): [float(a - w), float(b + w)] for n, a, b, w in zip(names, lo, hi, pad)}


def describe_rules() -> dict:
    """How each threshold is derived (stored with the reference and shown in the model card)."""
    return {
        "low-tissue": f"n_tiles < max({MIN_TILES_FLOOR}, ceil({MIN_TILES_FRACTION} x 5th percentile of training tiles))",
        "mpp-out-of-range": f"slide mpp outside the training range widened by {MPP_TOLERANCE:.0%}",
        "out-of-distribution": ("RMS z-score of the mean tile embedding against the training slides > the "
                                f"larger of {OOD_MAX_FACTOR:g} x the {OOD_PERCENTILE:g}th percentile and "
                                f"{OOD_MEDIAN_FACTOR:g} x the median of their own leave-one-out distances"),
        "stain-out-of-range": (f"hematoxylin or eosin amount (99th percentile of the slide's stain estimate) "
                               f"outside the training slides' range widened x/÷ {STAIN_TOLERANCE:g}"),
        "measurement-out-of-range": ("the slide's mean of a stain-morphometry measurement of sTIL% (the lymphocyte "
                                     "shares of the stroma; the stroma estimate) outside the training "
                                     f"slides' range widened by {MEASURE_TOLERANCE:g} x that range on each side"),
        "ensemble-disagreement": (f"SD of the members' scores > max({DISAGREE_MIN_SD:g}, {DISAGREE_FACTOR:g} x "
                                  "99th percentile of that SD on the training slides)"),
        "little-stroma": (f"the slide's estimated stroma (its tiles' stroma estimate x the tile area) < "
                          f"{LITTLE_STROMA_MM2:g} mm² (a fixed floor, not from training)"),
    }


def fixed_rules() -> dict:
    """The rules applied to every model's scores whatever its stored reference holds (fixed floors,
    not learned from training): a card of a model trained before a rule existed still lists it."""
    return {k: v for k, v in describe_rules().items() if k == "little-stroma"}


def stroma_area_mm2(stroma: np.ndarray, tiling: Mapping | None) -> float | None:
    """The slide's estimated stroma in mm²: the sum over tiles of their estimated stroma fraction
    (``stroma`` (N,), 0-1: :func:`~weakstil.embed.encoders.stroma_estimate`, as tiles.csv shows it)
    × the area a tile adds to the grid (its stride squared:
    :meth:`~weakstil.wsi.tiling.TileSpec.stride_l0` at 1 µm/px). None without the tiling's ``tile_px``
    and ``mpp``."""
    from weakstil.wsi.tiling import TileSpec

    tiling = tiling or {}
    if not tiling.get("tile_px") or not tiling.get("mpp"):
        return None
    stride_um = TileSpec(tile_px=int(tiling["tile_px"]), mpp=float(tiling["mpp"]),
                         overlap=int(tiling.get("overlap") or 0)).stride_l0(1.0)
    stroma = np.nan_to_num(np.asarray(stroma, dtype=np.float64), nan=0.0).clip(0, 1)
    return float(stroma.sum() * stride_um ** 2 / 1e6)


# --- files --------------------------------------------------------------------------------------
def reference_from_bags(bags: Mapping[str, np.ndarray], slide_ids: Sequence[str], mpps: Mapping[str, float | None],
                        model=None, stains: Mapping[str, Sequence[float] | None] | None = None,
                        measured_columns: Mapping[str, int] | None = None) -> dict:
    """:func:`build_reference` from training bags ({slide_id: (N, D)}), the deployed model, the
    slides' stain amounts ({slide_id: (H, E)}, :func:`stain_amounts`) and the names of the
    measurements QC checks, {name: column offset from the end} (none: no measurement check)."""
    embeddings = np.stack([slide_embedding(bags[s]) for s in slide_ids])
    measured = (np.stack([slide_measurements(bags[s], list(measured_columns.values())) for s in slide_ids])
                if measured_columns else None)
    sds = None
    if model is not None and len(model.members) > 1:
        sds = [float(np.std(member_scores(model, bags[s]), ddof=1)) for s in slide_ids]
    return build_reference(embeddings, [bags[s].shape[0] for s in slide_ids], [mpps.get(s) for s in slide_ids], sds,
                           [(stains or {}).get(s) for s in slide_ids], measured, measured_columns)


def save_reference(reference: Mapping, path: str | Path) -> Path:
    from weakstil.fs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(reference, allow_nan=False) + "\n", encoding="utf-8")
    return path


def load_reference(model_dir: str | Path) -> dict | None:
    """The model's QC reference, or None for a model trained before QC (or a file-path model)."""
    model_dir = Path(model_dir)
    path = (model_dir.parent if model_dir.is_file() else model_dir) / REFERENCE_FILE
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        from weakstil.errors import ModelNotFoundError

        raise ModelNotFoundError(f"{REFERENCE_FILE} cannot be read ({exc})", path=path,
                                 fix="delete the file to score without QC, or retrain the model") from exc
    return reference
