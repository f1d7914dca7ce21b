"""Reading encoder weights from a file: safetensors or torch checkpoints (never unpickling foreign code),
state-dict unwrapping, key mapping for published checkpoints (RetCCL, Ciga SimCLR), and checks.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from weakstil.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
)

if TYPE_CHECKING:
    import torch

    from weakstil.embed.encoders import EncoderSpec


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (independent of memory layout)."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --- reading checkpoints ----------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    """The tensors of a checkpoint file as a flat ``{key: tensor}`` dict (on the CPU).

    Accepts safetensors, a plain state dict, or a dict holding one under ``state_dict``/``model``/
    ``model_state_dict``. Pickled files are read with ``torch.load(weights_only=True)``. Lightning
    checkpoints also pickle hyper-parameters and loop/callback state, which ``weights_only`` refuses;
    such files are re-read with an unpickler that resolves only the globals torch itself trusts for
    ``weights_only`` (tensor rebuilding, OrderedDict, dtypes …) and turns every other class or
    function into an inert placeholder — so no code from the file runs (``weights_only=False`` with
    the stock unpickler would run anything the file names).
    """
    import torch

    path = Path(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointReadError(f"cannot read safetensors file: {exc}", path=path) from exc
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_inert_pickle())
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, LookupError, TypeError,
            AttributeError) as exc:  # what a corrupt or foreign pickle can raise
        raise CheckpointReadError(f"cannot read checkpoint: {exc}", path=path) from exc
    return _unwrap_state_dict(obj, path)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _unwrap_state_dict(obj: Any, path: Path) -> dict:
    import torch

    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"the file holds a {type(obj).__name__}, not a state dict", path=path,
                                      fix="save the weights with torch.save(model.state_dict(), path)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"no tensors in the file; top-level keys: {_sample(list(obj))}", path=path)
    return tensors


class _Inert:
    """Stands in for a class or function a checkpoint names that is not trusted; records, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, item):
        self.__dict__.setdefault("_list", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_list", []).extend(items)

    def __call__(self, *args, **kwargs):  # a placeholder "function" returned by a placeholder call
        return type(self)(*args, **kwargs)


@functools.cache
def _inert_pickle() -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose unpickler only resolves torch's weights_only globals."""
    import _compat_pickle
    import collections

    import torch

    try:  # the same allowlist torch.load(weights_only=True) uses
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except (ImportError, AttributeError):
        allowed = {}
    for fn in (collections.OrderedDict, torch.Size, torch._utils._rebuild_tensor_v2,
               torch._utils._rebuild_parameter):
        allowed.setdefault(f"{fn.__module__}.{fn.__qualname__}", fn)

    @functools.cache
    def placeholder(full_name: str) -> type:
        return type(full_name, (_Inert,), {"__module__": "weakstil.embed.encoders.inert"})

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2: __builtin__ → builtins
            full_name = f"{module}.{name}"
            return allowed[full_name] if full_name in allowed else placeholder(full_name)

    module = types.ModuleType("weakstil_inert_pickle")
    module.Unpickler = Unpickler
    module.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return module


# --- key layouts ------------------------------------------------------------------------------
def _strip_module_prefix(state: dict) -> dict:
    """Default layout: timm keys, possibly all under ``module.`` (DataParallel / DDP)."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _strip_prefixes(state: dict, prefixes: tuple[str, ...], *, drop: tuple[str, ...] = ()) -> dict:
    """Remove the first matching prefix from each key, then drop keys starting with ``drop``."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if not key.startswith(drop):
            out[key] = value
    return out


def retccl_keys(state: dict) -> dict:
    """RetCCL ``best_ckpt.pth`` (torchvision-style ResNet-50 keys) → timm ``resnet50``."""
    return _strip_prefixes(state, ("module.",), drop=("fc.", "instDis.", "groupDis."))


def ciga_keys(state: dict) -> dict:
    """Ciga et al. Lightning ``state_dict`` (``model.resnet.<key>``; SimCLR head ``fc.1``/``fc.3``) → timm."""
    return _strip_prefixes(state, ("model.resnet.", "resnet.", "model."), drop=("fc.",))


def load_backbone_state(model, state: dict, *, spec: EncoderSpec, path: Path | None = None) -> None:
    """Copy ``state`` into ``model``; every backbone tensor must be there with its shape, nothing extra.

    Keys of the classifier head (timm's ``pretrained_cfg['classifier']``) are ignored, and so are
    missing BatchNorm ``num_batches_tracked`` counters (they do not affect inference).
    """
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads))}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"the checkpoint does not fit {spec.name} ({spec.arch}): {len(missing)} of {len(own)} "
                 f"backbone tensors missing, {len(unexpected)} unexpected, {len(wrong)} of the wrong shape"]
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape (file vs model)", wrong)):
            if keys:
                lines.append(f"  {label}: {_sample(keys)}")
        if len(missing) == len(own) or not (set(state) & set(own)):
            lines.append(f"  the file's keys look like: {_sample(list(state))}")
        fix = "check that --encoder names the architecture this checkpoint was trained with"
        raise CheckpointMismatchError("\n".join(lines), path=path,
                                      fix=fix + (f" ({spec.weights_hint})" if spec.weights_hint else ""))
    model.load_state_dict(state, strict=False)


def _sample(keys: list, n: int = 4) -> str:
    return ", ".join(map(str, keys[:n])) + (f", … (+{len(keys) - n})" if len(keys) > n else "")
