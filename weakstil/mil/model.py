"""The MIL regressor: a per-tile sTIL head and a pooling of tile predictions into the slide score.

One module covers both published variants:

* ``aggregation="mean"`` (WeakSTIL, Schirris et al. 2022): the slide score is the plain average of
  the tile predictions.
* ``aggregation="attention"`` (ECTIL): gated attention (Ilse et al. 2018) gives each tile a weight
  ``softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))`` and the slide score is the attention-weighted
  mean of the tile predictions. The weights can learn to ignore tiles without stroma.
* ``aggregation="weighted"``: the same gated network, but each tile's weight is a sigmoid in
  (0, 1) (how much of the tile counts, e.g. its stroma) and the score is the weighted mean of the
  tile predictions; weights cannot concentrate on a few tiles the way a softmax does.

Either way the tile prediction is a sigmoid fraction in [0, 1] (sTIL%/100), so the slide score is a
convex combination of tile scores and the heatmap shows the same quantity as the slide label.

Bags vary in size, so every forward takes an optional boolean ``mask`` (B, N) that marks real tiles
in a padded batch; padded tiles get zero weight. Training feeds several padded bags per optimiser
step (see :mod:`weakstil.mil.train`), evaluation the full bags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from weakstil import __version__
from weakstil.embed.encoders import STROMA_COLUMN
from weakstil.errors import (
    EmptyBagError,
    ModelCorruptError,
    ModelMismatchError,
    ModelNotFoundError,
)
from weakstil.fs import plain_json, write_bytes, write_text
from weakstil.mil import STROMA_FLOOR

AGGREGATIONS = ("mean", "attention", "weighted")
WEIGHTED = ("attention", "weighted")  # aggregations with a learned weight per tile
LEGACY_STROMA_FLOOR = 0.1  # the stroma prior's floor of models saved without "stroma_floor" in their config
HEADS = ("mlp", "linear", "probe")  # the tile head: on the hidden layer, linear on the normalised
# features, or linear on standardised features starting from the linear probe (see init_from_probe)


def stroma_log_weight(features: Tensor, floor: float = STROMA_FLOOR) -> Tensor:
    """log(s + ``floor``) per tile, ``s`` the estimated stroma fraction in the features' last column
    (the stain morphometry's ``stroma_est``): added to the pooling logits, each tile counts in
    proportion to its stroma, as sTIL% is defined (lymphocyte area over stroma area); the floor keeps
    a tile the estimate calls nest in the score a little (the estimate errs)."""
    return torch.log(features[..., STROMA_COLUMN].clamp(0.0, 1.0) + floor)


class MILRegressor(nn.Module):
    """Tile head + mean or gated-attention pooling; a plain ``nn.Module`` (scoring needs no
    Lightning). :class:`weakstil.mil.module.MILModule` trains it with MSE on sTIL%/100.

    ``forward(features, mask=None) -> (score (B,), tile_pred (B, N), attention (B, N))``, all in
    0-1; ``features`` is (N, D) for one bag or (B, N, D) for a padded batch. The attention rows sum
    to 1 over the real tiles (uniform ``1/N`` for ``mean``) and ``score == sum(attention *
    tile_pred)``.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        hidden: int = 128,
        dropout: float = 0.25,
        aggregation: str = "attention",
        head: str = "mlp",
        stroma_prior: bool = False,
        stroma_floor: float = STROMA_FLOOR,
        inputs: int = 0,
        skip: int = 0,
        **recorded,
    ):
        """``inputs``: read only ``inputs`` feature columns, the last ones or (``skip``) those ending
        ``skip`` columns before the last (e.g. one measured block of a ``+stainmorph`` encoder's
        morphometry); 0 reads all ``embed_dim``. The model still takes (and checks) full
        ``embed_dim`` rows. ``recorded``: training settings kept with the model's config (lr,
        weight_decay, max_tiles …) so that a checkpoint says how it was trained; they do not change
        the network."""
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head!r}")
        inputs, skip = int(inputs), int(skip)
        if inputs < 0 or skip < 0 or inputs + skip > int(embed_dim) or (skip and not inputs):
            raise ValueError(f"inputs + skip must be in 0..{embed_dim} (skip only with inputs), not {inputs} + {skip}")
        if not float(stroma_floor) > 0:
            raise ValueError(f"stroma_floor must be > 0, not {stroma_floor!r}")
        self.config = {"embed_dim": int(embed_dim), "hidden": int(hidden), "dropout": float(dropout),
                       "aggregation": aggregation, "head": head, "stroma_prior": bool(stroma_prior),
                       "stroma_floor": float(stroma_floor), "inputs": inputs, "skip": skip, **recorded}
        embed_dim = inputs or int(embed_dim)  # the width of what the layers read
        # LayerNorm first: embeddings from random or foreign encoders have arbitrary scales.
        self.embed = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        # head="linear": the tile prediction is a linear function of the normalised embedding (the
        # probe's model class, per tile); the hidden layer then only feeds the tile weights.
        # head="probe": linear (then the sigmoid) on features standardised with the training slides'
        # statistics, started at the linear probe's solution with uniform pooling (init_from_probe):
        # the MIL begins as the baseline it must beat, and keeps it unless validation says otherwise.
        self.tile_head = nn.Linear(hidden if head == "mlp" else embed_dim, 1)
        if head == "probe":
            self.register_buffer("feat_mean", torch.zeros(embed_dim))
            self.register_buffer("feat_scale", torch.ones(embed_dim))
        if aggregation in WEIGHTED:
            self.att_v = nn.Linear(hidden, hidden)
            self.att_u = nn.Linear(hidden, hidden)
            self.att_w = nn.Linear(hidden, 1)

    # --- model ------------------------------------------------------------------------------------
    def init_output_bias(self, fraction: float) -> None:
        """Start the tile head at the training set's mean label (fewer epochs spent finding it)."""
        p = min(max(float(fraction), 1e-3), 1 - 1e-3)
        with torch.no_grad():
            self.tile_head.bias.fill_(math.log(p / (1 - p)))

    @torch.no_grad()
    def init_from_probe(self, mean, scale, coef, intercept: float) -> None:
        """Start as the linear probe (``head="probe"``): features standardised with the probe's
        ``mean`` and ``scale``, the tile head on the tangent of its sigmoid at the probe's intercept
        (the mean label: sTIL% 0-100, as scikit-learn's ridge on standardised slide means gives it) with
        the probe's slope, and equal tile weights. The bag's score is then the probe's prediction for
        the slide mean, up to the sigmoid's curvature (which keeps every tile in 0-100)."""
        as_t = lambda v: torch.as_tensor(np.asarray(v, np.float32))  # noqa: E731
        self.feat_mean.copy_(as_t(mean))
        self.feat_scale.copy_(as_t(np.where(np.asarray(scale) > 0, scale, 1.0)))
        p = min(max(float(intercept) / 100.0, 0.02), 0.98)
        self.tile_head.weight.copy_(as_t(coef).view(1, -1) / 100.0 / (p * (1 - p)))
        self.tile_head.bias.fill_(math.log(p / (1 - p)))
        if self.config["aggregation"] in WEIGHTED:
            self.att_w.weight.zero_()
            self.att_w.bias.zero_()

    def read_inputs(self, features):
        """The feature columns this model reads (``inputs`` ending ``skip`` before the last; all when
        0), tensor or array."""
        k, s = int(self.config.get("inputs") or 0), int(self.config.get("skip") or 0)
        return features[..., -(k + s):-s] if k and s else features[..., -k:] if k else features

    def tile_outputs(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        """Per-tile prediction in 0-1 and attention logit (None for mean pooling), both (..., N)."""
        features = self.read_inputs(features)
        h = self.embed(features)
        head = self.config.get("head")
        if head == "probe":
            head_in = (features - self.feat_mean) / self.feat_scale
        else:
            head_in = self.embed[0](features) if head == "linear" else h
        tile_pred = torch.sigmoid(self.tile_head(head_in)).squeeze(-1)
        prior = stroma_log_weight(features, self.config["stroma_floor"]) if self.config.get("stroma_prior") else None
        if self.config["aggregation"] not in WEIGHTED:
            return tile_pred, prior
        gate = torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))
        logit = self.att_w(gate).squeeze(-1)
        if self.config["aggregation"] == "weighted":
            # a weight in (0, 1) per tile (its "stroma-ness"); softmax of log-weights is their
            # normalised share, so the score is the weighted mean without softmax's peakiness
            logit = nn.functional.logsigmoid(logit)
        return tile_pred, logit if prior is None else logit + prior

    @staticmethod
    def pool(
        tile_pred: Tensor, logits: Tensor | None, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Slide score (B,) and attention (B, N) from tile predictions and logits (B, N)."""
        if mask is None:
            mask = torch.ones_like(tile_pred, dtype=torch.bool)
        if logits is None:
            weights = mask.to(tile_pred.dtype)
            attention = weights / weights.sum(-1, keepdim=True).clamp_min(1.0)
        else:
            attention = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        score = (attention * tile_pred.masked_fill(~mask, 0.0)).sum(-1)
        return score, attention

    def forward(
        self, features: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if features.dim() == 2:
            features = features.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        tile_pred, logits = self.tile_outputs(features)
        score, attention = self.pool(tile_pred, logits, mask)
        return score, tile_pred, attention

    @torch.no_grad()
    def predict_bag(self, features: Tensor, *, chunk: int = 16384) -> tuple[Tensor, Tensor, Tensor]:
        """Score one full bag (N, D) in eval mode; tiles are embedded in chunks to bound memory.

        Returns ``(score (), tile_pred (N,), attention (N,))`` in 0-1.
        """
        was_training = self.training
        self.eval()
        try:
            preds, logits = [], []
            for start in range(0, features.shape[0], chunk):
                p, lg = self.tile_outputs(features[start : start + chunk])
                preds.append(p)
                logits.append(lg)
            tile_pred = torch.cat(preds)
            logit = None if logits[0] is None else torch.cat(logits)
            logit = None if logit is None else logit[None]
            score, attention = self.pool(tile_pred[None], logit, None)
            return score[0], tile_pred, attention[0]
        finally:
            self.train(was_training)


# --- the deployed model: one or more fold members, saved in models/<name>/model.ckpt -------------
CHECKPOINT_FORMAT = "weakstil.mil.model"
CHECKPOINT_VERSION = 3  # 2: may hold the linear probe of the blend; 3: members reading different columns


@dataclass(frozen=True)
class SlidePrediction:
    """One slide's prediction. ``score`` and ``tile_pred`` are sTIL% (0-100); ``attention`` (N,)
    sums to 1 and ``contribution = attention * tile_pred`` (N,) sums to ``score``."""

    score: float
    tile_pred: np.ndarray
    attention: np.ndarray
    contribution: np.ndarray


class TrainedModel:
    """A deployed MIL model: the fold members of an ensemble, or one model.

    An ensemble's slide score is the mean of its members' scores. Per tile, its attention is the
    members' mean attention ``A_i``, its contribution the members' mean ``a_mi * p_mi``, and its
    tile prediction the members' predictions weighted by their attention on that tile,
    ``sum_m a_mi p_mi / sum_m a_mi``, so that ``contribution = attention * tile_pred`` and the
    contributions still sum to the score. With ``mean`` pooling every attention is ``1/N`` and the
    tile prediction is the plain mean of the members' tile predictions.
    """

    def __init__(
        self, members: list[MILRegressor], *, fingerprint: dict, config: dict | None = None,
        probe: dict | None = None,
    ):
        if not members:
            raise ValueError("a TrainedModel needs at least one member")
        self.members = [m.cpu().eval() for m in members]
        self.fingerprint = fingerprint
        self.config = dict(config or {})
        self.probe = probe  # the linear probe of the blend (mil.blend): coef (D,), intercept

    @property
    def model_config(self) -> dict:
        """The first member's configuration (every member shares all but, after ``--columns auto``,
        the feature columns it reads: :attr:`column_sets`)."""
        return dict(self.members[0].config)

    @property
    def column_sets(self) -> list[str]:
        """The feature-column sets the members read (``TrainConfig.columns`` names), in member order,
        each once."""
        from weakstil.mil.fit import columns_of

        return list(dict.fromkeys(columns_of(m.config.get("inputs"), m.config.get("skip")) for m in self.members))

    @property
    def embed_dim(self) -> int:
        return int(self.members[0].config["embed_dim"])

    @property
    def aggregation(self) -> str:
        return str(self.members[0].config["aggregation"])

    def predict(self, features: np.ndarray) -> SlidePrediction:
        """Score one slide's tile features (N, D), any float dtype."""
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.embed_dim:
            raise ModelMismatchError(
                f"features have shape {features.shape}; this model expects (N, {self.embed_dim}) "
                "embeddings from the encoder it was trained on"
            )
        if features.shape[0] == 0:
            raise EmptyBagError("the slide has no tiles to score",
                                fix="no tile of this slide passed the tissue filter: check its tissue QC "
                                    "picture, its ROI, or lower --min-tissue when extracting")
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        preds, atts = [], []
        for member in self.members:
            _, tile_pred, attention = member.predict_bag(x)
            preds.append(tile_pred.double().numpy())
            atts.append(attention.double().numpy())
        p, a = np.stack(preds), np.stack(atts)
        attention = a.mean(0)
        contribution = (a * p).mean(0)
        safe = np.where(attention > 0, attention, 1.0)
        tile_pred = np.where(attention > 0, contribution / safe, p.mean(0))
        raw = SlidePrediction(
            score=float(100.0 * contribution.sum()),
            tile_pred=100.0 * tile_pred,
            attention=attention,
            contribution=100.0 * contribution,
        )
        blend = self.config.get("blend")
        if blend and self.probe is not None:
            from weakstil.mil.blend import blended, probe_score

            raw = blended(raw, probe_score(features, self.probe), float(blend["weight"]))
        return calibrated(raw, self.config.get("calibration"))

    def save(self, path: str | Path) -> None:
        """Write ``model.ckpt`` (plain dict of tensors and plain types; loads with weights_only)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "format_version": 1,  # 2 with a probe, 3 with members of different columns (below)
            "weakstil_version": __version__,
            "model_config": plain_json(self.model_config),
            "members": [
                {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for m in self.members
            ],
            "fingerprint": plain_json(self.fingerprint),
            "config": plain_json(self.config),
        }
        configs = [plain_json(m.config) for m in self.members]
        if any(c != configs[0] for c in configs):  # an older weakstil would build every member alike
            state["format_version"] = 3
            state["member_configs"] = configs
        if self.probe is not None:  # a weakstil that cannot apply the blend refuses the file
            state["format_version"] = max(state["format_version"], 2)
            state["probe"] = {"coef": torch.as_tensor(np.asarray(self.probe["coef"], np.float32)),
                              "intercept": float(self.probe["intercept"]), "alpha": float(self.probe["alpha"])}
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_bytes(Path(path), buffer.getvalue())  # atomic; a full disk is a DiskFullError
        write_checksum(Path(path))


CHECKSUM_NAME = "model.sha256"


def write_checksum(ckpt: Path) -> Path:
    """Record ``ckpt``'s sha256 beside it (``model.sha256``, ``sha256sum`` format), so that loading
    can tell a damaged file from the one training wrote (``sha256sum -c model.sha256`` checks it)."""
    from weakstil.fingerprint import file_sha256

    out = ckpt.with_name(CHECKSUM_NAME)
    return write_text(out, f"{file_sha256(ckpt)}  {ckpt.name}\n")


def verify_checksum(ckpt: Path) -> bool:
    """Check ``ckpt`` against its recorded sha256; False when none was recorded (models from before
    weakstil recorded one). :class:`ModelCorruptError` when the file differs from what was recorded."""
    from weakstil.fingerprint import file_sha256

    record = ckpt.with_name(CHECKSUM_NAME)
    if not record.is_file():
        return False
    fields = record.read_text().split()
    expected = fields[0].lower() if fields else ""
    actual = file_sha256(ckpt)
    if actual != expected:
        raise ModelCorruptError(
            f"checksum mismatch: the file is corrupt (sha256 {actual[:16]}…, but {CHECKSUM_NAME} recorded at "
            f"training says {expected[:16] or '(empty)'}…)", path=ckpt)
    return True


def _check_finite(members: list[MILRegressor], ckpt: Path) -> None:
    """Refuse weights with NaN or infinity (they would surface later as a misleading error)."""
    for k, member in enumerate(members):
        for name, tensor in member.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelCorruptError(f"the weights are corrupt: member {k}, {name} holds NaN or infinite values",
                                        path=ckpt)


def calibrated(pred: SlidePrediction, line: dict | None) -> SlidePrediction:
    """The prediction with the model's post-hoc calibration line applied to every tile (see
    :mod:`weakstil.mil.calibration`); the score is again the sum of the contributions."""
    if not line:
        return pred
    from weakstil.mil.calibration import apply_line

    tile_pred = apply_line(pred.tile_pred, line)
    contribution = pred.attention * tile_pred
    return SlidePrediction(float(contribution.sum()), tile_pred, pred.attention, contribution)


def load_model(model_dir: str | Path) -> TrainedModel:
    """Load ``models/<name>/`` (or its ``model.ckpt``); :class:`ModelNotFoundError` if missing or
    unreadable."""
    model_dir = Path(model_dir)
    ckpt = model_dir if model_dir.is_file() else model_dir / "model.ckpt"
    if not ckpt.is_file():
        raise ModelNotFoundError("no model here (model.ckpt is missing)", path=model_dir)
    verify_checksum(ckpt)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a weakstil MIL checkpoint")
        if int(state["format_version"]) > CHECKPOINT_VERSION:
            version = state["format_version"]
            raise ValueError(f"checkpoint format {version} is newer than this weakstil")
        members = []
        configs = state.get("member_configs") or [state["model_config"]] * len(state["members"])
        for weights, config in zip(state["members"], configs, strict=True):
            member = MILRegressor(**{"stroma_floor": LEGACY_STROMA_FLOOR, **config})  # saved before the key
            member.load_state_dict(weights)
            members.append(member)
    except Exception as exc:  # unpickling, truncated zip, missing keys, shape mismatches
        raise ModelNotFoundError(
            f"model.ckpt cannot be read ({type(exc).__name__}: {exc})",
            fix="the file is corrupt or not a weakstil model; train it again with `weakstil train`",
            path=ckpt,
        ) from exc
    _check_finite(members, ckpt)
    probe = state.get("probe")
    if probe is not None:
        probe = {"coef": probe["coef"].numpy(), "intercept": float(probe["intercept"]),
                 "alpha": float(probe["alpha"])}
    return TrainedModel(members, fingerprint=state["fingerprint"], config=state.get("config"), probe=probe)


def check_fingerprint(model: TrainedModel | dict, cache_fp) -> None:
    """Refuse to score features that differ from the ones the model was trained on.

    ``cache_fp`` is a FeatureCache (``.encoder_fp``, ``.tiling_fp``) or a dict with keys
    ``encoder`` and ``tiling``; the comparison is :func:`weakstil.fingerprint.model_differences`.
    Raises :class:`ModelMismatchError` naming each field that differs.
    """
    from weakstil.fingerprint import model_differences

    model_fp = model.fingerprint if isinstance(model, TrainedModel) else model
    if not isinstance(cache_fp, dict):
        cache_fp = {"encoder": cache_fp.encoder_fp, "tiling": cache_fp.tiling_fp}
    diffs = model_differences(model_fp, cache_fp)
    if diffs:
        raise ModelMismatchError(
            "the model was trained on other features than these:\n  " + "\n  ".join(diffs),
            fix=older_morphometry_fix(model_fp, cache_fp))


def older_morphometry_fix(model_fp: dict, cache_fp: dict) -> str | None:
    """The advice when a model's features came from another version of the stain morphometry (a
    ``MORPH_ARCH`` bump between weakstil versions), which this version cannot compute: retrain."""
    from weakstil.embed.encoders import MORPH_ARCH

    ours = str(model_fp.get("encoder", {}).get("arch", ""))
    theirs = str(cache_fp.get("encoder", {}).get("arch", ""))
    base = MORPH_ARCH.rsplit(".", 1)[0]  # "stainmorph"
    if base not in ours or ours == theirs or ours.endswith(MORPH_ARCH):
        return None
    if ours.split("+")[0] != theirs.split("+")[0]:
        return None  # another network too: the general advice
    version = ours.rsplit("+", 1)[-1]
    return (f"this model was trained on {version} morphometry features (an earlier weakstil); this version "
            f"computes {MORPH_ARCH} only: extract again and retrain (`weakstil extract`, then `weakstil "
            f"train`: the models/NAME/config.yaml options), or score with the weakstil version in the "
            f"model card")
