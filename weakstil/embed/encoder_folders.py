"""Encoder folders: a directory holding ``encoder.json`` + ``encoder.safetensors`` is an encoder.

``weakstil pretrain`` writes such a folder; ``--encoder DIR`` then works wherever an encoder name
does. ``encoder.json`` is the spec (the facts of :class:`~weakstil.embed.encoders.EncoderSpec`, the
weights' sha256 and how the weights were trained); the weights are safetensors (never pickle) in
timm's key layout, checked against that sha256 before they are loaded.

An encoder folder is found (:func:`find_encoder_folder`) by
1. its path (``--encoder models/encoders/my-simclr``, ``--encoder ./out``);
2. its name, under ``models/encoders/`` of the working directory (``--encoder my-simclr``);
3. the weights file a model's fingerprint names (``file:/…/encoder.safetensors``), so ``weakstil
   score`` rebuilds a folder encoder from the model alone.
Its fingerprint (name, arch, weights sha256, embed_dim, input size, mean/std) flows into feature
caches and models like any encoder's; the folder's location is not part of it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from weakstil.errors import (
    CheckpointReadError,
    EncoderFolderError,
    WeakstilError,
    WeightsNotFoundError,
)

log = logging.getLogger(__name__)

SPEC_FILE = "encoder.json"
WEIGHTS_FILE = "encoder.safetensors"
FORMAT = "weakstil-encoder"
FORMAT_VERSION = 1
ENCODERS_DIR = Path("models") / "encoders"  # relative to the working directory
_REQUIRED = ("name", "arch", "embed_dim", "input_px", "mean", "std", "weights_sha256")


class CorruptWeightsError(CheckpointReadError):
    fix = ("the weights file changed after it was written (a damaged or partial copy?): copy the whole "
           "encoder folder again, or pretrain again")


@dataclass(frozen=True)
class EncoderFolder:
    """A resolved encoder folder: its spec, its weights file, the sha256 the weights must have."""

    path: Path
    spec: object  # EncoderSpec
    weights_path: Path
    weights_sha256: str
    doc: dict


def folder_encoder_name(path: str | Path) -> str:
    """The encoder name a folder gets: its base name, lower-case, in the registry's alphabet."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(path).absolute().name.lower()).strip("-._")
    return name or "encoder"


def is_encoder_folder(path: str | Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or name.startswith(".") or Path(name).expanduser().is_dir()


def find_encoder_folder(name: str, weights: str | None = None) -> Path | None:
    """The encoder folder ``name`` means (see the module docstring), or None when it means none."""
    path = Path(name).expanduser()
    if _looks_like_path(name):
        if is_encoder_folder(path):
            return path.absolute()
        if path.is_file() and path.name == SPEC_FILE:
            return path.parent.absolute()
        from weakstil.errors import UnknownEncoderError

        what = "has no encoder.json" if path.is_dir() else "does not exist"
        raise UnknownEncoderError(f"--encoder {name}: the folder {what}", path=path,
                                  fix="give a folder written by `weakstil pretrain`, or a name from `weakstil encoders`")
    if is_encoder_folder(ENCODERS_DIR / name):
        return (ENCODERS_DIR / name).absolute()
    if weights and weights.startswith("file:"):
        parent = Path(weights[len("file:"):]).expanduser().parent
        if is_encoder_folder(parent) and _read_doc(parent).get("name") == name:
            return parent.absolute()
    return None


def list_encoder_folders(root: str | Path = ENCODERS_DIR) -> list[EncoderFolder]:
    """Encoder folders directly under ``root`` (damaged ones are skipped with a warning)."""
    root = Path(root)
    found = []
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        if is_encoder_folder(sub):
            try:
                found.append(read_encoder_folder(sub))
            except WeakstilError as exc:
                log.warning("skipping encoder folder %s: %s", sub, exc)
    return found


def _read_doc(path: Path) -> dict:
    spec_file = Path(path) / SPEC_FILE
    try:
        doc = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderFolderError(f"cannot read {SPEC_FILE}: {exc}", path=spec_file) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EncoderFolderError(f"{SPEC_FILE} is not a weakstil encoder spec (format {FORMAT!r})", path=spec_file)
    return doc


def read_encoder_folder(path: str | Path, weights: str | None = None) -> EncoderFolder:
    """Read ``encoder.json`` into an :class:`EncoderFolder` (weights not loaded yet).

    ``weights`` (``file:PATH``) reads the weights from elsewhere; they must still hash to the spec's sha256.
    """
    from weakstil.embed.encoders import EncoderSpec, parse_weight_source

    path = Path(path).absolute()
    doc = _read_doc(path)
    missing = [k for k in _REQUIRED if k not in doc]
    if missing or int(doc.get("format_version", 0)) > FORMAT_VERSION:
        problem = f"missing {', '.join(missing)}" if missing else f"format_version {doc.get('format_version')} is newer"
        raise EncoderFolderError(f"{SPEC_FILE}: {problem}", path=path / SPEC_FILE,
                                 fix="update weakstil, or pretrain this encoder again")
    weights_path = path / str(doc.get("weights_file", WEIGHTS_FILE))
    if weights:
        source = parse_weight_source(weights)
        if source.kind != "file":
            raise EncoderFolderError(f"a folder encoder reads its weights from a file, not {source}",
                                     fix=f"drop --weights, or give --weights file:{weights_path}")
        weights_path = Path(source.value)
    try:
        spec = EncoderSpec(
            name=str(doc["name"]), arch=str(doc["arch"]), embed_dim=int(doc["embed_dim"]),
            input_px=int(doc["input_px"]), mean=tuple(doc["mean"]), std=tuple(doc["std"]),
            interpolation=str(doc.get("interpolation", "bilinear")), weights=f"file:{weights_path}",
            licence=str(doc.get("licence", "yours: trained on your own slides")), pretrained=True,
            description=describe_training(doc.get("trained") or {}),
            model_kwargs=tuple(sorted((doc.get("model_kwargs") or {}).items())))
    except (TypeError, ValueError) as exc:
        raise EncoderFolderError(f"{SPEC_FILE}: {exc}", path=path / SPEC_FILE) from exc
    return EncoderFolder(path, spec, weights_path, str(doc["weights_sha256"]), doc)


def describe_training(trained: dict) -> str:
    """One line: how a folder encoder was trained (for `weakstil encoders`)."""
    if not trained:
        return "encoder folder"
    slides = trained.get("slides") or []
    return (f"{trained.get('method', '?')} on {len(slides)} slides, {trained.get('steps', '?')} steps"
            f" × {trained.get('batch_size', '?')} tiles ({str(trained.get('date', ''))[:10]})")


def load_folder_weights(folder: EncoderFolder) -> dict:
    """The weights as ``{key: tensor}``, after checking the file's sha256 against encoder.json."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from weakstil.fingerprint import file_sha256

    path = folder.weights_path
    if not path.is_file():
        raise WeightsNotFoundError(f"the encoder's weights file is missing ({path.name})", path=path,
                                   fix=f"copy the whole folder {folder.path}, including {path.name}")
    digest = file_sha256(path)
    if digest != folder.weights_sha256:
        raise CorruptWeightsError(f"sha256 {digest[:12]}… does not match encoder.json's "
                                  f"{folder.weights_sha256[:12]}…", path=path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptWeightsError(f"cannot read the safetensors file: {exc}", path=path) from exc


def create_folder_encoder(folder: EncoderFolder, *, seed: int = 0):
    """Build the timm model of the folder's spec, load its checked weights → a frozen ``Encoder``."""
    from weakstil.embed.encoders import _build_model, _encoder_class
    from weakstil.embed.weights import load_backbone_state

    model = _build_model(folder.spec, seed)
    load_backbone_state(model, load_folder_weights(folder), spec=folder.spec, path=folder.weights_path)
    return _encoder_class()(model, folder.spec, weights=folder.spec.weights,
                            weights_sha256=folder.weights_sha256, seed=seed)
