"""The identity of features and models: encoder (+ weights sha256), tiling, tissue parameters, ROI, mpp.

One owner decides whether two things are the same: canonical plain-JSON dicts, identity (what must
match), and a description in words of what differs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np


# --- fingerprints -----------------------------------------------------------------------------
def plain_json(value: Any) -> Any:
    """``value`` as plain JSON types (numpy scalars/arrays, tuples, Paths converted)."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in cache attributes: {value!r}")


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


def fingerprint_differences(cached: dict, wanted: dict) -> list[str]:
    """Lines ``field: cache has A, requested B`` for every identity field that differs."""
    a, b = _flatten(cached, ""), _flatten(wanted, "")
    missing = object()
    lines = []
    for field in sorted(a.keys() | b.keys()):
        va, vb = a.get(field, missing), b.get(field, missing)
        if va != vb:
            sa = "(absent)" if va is missing else json.dumps(va)
            sb = "(absent)" if vb is missing else json.dumps(vb)
            lines.append(f"{field}: cache has {sa}, requested {sb}")
    return lines


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
