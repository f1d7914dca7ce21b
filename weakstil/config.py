"""Configuration files: code defaults < config file < command-line flags the user actually set.

A config file is YAML. Top-level keys set an option for every command that has it; a section named
after a command (``extract:``, ``train:`` …) sets options for that command only and wins over the
top level. Keys are option names with ``-`` or ``_`` (``batch-size`` or ``batch_size``).

```yaml
device: cpu
extract:
  batch_size: 64
  encoder: resnet18-random+stainmorph
train:
  aggregation: attention
```
The resolved configuration of a run is saved next to its outputs (``save_resolved``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weakstil.errors import ConfigError

COMMANDS = ("demo", "synth", "check", "extract", "train", "evaluate", "score", "heatmap", "encoders", "view",
            "pretrain")


def _safe_loader():
    """A SafeLoader that refuses YAML aliases (``*name``): a nested alias "bomb" never expands."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(
                    f"YAML aliases are not allowed (alias *{event.anchor} at line {event.start_mark.line + 1})",
                    fix="write each value out in full instead of using &anchor / *alias references")
            return super().compose_node(parent, index)

    return NoAliasLoader


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict (typed errors for a missing file, bad YAML or aliases)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", path=path,
                          fix="give an existing YAML file to --config")
    try:
        data = yaml.load(path.read_text(), Loader=_safe_loader()) or {}  # a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(exc.problem, path=path, fix=exc.fix) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping of option names to values", path=path)
    return data


def _norm(key: str) -> str:
    return str(key).replace("-", "_")


TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def _closest(key: str, valid) -> str:
    """`` (did you mean `name`?)`` for the closest valid option name, or ``""``."""
    import difflib

    match = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _unknown_error(unknown: list[str], valid, where: str, path) -> ConfigError:
    names = ", ".join(f"{k}{_closest(k, valid)}" for k in unknown)
    return ConfigError(f"unknown option(s) {where}: {names}", path=path,
                       fix="correct the spelling; `weakstil COMMAND --help` lists the option names")


def strict_bool(key: str, value: Any, *, path: str | Path | None = None) -> bool:
    """``value`` as a boolean: only true/false, yes/no, 1/0 (any case) are accepted."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"option {key!r} must be true or false, not {value!r}", path=path,
                      fix=f"write `{key}: true` or `{key}: false` (yes/no and 1/0 work too)")


def defaults_for(data: dict[str, Any], command: str, known: set[str], *, path: str | Path | None = None,
                 all_options: set[str] | None = None, commands=COMMANDS, booleans=()) -> dict:
    """The option defaults a config file gives one command.

    Top-level keys apply to every command that has that option (others ignore them) and must be an
    option of some command when ``all_options`` is given; keys in the command's own section win and
    must be options of that command. A typo is an error naming the closest valid option. Options
    in ``booleans`` accept only true/false, yes/no, 1/0.
    """
    flat = {_norm(k): v for k, v in data.items() if _norm(k) not in commands}
    if all_options is not None:
        unknown = sorted(set(flat) - set(all_options) - {"config"})
        if unknown:
            raise _unknown_error(unknown, all_options, "at the top level", path)
    section = data.get(command) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"section {command!r} must be a mapping", path=path)
    section = {_norm(k): v for k, v in section.items()}
    unknown = sorted(set(section) - known)
    if unknown:
        raise _unknown_error(unknown, known, f"for `weakstil {command}`", path)
    merged = {k: v for k, v in flat.items() if k in known}
    merged.update(section)
    return {k: strict_bool(k, v, path=path) if k in booleans else v for k, v in merged.items()}


def save_resolved(config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved configuration as YAML, atomically."""
    import yaml

    from weakstil.fs import plain_json, write_text

    return write_text(path, yaml.safe_dump(plain_json(config), sort_keys=False))
