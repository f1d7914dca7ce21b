"""The self-supervised LightningModule: a timm backbone, lightly's projection heads and losses.

* ``simclr`` — lightly's :class:`~lightly.models.modules.SimCLRProjectionHead` and
  :class:`~lightly.loss.NTXentLoss` (gathered across DDP ranks, so every GPU's tiles are negatives);
  two views per tile. The backbone is the encoder that is exported.
* ``dino`` — lightly's :class:`~lightly.models.modules.DINOProjectionHead` and
  :class:`~lightly.loss.DINOLoss`; a momentum teacher (EMA of the student, momentum 0.996 → 1 on a
  cosine, :func:`lightly.models.utils.update_momentum`) sees the 2 global views, the student all
  views (global and local). The *teacher* backbone is exported, as in the DINO paper.

Batches arrive as uint8 tiles; the views are made on the device (:mod:`weakstil.ssl.augment`) at
the start of each step, outside mixed-precision autocast.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import lightning as L
import torch

from weakstil.ssl.augment import (
    AugmentParams,
    TileAugment,
    dino_view_specs,
    simclr_view_specs,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --arch → (timm model, timm keywords, input px). ViTs take any multiple of 16 px (DINO's local crops).
# The ResNet starts exactly where `resnet18-random` is (same keywords, same seed 0): pretrained vs
# random init then measures what the self-supervised steps changed, nothing else.
ARCHS = {
    "resnet18": ("resnet18", {"zero_init_last": False}, 224),
    "vit_small": ("vit_small_patch16_224", {"dynamic_img_size": True}, 224),
}
METHODS = ("simclr", "dino")


@dataclass(frozen=True)
class SSLConfig:
    """What is trained and how. ``lr`` None: 1e-3 (SimCLR) or 5e-4 (DINO) × batch / 256 (linear scaling)."""

    method: str = "simclr"
    arch: str = "resnet18"
    view_px: int = 224  # size of the (global) views; the exported encoder still takes input_px tiles
    crop_scale: tuple[float, float] = (0.4, 1.0)  # area fraction of the tile per (global) view
    n_local: int = 6  # DINO local views
    batch_size: int = 64  # tiles per device and step
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_steps: int | None = None  # the schedules' horizon; None (a time budget): constant after warm-up
    temperature: float = 0.1  # SimCLR (NT-Xent)
    proj_dim: int = 128  # SimCLR output
    dino_out_dim: int = 4096  # DINO prototypes (65,536 in the paper; small cohorts need far fewer)
    teacher_momentum: float = 0.996
    seed: int = 0
    augment: AugmentParams = field(default_factory=AugmentParams)

    def __post_init__(self):
        from weakstil.errors import ConfigError

        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}", fix=f"use one of: {', '.join(METHODS)}")
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown --arch {self.arch!r}", fix=f"use one of: {', '.join(ARCHS)}")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2 (contrastive losses compare tiles)",
                              fix="use --batch-size 32 or more")
        if not (16 <= self.view_px <= 1024):
            raise ConfigError(f"view size {self.view_px} px is out of 16..1024")

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return (1e-3 if self.method == "simclr" else 5e-4) * self.batch_size / 256

    def as_dict(self) -> dict:
        return asdict(self)


def build_backbone(arch: str, seed: int = 0) -> torch.nn.Module:
    """The timm backbone of ``arch`` (no classifier), randomly initialised with ``seed``."""
    import timm

    name, kwargs, _ = ARCHS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


class SSLModule(L.LightningModule):
    """SimCLR or DINO on uint8 tile batches; :meth:`encoder_backbone` is what gets exported."""

    def __init__(self, config: SSLConfig, world_size: int = 1):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.arch, config.seed)
        dim = self.backbone.num_features
        if config.method == "simclr":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            self.head = SimCLRProjectionHead(dim, dim, config.proj_dim)
            self.criterion = NTXentLoss(temperature=config.temperature, gather_distributed=world_size > 1)
            views = simclr_view_specs(config.view_px, config.crop_scale)
        else:
            from lightly.loss import DINOLoss
            from lightly.models.modules import DINOProjectionHead
            from lightly.models.utils import deactivate_requires_grad

            bn = config.arch.startswith("resnet")
            self.head = DINOProjectionHead(dim, 2048, 256, config.dino_out_dim, batch_norm=bn)
            self.teacher_backbone = copy.deepcopy(self.backbone)
            self.teacher_head = DINOProjectionHead(dim, 2048, 256, config.dino_out_dim, batch_norm=bn)
            self.teacher_head.load_state_dict(self.head.state_dict())
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)
            self.criterion = DINOLoss(output_dim=config.dino_out_dim)
            views = dino_view_specs(config.view_px, config.n_local)
            views[0] = type(views[0])(views[0].px, tuple(config.crop_scale), views[0].count)
        self.views = views
        self.augment = TileAugment(views, mean=IMAGENET_MEAN, std=IMAGENET_STD, params=config.augment)

    # -- steps ---------------------------------------------------------------------------------
    def make_views(self, tiles_uint8: torch.Tensor) -> list[torch.Tensor]:
        """The augmented views of a uint8 batch, made in fp32 (outside mixed-precision autocast)."""
        with torch.no_grad(), torch.autocast(tiles_uint8.device.type, enabled=False):
            return self.augment(tiles_uint8)

    def training_step(self, tiles_uint8: torch.Tensor, batch_idx: int) -> torch.Tensor:
        views = self.make_views(tiles_uint8)
        if self.config.method == "simclr":
            z = self.head(self.backbone(torch.cat(views[:2])))
            z0, z1 = z.chunk(2)
            loss = self.criterion(z0, z1)
        else:
            loss = self._dino_loss(views)
        self.log("loss", loss.detach(), prog_bar=True, sync_dist=False)
        return loss

    def _dino_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        n_global = self.views[0].count
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:n_global])))
        student = []
        for size in sorted({v.shape[-1] for v in views}, reverse=True):  # one pass per view size
            same = [v for v in views if v.shape[-1] == size]
            student.extend(self.head(self.backbone(torch.cat(same))).chunk(len(same)))
        return self.criterion(list(teacher.chunk(n_global)), student)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.config.method == "dino":
            from lightly.models.utils import update_momentum

            m = self._teacher_momentum(self.global_step)
            update_momentum(self.backbone, self.teacher_backbone, m)
            update_momentum(self.head, self.teacher_head, m)

    def _teacher_momentum(self, step: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        horizon = self.config.max_steps
        if not horizon:
            return self.config.teacher_momentum
        return cosine_schedule(min(step, horizon), horizon, self.config.teacher_momentum, 1.0)

    # -- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.config.base_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.config.warmup_steps, self.config.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- export ------------------------------------------------------------------------------------
    def encoder_backbone(self) -> torch.nn.Module:
        """The network that becomes the encoder: the SimCLR backbone, or the DINO teacher's."""
        return self.teacher_backbone if self.config.method == "dino" else self.backbone


def lr_lambda(warmup_steps: int, max_steps: int | None):
    """Learning-rate factor per step: linear warm-up, then cosine to 1 % at ``max_steps`` (constant
    after the warm-up when there is no step horizon, e.g. a time budget)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not max_steps or max_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return factor
