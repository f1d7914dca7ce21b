"""The LightningModule that trains a :class:`~weakstil.mil.model.MILRegressor` on slide labels.

Kept apart from the model so that scoring (``weakstil.outputs``) loads and runs models without
importing Lightning. The loss is MSE between the slide score and sTIL%/100; validation reports R²
over the full validation bags.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from weakstil.mil.model import MILRegressor


def validation_r2(pred: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """(R², MSE) of slide scores against labels (both 0-1), in float64. With constant labels R² is
    undefined; −MSE keeps "higher is better"."""
    pred, label = pred.double(), label.double()
    mse = torch.mean((pred - label) ** 2)
    ss_tot = torch.sum((label - label.mean()) ** 2)
    r2 = 1.0 - torch.sum((pred - label) ** 2) / ss_tot if ss_tot > 0 else -mse
    return r2, mse


PROBE_HEAD_LR = 0.1  # the probe head's learning rate, as a fraction of lr (it starts at a solution)


class MILModule(pl.LightningModule):
    """Trains ``self.model`` (a :class:`MILRegressor`); ``lr`` and ``weight_decay`` set AdamW."""

    def __init__(self, embed_dim: int, *, lr: float = 1e-3, weight_decay: float = 1e-2, **model_kwargs):
        super().__init__()
        self.save_hyperparameters()
        self.model = MILRegressor(embed_dim, lr=lr, weight_decay=weight_decay, **model_kwargs)
        self._val_scores: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def forward(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(features, mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        score, tile_pred, attention = self(batch["features"], batch["mask"])
        loss = nn.functional.mse_loss(score, batch["label"])
        penalty = float(self.hparams.get("background_penalty", 0.0) or 0.0)
        if penalty > 0:
            loss = loss + penalty * background_penalty(tile_pred, attention, batch["mask"])
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=score.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_scores, self._val_labels = [], []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        score, _, _ = self(batch["features"], batch["mask"])
        self._val_scores.append(score.detach())
        self._val_labels.append(batch["label"])

    def on_validation_epoch_end(self) -> None:
        """R² over the whole validation set's full bags (not a mean of per-batch values)."""
        if not self._val_scores:
            return
        r2, mse = validation_r2(torch.cat(self._val_scores), torch.cat(self._val_labels))
        self.log("val_r2", r2.float(), prog_bar=True)
        self.log("val_mse", mse.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr, wd = self.hparams.lr, self.hparams.weight_decay
        if self.model.config.get("head") != "probe":
            return torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=wd)
        # the probe head starts at the ridge solution: no decay toward 0, and small steps away from it
        head = list(self.model.tile_head.parameters())
        rest = [p for p in self.model.parameters() if all(p is not h for h in head)]
        return torch.optim.AdamW([{"params": rest}, {"params": head, "weight_decay": 0.0,
                                                      "lr": lr * PROBE_HEAD_LR}], lr=lr, weight_decay=wd)




def background_penalty(tile_pred: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``(1 - w_i) · p_i²`` over the real tiles, ``w_i`` each tile's weight relative to the
    bag's largest (held fixed: the penalty moves predictions, not weights).

    Tiles the pooling ignores (tumour, fat: no stroma) get no gradient from the slide loss, so their
    predictions are free and can rank above real stromal TIL tiles in a heatmap. This pulls them
    toward 0 sTIL%; with ``mean`` pooling every weight is equal and the penalty vanishes.
    """
    weight = (attention / attention.amax(-1, keepdim=True).clamp_min(1e-12)).detach()
    real = mask.to(tile_pred.dtype)
    return ((1 - weight) * tile_pred.square() * real).sum() / real.sum().clamp_min(1.0)
