"""Input checks that run before any work starts, so a mistake is reported in about a second — before
progress bars, before an output folder is created, before torch is imported.

Each check raises the same typed error the library would raise later (with its ``fix``); the
commands call them first, then the library, which checks again where it reads the files.
"""

from __future__ import annotations

from pathlib import Path

from weakstil.errors import ConfigError, ModelExistsError, ModelNotFoundError

SCORE_FORMATS = ("csv", "png", "tif", "geojson", "top")


def formats(text: str, allowed: tuple[str, ...], option: str = "--outputs") -> tuple[str, ...]:
    """``"png,tif"`` → ("png", "tif"); unknown names are a ConfigError listing the valid ones."""
    chosen = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in chosen if f not in allowed]
    if unknown or not chosen:
        raise ConfigError(f"{option} {text!r}: unknown {', '.join(unknown) or '(empty)'}",
                          fix=f"choose from {','.join(allowed)}, comma-separated")
    return chosen


def existing_dir(path: Path | None, option: str, fix: str) -> None:
    """A folder the command reads must exist (None: the option was not given)."""
    if path is not None and not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).is_file() else "does not exist"
        raise ConfigError(f"{option}: the folder {what}", path=path, fix=fix)


def writable_dir(path: Path, option: str) -> None:
    """An output folder may exist or not, but must not be a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{option} {path} is a file, not a folder", fix=f"give {option} a folder path")


def model_dir(path: Path) -> None:
    """A model folder written by `weakstil train` (its model.ckpt), or the checkpoint itself."""
    path = Path(path)
    if not (path.is_file() or (path / "model.ckpt").is_file()):
        what = "; the folder does not exist" if not path.exists() else ""
        raise ModelNotFoundError(f"no model here (model.ckpt is missing{what})", path=path,
                                 fix="train one with `weakstil train LABELS --name NAME`, or give "
                                     "--model models/NAME (a folder holding model.ckpt)")


def new_model_dirs(models: Path, names: list[str], overwrite: bool) -> None:
    """Refuse, before training, to replace existing models unless --overwrite."""
    taken = [Path(models) / n for n in names if (Path(models) / n).exists()]
    if taken and not overwrite:
        raise ModelExistsError(f"a model already exists here: {', '.join(str(p) for p in taken)}",
                               path=taken[0], fix="pick another --name, or pass --overwrite to replace it")
    writable_dir(models, "--models")


def labels_file(path: Path) -> None:
    """The labels CSV reads and validates (header, every row) — the same check `train` makes."""
    from weakstil.mil.labels import read_labels

    read_labels(path)


def encoder(name: str, weights: str | None) -> None:
    """A known encoder name and a well-formed weight source whose file exists."""
    from weakstil.embed.encoders import get_encoder_spec

    get_encoder_spec(name)
    weights_source(weights)


def weights_source(weights: str | None) -> None:
    """A well-formed --weights (file:, hf-hub:, random-init) whose file, if any, exists."""
    from weakstil.embed.encoders import parse_weight_source
    from weakstil.errors import WeightsNotFoundError

    if weights:
        source = parse_weight_source(weights)
        if source.kind == "file" and not Path(source.value).is_file():
            raise WeightsNotFoundError("weights file not found", path=Path(source.value),
                                       fix="check the path after file: (absolute, or relative to here)")


def next_step(text: str, *alternatives: str) -> str:
    """The 'what to run next' line of a summary; each alternative on a line of its own (so that no
    line of a log grows past its paths)."""
    return "\n".join([f"next: {text}", *(f"  or: {a}" for a in alternatives)])
