"""Configuration files: code defaults < config file < command-line flags the user actually set.

A config file is YAML. Top-level keys set an option for every command that has it; a section named
after a command (``extract:``, ``train:`` …) sets options for that command only and wins over the
top level. Keys are option names with ``-`` or ``_`` (``batch-size`` or ``batch_size``).

```yaml
device: cpu
extract:
  batch_size: 64
  encoder: resnet18-random
train:
  aggregation: attention
```
The resolved configuration of a run is saved next to its outputs (``save_resolved``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weakstil.errors import ConfigError

COMMANDS = ("demo", "synth", "check", "extract", "train", "score", "encoders", "view")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (typed errors for a missing file or bad YAML)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", path=path,
                          fix="give an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping of option names to values", path=path)
    return data


def _norm(key: str) -> str:
    return str(key).replace("-", "_")


def defaults_for(data: dict[str, Any], command: str, known: set[str], *, path: str | Path | None = None) -> dict:
    """The option defaults a config file gives one command.

    Top-level keys apply to every command that has that option (others ignore them); keys in the
    command's own section win and must be options of that command (a typo there is an error).
    """
    flat = {_norm(k): v for k, v in data.items() if _norm(k) not in COMMANDS}
    section = data.get(command) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"section {command!r} must be a mapping", path=path)
    section = {_norm(k): v for k, v in section.items()}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for `weakstil {command}`: {', '.join(unknown)}", path=path,
                          fix=f"see `weakstil {command} --help` for the option names")
    merged = {k: v for k, v in flat.items() if k in known}
    merged.update(section)
    return merged


def save_resolved(config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved configuration as YAML, atomically."""
    import yaml

    from weakstil.fs import plain_json, write_text

    return write_text(path, yaml.safe_dump(plain_json(config), sort_keys=False))
