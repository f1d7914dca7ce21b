"""The identity of features and models: encoder (+ weights sha256), tiling, tissue parameters, ROI, mpp.

One owner decides whether two things are the same: canonical plain-JSON dicts, identity (what must
match), a hash, and a description in words of what differs. Three levels:

- the *store* identity (:func:`identity`): encoder (name, architecture, weights sha256, input
  size, normalisation) and tiling (tile_px, mpp, overlap, min_tissue, tissue parameters); it names
  the Zarr store, so a change of any of these (``--min-tissue``, ``--weights``) goes to its own store;
- the *slide* part (:func:`slide_request`, :func:`slide_differences`): the ROI's content sha256
  and the slide's mpp with its source (the slide, ``--mpp``, ``--force-mpp``, ``--mpp-csv``); the
  done-check of every job compares it, so another ROI or mpp recomputes the slide;
- a model's fingerprint is the store identity it was trained on (:func:`model_differences`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weakstil.fs import plain_json

MPP_REL_TOL = 1e-6  # two mpp values this close make the same tiles


# --- fingerprints -----------------------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """The one text of a fingerprint that is hashed: sorted keys, no spaces, integral floats as ints."""
    return json.dumps(_canonical_numbers(plain_json(value)), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def fingerprint_hash(value: Any, n: int = 64) -> str:
    """The first ``n`` hex digits of the sha256 of :func:`canonical_json`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:n]


def _canonical_numbers(value: Any) -> Any:
    """Integral floats become ints, so ``mpp=1`` and ``mpp=1.0`` name the same cache."""
    if isinstance(value, dict):
        return {k: _canonical_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def identity(encoder_fp: dict, tiling_fp: dict) -> dict:
    """The part of the fingerprints that decides whether features are interchangeable.

    The weights *source* (``weights``, e.g. ``file:/path``) is left out when the weights' sha256
    is known: the same checkpoint moved to another path gives the same features. Without a hash
    (a random or built-in encoder) the source is all there is, so it stays.
    """
    encoder = _canonical_numbers(plain_json(encoder_fp))
    if encoder.get("weights_sha256"):
        encoder.pop("weights", None)
    return {"encoder": encoder, "tiling": _canonical_numbers(plain_json(tiling_fp))}


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def fingerprint_differences(cached: dict, wanted: dict, *, ours: str = "cache has",
                            theirs: str = "requested") -> list[str]:
    """Lines ``field: cache has A, requested B`` for every identity field that differs."""
    a, b = _flatten(cached, ""), _flatten(wanted, "")
    missing = object()
    lines = []
    for field in sorted(a.keys() | b.keys()):
        va, vb = a.get(field, missing), b.get(field, missing)
        if va != vb:
            sa = "(absent)" if va is missing else json.dumps(va)
            sb = "(absent)" if vb is missing else json.dumps(vb)
            lines.append(f"{field}: {ours} {sa}, {theirs} {sb}")
    return lines


def model_differences(model_fp: dict, features_fp: dict) -> list[str]:
    """What differs between the features a model was trained on and these (both
    ``{"encoder": ..., "tiling": ...}``), reduced with :func:`identity` first."""
    return fingerprint_differences(
        identity(model_fp.get("encoder", {}), model_fp.get("tiling", {})),
        identity(features_fp.get("encoder", {}), features_fp.get("tiling", {})), ours="model", theirs="features")


def same_encoder(a: dict, b: dict) -> bool:
    """Whether two encoder fingerprints make the same features."""
    return identity(a, {}) == identity(b, {})


# --- the slide part -----------------------------------------------------------------------------
def slide_request(*, roi: str | Path | None, open_kwargs: dict) -> dict:
    """What a run asks of one slide beyond the store: the ROI file's sha256 (None: all tissue) and
    the mpp it imposes (``mpp`` with ``mpp_override``: ``--force-mpp`` or ``--mpp-csv``; ``mpp``
    alone: ``--mpp`` for a slide that states none)."""
    return {"roi_sha256": file_sha256(roi) if roi is not None else None,
            "mpp": open_kwargs.get("mpp"), "mpp_override": bool(open_kwargs.get("mpp_override"))}


def _same_mpp(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=MPP_REL_TOL)
    except (TypeError, ValueError):
        return False


def slide_differences(cached: dict, request: dict, *, resolve_mpp: Callable[[], float]) -> list[str]:
    """Lines saying why a cached slide does not serve ``request`` (:func:`slide_request`); [] if it does.

    ``cached`` are the slide group's attrs (``roi_sha256``, ``slide_mpp``, ``mpp_source``).
    ``resolve_mpp()`` opens the slide to learn the mpp it would be read at now; it is only called
    when the attrs cannot decide (the cache used an mpp from the command line and this run does
    not give one). A cache made before a field was recorded is "unknown" for it: recomputed only
    when the request names an ROI or an mpp override.
    """
    lines = []
    want_roi = request.get("roi_sha256")
    if "roi_sha256" not in cached:
        if want_roi is not None:
            lines.append(f"roi: unknown in the cache (made before weakstil recorded it), requested {want_roi[:12]}")
    elif cached["roi_sha256"] != want_roi:
        lines.append(f"roi: cache has {_short(cached['roi_sha256'])}, requested {_short(want_roi)}")
    have, source = cached.get("slide_mpp"), cached.get("mpp_source")
    want, override = request.get("mpp"), request.get("mpp_override")
    if have is None:
        if override:
            lines.append(f"mpp: unknown in the cache, requested {want} (override)")
        return lines
    if override:
        if not _same_mpp(have, want):
            lines.append(f"mpp: cache has {have} ({source}), requested {want} (override)")
    elif source in ("mpp-override", "mpp-argument"):  # the cache's mpp came from a command line
        now = want if source == "mpp-argument" and want is not None else resolve_mpp()
        if not _same_mpp(have, now):
            lines.append(f"mpp: cache has {have} ({source}), the slide is read at {now} now")
    return lines


def _short(sha: str | None) -> str:
    return "none (all tissue)" if sha is None else sha[:12]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
