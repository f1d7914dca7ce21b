"""Tile encoders: a registry of names, a dataclass of facts, explicit weight sources.

An :class:`EncoderSpec` says what an encoder is (timm architecture, embedding size, input size,
mean/std, licence, where its weights come from); preprocessing is derived from it
(:func:`make_preprocess`). :func:`create_encoder` builds the timm backbone, loads the weights the
user named and returns a frozen :class:`Encoder` whose :meth:`Encoder.fingerprint` goes into the
feature cache.

Weight sources are explicit — ``file:/path/ckpt.pth``, ``hf-hub:org/name`` (downloads, and only
when asked) or a built-in's own source (``random-init``); a bare path is refused. Nothing here
imports torch or timm at module import, and nothing downloads at import.

The built-ins are ResNets built in plain torch by :mod:`weakstil.embed.resnet` (timm's modules,
keys and initialisation, without importing timm); ``timm:<name>`` models are built by timm.

Checkpoint layouts of the built-ins (each mapped onto timm's ResNet, whose keys equal torchvision's):

* ``retccl`` — ``best_ckpt.pth``: a plain state dict of the authors' torchvision-style ResNet-50
  (``conv1.weight``, ``layer1.0.bn1.running_mean`` …). Their ``get_feature.py`` sets
  ``model.fc = nn.Identity()`` and loads it with ``strict=True``, so the file has no ``fc`` keys;
  a ``module.`` prefix (DataParallel) and ``fc``/``instDis``/``groupDis`` heads are tolerated.
* ``ciga-simclr`` — ``tenpercent_resnet18.ckpt``: a PyTorch Lightning checkpoint whose
  ``state_dict`` keys read ``model.resnet.<torchvision key>`` plus a SimCLR projection head
  ``model.resnet.fc.1.*`` (512→512) and ``fc.3.*`` (512→128), which is dropped.
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from weakstil.embed.weights import (
    _strip_module_prefix,
    ciga_keys,
    load_backbone_state,
    read_checkpoint,
    retccl_keys,
    state_dict_sha256,
)
from weakstil.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    UnknownEncoderError,
    WeightsDownloadError,
    WeightsNotFoundError,
    WeightSourceError,
)
from weakstil.fingerprint import file_sha256

if TYPE_CHECKING:
    import torch
    from rich.table import Table

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
TIMM_PREFIX = "timm:"
MORPH = "stainmorph"  # the fixed stain-morphometry encoder (weakstil.embed.morph)
MORPH_SUFFIX = "+" + MORPH  # any encoder + stainmorph: both feature sets side by side
MORPH_ARCH = "stainmorph.v12"  # bump when its features change (the arch is in the cache fingerprint)
# versions whose last MEASURED_DIM columns are the measured block (v5: pale nuclei opened; v6: stroma
# is solid tissue, fat's septa left out; v7: the block under the wide nest rule too, just before it;
# v8: nests read on the tissue that is not lymphocyte, so crowded nests stay nests; v9: big nuclei
# mark the wide rule's nests whatever their darkness; v10: a lymphocyte counts with its whole nucleus;
# v11: the wide rule's room is read on blurred H, so specks of tumour chromatin make none; v12: the wide
# rule counts its nest nuclei over at least half the neighbourhood, so lymphocyte sheets are no nests)
MEASURED_ARCHS = ("stainmorph.v4", "stainmorph.v5", "stainmorph.v6", "stainmorph.v7", "stainmorph.v8",
                  "stainmorph.v9", "stainmorph.v10", "stainmorph.v11", MORPH_ARCH)
# versions with the wide nest rule's block right before the last one
WIDE_ARCHS = ("stainmorph.v7", "stainmorph.v8", "stainmorph.v9", "stainmorph.v10", "stainmorph.v11",
              MORPH_ARCH)
MORPH_DIM = 34  # weakstil.embed.morph.N_FEATURES (that module imports torch)
# its last five (mil.select): lymph_per_stroma_sized, lymph_per_stroma (strict, loose), lymph_per_nest,
# stroma_est; the last four read lymphocytes by darkness alone (the column set "measured-dark"); the
# five before them are the same under the wide nest rule ("measured-wide", "measured-dark-wide")
MEASURED_DIM = 5
DARK_MEASURED_DIM = 4
STROMA_COLUMN = -1  # morph's last feature, stroma_est: read by position in any +stainmorph features
# what `weakstil extract` and the demo use unless told otherwise (docs/accuracy.md says why)
DEFAULT_ENCODER = "resnet18-random" + MORPH_SUFFIX


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

KeyMapper = Callable[[dict], dict]  # unwrapped checkpoint state dict -> timm-layout state dict


# morphometry versions whose last feature is ``stroma_est``
STROMA_ARCHS = ("stainmorph.v2", "stainmorph.v3", *MEASURED_ARCHS)


def has_stroma_estimate(encoder_fp: dict | None) -> bool:
    """Whether features of this encoder end with the morphometry's ``stroma_est`` (:data:`STROMA_ARCHS`;
    caches and models of the older version keep theirs)."""
    return str((encoder_fp or {}).get("arch", "")).endswith(STROMA_ARCHS)


def has_measured_columns(encoder_fp: dict | None, dim: int | None = None) -> bool:
    """Whether features of this encoder end with this layout of the morphometry (:data:`MEASURED_ARCHS`, whose
    last :data:`MEASURED_DIM` columns measure sTIL%) beside a network's own (``dim`` > :data:`MORPH_DIM`
    when given: with the morphometry alone, all columns already are the morphometry)."""
    arch = str((encoder_fp or {}).get("arch", ""))
    return arch.endswith(MEASURED_ARCHS) and "+" in arch and (dim is None or dim > MORPH_DIM)


def has_wide_columns(encoder_fp: dict | None, dim: int | None = None) -> bool:
    """Whether the measured block under the wide nest rule (:data:`WIDE_ARCHS`) sits right before the
    last one, beside a network's own columns (as :func:`has_measured_columns`)."""
    arch = str((encoder_fp or {}).get("arch", ""))
    return has_measured_columns(encoder_fp, dim) and arch.endswith(WIDE_ARCHS)


def stroma_estimate(features, encoder_fp: dict | None):
    """Each tile's estimated stroma fraction (N,) in 0-1, as tiles.csv and top_tiles.png show it —
    the stain morphometry's ``stroma_est`` (its last feature) when the features come from an encoder
    of :data:`STROMA_ARCHS`, and under the wide nest rule (``stroma_est_wide``, :data:`WIDE_ARCHS`)
    where the features have it; else None (no estimate: nothing is filtered on it).

    The wide rule's nests hold the pale rule's, so its estimate is never the larger; tile by tile it
    follows the true stroma fraction better on five of six synthetic cohorts (Pearson r, 40 slides
    each, pale → wide: regions-standard 0.51 → 0.91, cells-standard 0.96 → 0.97, lattice-hard 0.84 →
    0.87, lattice-standard 0.99 → 1.00, dark nuclei 0.68 → 0.70; cells-hard 0.87 → 0.84, where
    blurred lymphocyte crowds become nests; docs/accuracy.md, twenty-second run). A tile shown as
    stroma is then stroma by both rules. The MIL's stroma prior reads the last column of what each
    model reads (its own rule's estimate)."""
    import numpy as np

    if not has_stroma_estimate(encoder_fp):
        return None
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] == 0:
        return None
    wide = str((encoder_fp or {}).get("arch", "")).endswith(WIDE_ARCHS) and features.shape[1] > MEASURED_DIM
    return np.clip(features[:, STROMA_COLUMN - (MEASURED_DIM if wide else 0)].astype(np.float64), 0.0, 1.0)


@dataclass(frozen=True)
class EncoderSpec:
    """The facts about one encoder; preprocessing and the cache fingerprint derive from them."""

    name: str
    arch: str  # timm model name
    embed_dim: int
    input_px: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    weights: str = ""  # default weight source: "random-init", or "" when the user must give one
    licence: str = "unknown"
    pretrained: bool = True
    description: str = ""
    weights_hint: str = ""  # where to get the weights, shown in errors and `weakstil encoders`
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model keywords

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"encoder {self.name!r}: mean and std need 3 values, std > 0")
        if self.embed_dim <= 0 or self.input_px <= 0:
            raise ValueError(f"encoder {self.name!r}: embed_dim and input_px must be positive")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"encoder {self.name!r}: interpolation must be one of {INTERPOLATIONS}")

    @property
    def slug(self) -> str:
        """The name made safe for file and folder names (``timm:vit_small`` → ``timm-vit_small``)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name)

    def preprocess_params(self) -> dict:
        """What preprocessing needs: input size, interpolation, mean and std (on 0-1 pixel values)."""
        return {"input_px": self.input_px, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class _Entry:
    spec: EncoderSpec
    key_mapper: KeyMapper | None


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(spec: EncoderSpec, *, key_mapper: KeyMapper | None = None, replace: bool = False) -> None:
    """Register ``spec`` under ``spec.name``.

    ``key_mapper`` turns the checkpoint's state dict (already taken out of a ``state_dict``/``model``
    wrapper) into timm's key layout for ``spec.arch``; classifier-head keys may be left in, they are
    dropped. Without one, a ``module.`` prefix on every key is removed and nothing else changes.
    """
    if spec.name.startswith(TIMM_PREFIX) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", spec.name):
        raise ValueError(f"invalid encoder name {spec.name!r}: use lower-case letters, digits, '.', '_', '-'")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"encoder {spec.name!r} is already registered (pass replace=True)")
    _REGISTRY[spec.name] = _Entry(spec, key_mapper)


def list_encoders() -> list[EncoderSpec]:
    """The registered encoders, in registration order (``timm:<name>`` works on top of these)."""
    return [entry.spec for entry in _REGISTRY.values()]


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered as ``name``, or that of timm model ``name`` given as ``timm:<name>``,
    or that of an encoder folder (``weakstil pretrain``'s output, :mod:`weakstil.embed.encoder_folders`);
    ``<any of these>+stainmorph`` adds the stain-morphometry features (:func:`with_morph`)."""
    if name.endswith(MORPH_SUFFIX):
        return with_morph(get_encoder_spec(name[: -len(MORPH_SUFFIX)]))
    folder = _encoder_folder(name)
    if folder is not None:
        from weakstil.embed.encoder_folders import read_encoder_folder

        return read_encoder_folder(folder).spec
    return _lookup(name).spec


def with_morph(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with the :data:`MORPH_DIM` stain-morphometry features after its own: the network
    keeps its input size and normalisation (applied inside), the pair takes 0–1 RGB."""
    if spec.name == MORPH or spec.name.endswith(MORPH_SUFFIX):
        raise UnknownEncoderError(f"{spec.name} already has the stain-morphometry features",
                                  fix=f"use --encoder {spec.name} (one {MORPH_SUFFIX} is enough)")
    return EncoderSpec(
        name=spec.name + MORPH_SUFFIX, arch=f"{spec.arch}+{MORPH_ARCH}", embed_dim=spec.embed_dim + MORPH_DIM,
        input_px=spec.input_px, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation=spec.interpolation,
        weights=spec.weights, licence=spec.licence, pretrained=spec.pretrained,
        description=f"{spec.name} and stainmorph side by side", weights_hint=spec.weights_hint,
        model_kwargs=spec.model_kwargs)


def _encoder_folder(name: str, weights: str | None = None) -> Path | None:
    """The encoder folder ``name`` means, if it is not a registered or timm: name."""
    if name in _REGISTRY or name.startswith(TIMM_PREFIX):
        return None
    from weakstil.embed.encoder_folders import find_encoder_folder

    return find_encoder_folder(name, weights)


def _lookup(name: str) -> _Entry:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        return _Entry(_timm_spec(name[len(TIMM_PREFIX):]), None)
    import difflib

    close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"for timm's {name} write timm:{name}"
    from weakstil.embed.encoder_folders import ENCODERS_DIR, list_encoder_folders

    folders = [f.spec.name for f in list_encoder_folders()]
    raise UnknownEncoderError(
        f"unknown encoder {name!r} ({hint}); registered: {', '.join(_REGISTRY)}; "
        + (f"folders in {ENCODERS_DIR}: {', '.join(folders)}; " if folders else "")
        + "or any timm model as timm:<name>, or a folder written by `weakstil pretrain`")


@functools.lru_cache(maxsize=32)
def _timm_spec(arch: str) -> EncoderSpec:
    import timm

    if not arch or not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=5)
        raise UnknownEncoderError(
            f"timm has no model {arch!r}" + (f"; close: {', '.join(close)}" if close else ""),
            fix="list timm's models with python -c \"import timm; print(timm.list_models('*vit*'))\"")
    return _spec_from_model(f"{TIMM_PREFIX}{arch}", arch, _meta_model(arch))


def _meta_model(arch: str):
    """Build ``arch`` without allocating or initialising weights, to read its facts."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=0)
    except (RuntimeError, NotImplementedError, TypeError):  # a model whose init needs real tensors
        return timm.create_model(arch, pretrained=False, num_classes=0)


def _spec_from_model(name: str, arch: str, model, weights: str = "") -> EncoderSpec:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    interpolation = cfg.get("interpolation") or "bicubic"
    return EncoderSpec(
        name=name, arch=arch, embed_dim=int(model.num_features),
        input_px=int(cfg.get("input_size", (3, 224, 224))[-1]),
        mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        weights=weights, licence=str(cfg.get("license") or "see the weights' model card"),
        pretrained=True, description=f"timm {arch}; weights from file: or hf-hub: (only when asked)",
        weights_hint="give --weights file:/path/ckpt (timm key layout) or hf-hub:org/name")


# --- weight sources ---------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSource:
    """Where weights come from: ``kind`` is 'random-init', 'file' (value: path) or 'hf-hub' (value: org/name)."""

    kind: str
    value: str = ""

    def __str__(self) -> str:
        return RANDOM_INIT if self.kind == RANDOM_INIT else f"{self.kind}:{self.value}"


_CKPT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".tar", ".pkl", ".pickle")


def parse_weight_source(text: str) -> WeightSource:
    """Parse ``file:PATH``, ``hf-hub:ORG/NAME`` or ``random-init``; anything else is refused."""
    text = str(text).strip()
    if text == RANDOM_INIT:
        return WeightSource(RANDOM_INIT)
    scheme, sep, rest = text.partition(":")
    if sep and scheme == "file":
        rest = rest[2:] if rest.startswith("//") else rest  # file:///abs/path
        if not rest:
            raise WeightSourceError("file: needs a path", fix="write --weights file:/path/to/checkpoint.pth")
        return WeightSource("file", str(Path(rest).expanduser().absolute()))
    if sep and scheme in ("hf-hub", "hf_hub"):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", rest):
            raise WeightSourceError(f"{text!r} is not hf-hub:org/name",
                                    fix="write e.g. --weights hf-hub:timm/resnet50.a1_in1k")
        return WeightSource("hf-hub", rest)
    if scheme.lower() in ("http", "https"):
        raise WeightSourceError(f"weakstil does not download from URLs ({text})",
                                fix="download the file by hand, then give --weights file:/path/to/it")
    if "/" in text or "\\" in text or text.lower().endswith(_CKPT_SUFFIXES) or Path(text).expanduser().exists():
        raise WeightSourceError(f"{text!r} looks like a path, but weight sources must say what they are",
                                fix=f"write --weights file:{text}")
    raise WeightSourceError(f"unknown weight source {text!r}")


def _resolve_source(entry: _Entry, weights: str | None) -> WeightSource:
    spec = entry.spec
    text = weights or spec.weights
    if not text:
        raise WeightSourceError(f"encoder {spec.name!r} needs weights and none were given",
                                fix=spec.weights_hint or "give --weights file:/path/to/checkpoint")
    source = parse_weight_source(text)
    if spec.weights == RANDOM_INIT and source.kind != RANDOM_INIT:
        raise WeightSourceError(
            f"{spec.name} is a random-init encoder and takes no weights",
            fix=f"to load a {spec.arch} checkpoint use --encoder timm:{spec.arch} --weights {source}")
    if source.kind == RANDOM_INIT and spec.weights != RANDOM_INIT:
        raise WeightSourceError(f"{spec.name} has no random-init variant",
                                fix="use --encoder resnet18-random for a random encoder")
    if source.kind == "hf-hub" and not spec.name.startswith(TIMM_PREFIX):
        raise WeightSourceError(f"{spec.name} loads its weights from a file, not from the hub",
                                fix=spec.weights_hint or "give --weights file:/path/to/checkpoint")
    return source


# --- creating encoders ------------------------------------------------------------------------
def create_encoder(name: str, weights: str | None = None, *, seed: int = 0):
    """Build encoder ``name`` with ``weights`` (default: the spec's own source) → :class:`Encoder`.

    The result is in eval mode with gradients off and channels_last memory; it maps a normalised
    float batch (B, 3, H, W) to (B, embed_dim). ``seed`` fixes a random initialisation; the global
    RNG state is left as it was.
    """
    if name.endswith(MORPH_SUFFIX):  # the named encoder, and stain morphometry beside it
        from weakstil.embed.morph import Concat

        base = create_encoder(name[: -len(MORPH_SUFFIX)], weights, seed=seed)
        return _encoder_class()(Concat(base.backbone, base.spec.mean, base.spec.std), with_morph(base.spec),
                                weights=base.weights, weights_sha256=base.weights_sha256, seed=seed)
    folder = _encoder_folder(name, weights)
    if folder is not None:  # a `weakstil pretrain` output: encoder.json + safetensors weights
        from weakstil.embed.encoder_folders import create_folder_encoder, read_encoder_folder

        return create_folder_encoder(read_encoder_folder(folder, weights), seed=seed)
    entry = _lookup(name)
    spec = entry.spec
    source = _resolve_source(entry, weights)
    if source.kind == "hf-hub":
        model = _hub_model(spec, source)
        spec = _spec_from_model(spec.name, spec.arch, model, weights=str(source))
        digest = state_dict_sha256(model.state_dict())
    else:
        model = _build_model(spec, seed)
        if source.kind == RANDOM_INIT:
            digest = state_dict_sha256(model.state_dict())
        else:
            path = _checkpoint_file(source)
            digest = file_sha256(path)
            state = read_checkpoint(path)
            mapper = entry.key_mapper or _strip_module_prefix
            load_backbone_state(model, mapper(state), spec=spec, path=path)
    return _encoder_class()(model, spec, weights=str(source), weights_sha256=digest, seed=seed)


def _build_model(spec: EncoderSpec, seed: int):
    """The backbone of ``spec``, randomly initialised with ``seed``: the plain-torch ResNets of
    :mod:`weakstil.embed.resnet` for the ResNets timm would build identically (no timm import),
    timm for everything else."""
    import torch

    from weakstil.embed import resnet

    if spec.arch == MORPH_ARCH:  # stain morphometry: no weights, nothing random
        from weakstil.embed.morph import StainMorph

        return StainMorph()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if resnet.builds(spec.arch, dict(spec.model_kwargs)):
            return resnet.create_resnet(spec.arch, **dict(spec.model_kwargs))
        import timm

        return timm.create_model(spec.arch, pretrained=False, num_classes=0, **dict(spec.model_kwargs))


def _hub_model(spec: EncoderSpec, source: WeightSource):
    """Download and build ``hf-hub:org/name`` through timm (network; only on request)."""
    import timm

    try:
        model = timm.create_model(f"hf-hub:{source.value}", pretrained=True, num_classes=0)
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsDownloadError(f"could not get {source}: {exc}") from exc
    built = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if built and built.split(".")[0] != spec.arch.split(".")[0]:
        raise CheckpointMismatchError(f"{source} is a {built}, not a {spec.arch}",
                                      fix=f"use --encoder timm:{built}")
    return model


def _checkpoint_file(source: WeightSource) -> Path:
    path = Path(source.value)
    if not path.exists():
        raise WeightsNotFoundError("weights file not found", path=path)
    if not path.is_file():
        raise WeightsNotFoundError("weights path is not a file", path=path)
    if path.stat().st_size == 0:
        raise CheckpointReadError("the weights file is empty", path=path)
    return path


# --- the encoder module and preprocessing -----------------------------------------------------
@functools.cache
def _encoder_class() -> type:
    import torch

    class Encoder(torch.nn.Module):
        """A frozen tile encoder: (B, 3, H, W) normalised float → (B, embed_dim) float."""

        def __init__(self, backbone, spec: EncoderSpec, *, weights: str, weights_sha256: str, seed: int):
            super().__init__()
            self.backbone = backbone
            self.spec = spec
            self.weights = weights
            self.weights_sha256 = weights_sha256
            self.seed = seed
            self._preprocess = {}
            self.requires_grad_(False)
            self.eval()
            self.to(memory_format=torch.channels_last)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.backbone(x)

        def preprocess(self, tiles) -> torch.Tensor:
            """uint8 tiles (B, H, W, 3) or (B, 3, H, W) → normalised float on this encoder's device."""
            device = next(itertools.chain(self.parameters(), self.buffers())).device  # stainmorph: buffers only
            if device not in self._preprocess:
                self._preprocess[device] = make_preprocess(self.spec, device=device)
            return self._preprocess[device](tiles)

        def fingerprint(self) -> dict:
            """What makes two feature sets comparable (JSON-ready: lists, not tuples)."""
            s = self.spec
            return {"name": s.name, "arch": s.arch, "weights": self.weights,
                    "weights_sha256": self.weights_sha256, "embed_dim": s.embed_dim,
                    "input_px": s.input_px, "mean": list(s.mean), "std": list(s.std),
                    "interpolation": s.interpolation}

        def __getstate__(self):  # the preprocess closures are rebuilt on demand, not pickled
            return {**self.__dict__, "_preprocess": {}}

        def extra_repr(self) -> str:
            return f"name={self.spec.name!r}, weights={self.weights!r}, embed_dim={self.spec.embed_dim}"

    Encoder.__module__, Encoder.__qualname__ = __name__, "Encoder"  # picklable as weakstil.embed.encoders.Encoder
    return Encoder


def __getattr__(name: str):
    if name == "Encoder":  # built on first use so that importing this module does not import torch
        return _encoder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_preprocess(spec: EncoderSpec, *, device=None, dtype=None) -> Callable:
    """A function: uint8 tiles (B, H, W, 3) or (B, 3, H, W) (tensor or array) → (B, 3, px, px) float.

    Works on whole batches: uint8 goes to ``device`` first (4× less to copy), channels_last
    throughout (an NHWC batch becomes NCHW channels_last without a copy), resizing only when the
    tile size is not ``spec.input_px`` (antialiased), then one fused multiply-add for /255, mean and
    std. ``dtype`` (e.g. torch.float16 on a GPU) casts the result.
    """
    import torch
    import torch.nn.functional as F

    px, mode = spec.input_px, spec.interpolation
    scale = torch.tensor([1.0 / (255.0 * s) for s in spec.std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std)]).view(1, 3, 1, 1)
    if device is not None:
        scale, shift = scale.to(device), shift.to(device)

    def preprocess(tiles) -> torch.Tensor:
        x = torch.as_tensor(tiles)
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 tiles, got {x.dtype}")
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"expected tiles shaped (B, H, W, 3) or (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)  # NHWC → NCHW view with channels_last strides
        if device is not None:
            x = x.to(device, non_blocking=True)
        x = x.to(dtype=torch.float32, memory_format=torch.channels_last)
        if x.shape[-2:] != (px, px):
            smooth = mode in ("bilinear", "bicubic")
            x = F.interpolate(x, size=(px, px), mode=mode, antialias=smooth,
                              align_corners=False if smooth else None)
            if mode == "bicubic":
                x = x.clamp_(0.0, 255.0)
        x = x.mul_(scale.to(x.device)).add_(shift.to(x.device))
        x = x.contiguous(memory_format=torch.channels_last)
        return x if dtype is None else x.to(dtype)

    return preprocess


# --- listing ----------------------------------------------------------------------------------
def encoders_table(specs: list[EncoderSpec]) -> Table:
    """A rich table for `weakstil encoders`: name, embedding size, input size, weights, licence, pretrained.

    Where to get each encoder's weights goes in the caption, so the columns stay narrow.
    """
    from rich.table import Table

    notes = [f"{s.name}: {s.weights_hint}" for s in specs if s.weights_hint and not s.weights]
    notes.append("any timm model: --encoder timm:<name> --weights file:PATH or hf-hub:ORG/NAME")
    notes.append(f"any of them +{MORPH}: the {MORPH_DIM} stain-morphometry features beside its own "
                 f"(default: {DEFAULT_ENCODER})")
    table = Table(title="Registered encoders", caption="\n".join(notes), caption_justify="left")
    for column in ("name", "dim", "input px", "weights", "licence", "pretrained"):
        table.add_column(column, no_wrap=column in ("name", "dim", "input px"))
    for s in specs:
        if s.arch == MORPH_ARCH:  # fixed measurements: neither weights nor randomness
            table.add_row(s.name, str(s.embed_dim), str(s.input_px), "none (fixed)", s.licence, "no (fixed)")
            continue
        random = "no (random)" if s.weights == RANDOM_INIT else "no"
        table.add_row(s.name, str(s.embed_dim), str(s.input_px), s.weights or "file: required",
                      s.licence, "yes" if s.pretrained else random)
    return table


# --- built-ins --------------------------------------------------------------------------------
register_encoder(EncoderSpec(
    name="resnet18-random", arch="resnet18", embed_dim=512, weights=RANDOM_INIT, pretrained=False,
    licence="n/a (no trained weights)",
    description="random init — for tests and the offline demo only",
    # timm zero-initialises the last BatchNorm of every residual block (a training-time trick); in a
    # frozen random network that switches every residual branch off (7-27 % of output dims always 0).
    model_kwargs=(("zero_init_last", False),),
))
register_encoder(EncoderSpec(
    name=MORPH, arch=MORPH_ARCH, embed_dim=MORPH_DIM, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), weights=RANDOM_INIT,
    pretrained=False, licence="n/a (no weights)",
    description="stain morphometry: tissue, H/E amounts, nuclei by size and where they sit (stroma or "
                "nests); fixed, no weights (weakstil.embed.morph)",
))
register_encoder(EncoderSpec(
    name="retccl", arch="resnet50", embed_dim=2048,
    licence="GPL-3.0; non-commercial academic use (authors' README)",
    description="RetCCL (Wang et al., Medical Image Analysis 2023): clustering-guided contrastive ResNet-50 "
                "on TCGA + PAIP; the authors suggest extracting at 1.0 µm/px",
    weights_hint="download best_ckpt.pth by hand from the link in github.com/Xiyue-Wang/RetCCL, "
                 "then --weights file:/path/best_ckpt.pth",
), key_mapper=retccl_keys)
register_encoder(EncoderSpec(
    name="ciga-simclr", arch="resnet18", embed_dim=512, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    licence="none stated (no LICENSE file; issue #14): research use, ask before redistributing",
    description="Ciga, Xu & Martel (Machine Learning with Applications 2022): SimCLR ResNet-18 on 57 "
                "histopathology datasets",
    weights_hint="download tenpercent_resnet18.ckpt from github.com/ozanciga/self-supervised-histopathology "
                 "(release 'tenpercent'), then --weights file:/path/tenpercent_resnet18.ckpt",
), key_mapper=ciga_keys)
