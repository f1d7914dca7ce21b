"""The MIL's start: a fresh model's tile head at the mean label or (``head="probe"``) at the linear probe
of its training bags, refitted through each tile's sigmoid with the pooling's start weights; a warm
start's parent weights. Split from :mod:`weakstil.mil.fit`, which calls :func:`initialise` before
each fit."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from weakstil.mil.model import MILRegressor, stroma_log_weight

Bag = tuple[np.ndarray, float]  # (features (N, D) float32, sTIL% 0-100)


def initialise(model: MILRegressor, train_bags: Sequence[Bag], init_state: dict | None, *,
                emphasis: float = 1.0) -> None:
    """Fresh start: the tile head's bias at the mean label, or (``head="probe"``) the linear probe
    fitted on the training bags — with the morphometry's measured columns (the last
    :data:`~weakstil.embed.encoders.MEASURED_DIM`) weighted by ``emphasis`` when the model reads
    every column. Warm start: the parent's weights."""
    if init_state is not None:
        model.load_state_dict(init_state)
    elif model.config.get("head") == "probe":
        from weakstil.mil.probe import LinearProbe

        train_bags = [(model.read_inputs(f), y) for f, y in train_bags]  # the columns the model reads
        floor = model.config["stroma_floor"] if model.config.get("stroma_prior") else None
        means = np.stack([pooled_mean(np.asarray(f), floor) for f, _ in train_bags])
        weights = column_weights(means.shape[1], model, emphasis)
        probe = LinearProbe(column_weights=weights).fit(means, np.array([y for _, y in train_bags], np.float64))
        scaler, ridge = probe.model[0], probe.model[-1]
        scale = scaler.scale_ if weights is None else scaler.scale_ / weights  # the model standardises × w
        model.init_from_probe(scaler.mean_, scale, ridge.coef_, float(ridge.intercept_))
        fit_probe_head(model, train_bags, probe.alpha)
    else:
        model.init_output_bias(float(np.mean([y for _, y in train_bags])) / 100.0)


def column_weights(dim: int, model: MILRegressor, emphasis: float) -> np.ndarray | None:
    """Per-column weights of the probe start: ``emphasis`` on the measured columns when the model
    reads all of them beside others; None (equal) otherwise."""
    from weakstil.embed.encoders import MEASURED_DIM

    if emphasis == 1.0 or model.config.get("inputs") or dim <= MEASURED_DIM:  # "all" only
        return None
    weights = np.ones(dim)
    weights[-MEASURED_DIM:] = emphasis
    return weights


def pooled_mean(features: np.ndarray, stroma_floor: float | None) -> np.ndarray:
    """The bag's mean feature vector, weighted as the pooling weights tiles at the start (by their
    estimated stroma plus ``stroma_floor`` under the stroma prior; None: equally)."""
    if stroma_floor is None:
        return features.mean(axis=0, dtype=np.float64)
    import torch

    w = torch.exp(stroma_log_weight(torch.as_tensor(features, dtype=torch.float64), stroma_floor)).numpy()
    return (w[:, None] * features).sum(axis=0) / w.sum()


def fit_probe_head(model: MILRegressor, bags: Sequence[Bag], alpha: float, *, max_tiles: int = 256,
                    steps: int = 50) -> None:
    """Refit the probe head's start through its sigmoid: with equal tile weights, the bag score is
    the mean of ``sigmoid(w · z + b)`` over its tiles, not the probe's line at the mean tile, so the
    tangent start of :meth:`MILRegressor.init_from_probe` is pulled toward the mean label where tiles
    differ. L-BFGS on the bags' squared error (labels 0-1) with the probe's ridge penalty on the
    slope at the mean label, from the tangent start; up to ``max_tiles`` tiles per bag (evenly
    spaced)."""
    import torch

    z = []
    for f, _ in bags:
        idx = np.linspace(0, len(f) - 1, min(len(f), max_tiles)).round().astype(int)
        z.append(torch.as_tensor(np.asarray(f[idx], np.float32)))
    y = torch.tensor([lab for _, lab in bags], dtype=torch.float32) / 100.0
    head, mean, scale = model.tile_head, model.feat_mean, model.feat_scale
    zs = [(t - mean) / scale for t in z]
    # tile weights at the start: equal, or (stroma prior) the estimated stroma fraction
    prior, floor = model.config.get("stroma_prior"), model.config["stroma_floor"]
    ws = [torch.exp(stroma_log_weight(t, floor)) if prior else torch.ones(len(t)) for t in z]
    ws = [v / v.sum() for v in ws]
    p = float(torch.sigmoid(head.bias).item())
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.bias.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        pred = torch.stack([(torch.sigmoid(t @ w.T + b).squeeze(-1) * v).sum() for t, v in zip(zs, ws)])
        value = (pred - y).square().sum() + alpha * (w * p * (1 - p)).square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        start = float(loss().detach())
        opt.step(loss)
        end = float(loss().detach())
    if np.isfinite(end) and end < start:
        with torch.no_grad():
            head.weight.copy_(w.detach())
            head.bias.copy_(b.detach())
