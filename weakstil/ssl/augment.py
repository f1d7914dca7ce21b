"""H&E-aware augmentations, applied to whole batches on the training device.

Each view of a tile is: a random crop at tile scale resized to ``view_px`` → one of the 8 exact
symmetries of the square (90° rotations × flips: tissue has no up) → stain jitter in HED optical-
density space → mild Gaussian blur on some tiles → normalisation with the encoder's mean/std.

Why these, and not a natural-image recipe (SimCLR/DINO's colour jitter, grey-scale, solarisation):
colour in H&E carries meaning (hematoxylin = nuclei, eosin = stroma and cytoplasm); what varies
between labs and scanners is the *amount* of each stain, so the jitter scales and shifts the
hematoxylin, eosin and residual channels of the Ruifrok-Johnston colour deconvolution (Tellez et
al., Med. Image Anal. 2019: HED jitter is the augmentation that generalises best across centres),
rather than shifting hue freely. Grey-scale would throw the stain information away.

Why written here in torch (about 40 lines) rather than with kornia or torchstain: kornia has no
HED/optical-density transform (only RGB↔HSV/LAB/YUV…); torchstain's augmentor fits a Macenko stain
matrix per tile (an eigen-decomposition each, fragile on tiles with little stain) and works one
image at a time. A fixed Ruifrok matrix is one batched matrix product, runs on the GPU next to the
model, and keeps the CPU free for JPEG decoding, which bounds throughput there.

Crops are taken at tile scale (by default 40-100 % of the tile's area, aspect 3/4-4/3), so nuclei
keep roughly their size: magnification matters in pathology, unlike in ImageNet photos. The crop
geometry of DINO's multi-crop views (2 global views, several small local ones) follows lightly's
``DINOTransform`` defaults (:func:`dino_view_specs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Ruifrok & Johnston (2001) stain vectors (rows: hematoxylin, eosin, DAB/residual), as skimage's rgb2hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: ``count`` crops of ``scale`` (fraction of the tile's area) resized to ``px``."""

    px: int
    scale: tuple[float, float] = (0.4, 1.0)
    count: int = 1


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of the augmentations: geometry and focus mild (tissue must stay tissue), stain strong.

    The stain jitter covers the variation between slides (amounts × 0.65–1.35, ± 0.08 OD), so that
    contrastive learning cannot tell two tiles apart by their slide's stain. With Tellez et al.'s
    "light" 0.05 / 0.05 it could, and 300 SimCLR steps on the hard synthetic cohorts made the
    features worse than random init (R² 0.595 → 0.38 lattice-hard, 0.52 → 0.33 cells-hard); with
    these 0.85 and 0.48 (docs/pretrain.md)."""

    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    hed_scale: float = 0.35  # stain amount × U(1 ± hed_scale) per channel (Tellez et al.: 0.05 light, 0.2 strong)
    hed_shift: float = 0.08  # plus U(± hed_shift) optical density
    blur_prob: float = 0.3  # share of tiles blurred …
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # … with a sigma (output pixels) from this range


def simclr_view_specs(view_px: int, scale: tuple[float, float] = (0.4, 1.0)) -> list[ViewSpec]:
    """SimCLR: two views of every tile, alike in size."""
    return [ViewSpec(view_px, tuple(scale), 2)]


def dino_view_specs(view_px: int, n_local: int = 6) -> list[ViewSpec]:
    """DINO multi-crop: 2 global views and ``n_local`` local ones, with lightly's default geometry
    (global 224 px of 40-100 % of the image, local 96 px of 5-40 %), scaled to ``view_px``."""
    import inspect

    from lightly.transforms.dino_transform import DINOTransform

    defaults = {k: v.default for k, v in inspect.signature(DINOTransform).parameters.items()}
    g_px, g_scale = defaults["global_crop_size"], defaults["global_crop_scale"]
    l_px, l_scale = defaults["local_crop_size"], defaults["local_crop_scale"]
    local_px = max(16, round(view_px * l_px / g_px))
    return [ViewSpec(view_px, tuple(g_scale), 2)] + ([ViewSpec(local_px, tuple(l_scale), n_local)] if n_local else [])


# --- geometry ---------------------------------------------------------------------------------
def random_crop_boxes(n: int, size_px: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 4) float boxes (x0, y0, x1, y1) inside a ``size_px`` square: area fraction in ``scale``,
    aspect ratio (log-uniform) in ``ratio``, clipped to the square."""
    import torch

    area = torch.empty(n).uniform_(*scale, generator=generator) * size_px**2
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(1.0, size_px)
    h = torch.sqrt(area / aspect).clamp(1.0, size_px)
    x0 = torch.rand(n, generator=generator) * (size_px - w)
    y0 = torch.rand(n, generator=generator) * (size_px - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, out_px: int) -> torch.Tensor:
    """Crop ``boxes`` (B, 4) out of float images (B, C, H, W) and resize each to ``out_px`` (bilinear)."""
    import torch
    from torchvision.ops import roi_align

    rois = torch.cat([torch.arange(len(x), device=x.device, dtype=x.dtype)[:, None], boxes.to(x)], dim=1)
    return roi_align(x, rois, output_size=(out_px, out_px), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def dihedral(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Apply symmetry ``k`` ∈ 0..7 of the square to each image of (B, C, H, W): rotate by
    ``k % 4`` × 90°, then mirror left-right when ``k >= 4``. Exact (pixels are moved, not resampled)."""
    import torch

    out = torch.empty_like(x)
    for code in range(8):
        idx = (k == code).nonzero(as_tuple=True)[0]
        if len(idx):
            y = torch.rot90(x[idx], code % 4, dims=(-2, -1))
            out[idx] = torch.flip(y, dims=(-1,)) if code >= 4 else y
    return out


# --- colour -----------------------------------------------------------------------------------
def hed_jitter(rgb01: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Stain jitter: RGB in 0-1 (B, 3, H, W) → optical density → HED; each stain channel × ``scale``
    (B, 3) + ``shift`` (B, 3); back to RGB in 0-1. ``scale`` = 1, ``shift`` = 0 is the identity (up
    to float rounding)."""
    import torch

    eps = 1.0 / 255.0
    od = -torch.log(rgb01.clamp(min=eps))  # (B, 3, H, W), ≥ 0
    to_hed = torch.as_tensor(HED_FROM_RGB, dtype=rgb01.dtype, device=rgb01.device)
    to_rgb = torch.as_tensor(RGB_FROM_HED, dtype=rgb01.dtype, device=rgb01.device)
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed)
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", hed, to_rgb)
    return torch.exp(-od.clamp(min=0)).clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own ``sigma`` (B,) px; separable, reflect-padded."""
    import torch
    import torch.nn.functional as F

    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t[None, :] / sigma.to(x)[:, None].clamp(min=1e-3)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    k = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


# --- the pipeline -----------------------------------------------------------------------------
class TileAugment:
    """uint8 tiles (B, H, W, 3) on any device → a list of normalised float views (B, 3, px, px).

    ``views``: the :class:`ViewSpec` list (e.g. :func:`simclr_view_specs`); ``mean``/``std`` on 0-1
    pixel values, from the encoder spec; ``generator`` (on the CPU) makes the draws reproducible.
    """

    def __init__(self, views: list[ViewSpec], *, mean, std, params: AugmentParams = AugmentParams(),
                 generator: torch.Generator | None = None):
        self.views = list(views)
        self.mean, self.std = tuple(mean), tuple(std)
        self.params = params
        self.generator = generator

    def __call__(self, tiles_uint8: torch.Tensor) -> list[torch.Tensor]:
        import torch

        if tiles_uint8.dtype != torch.uint8 or tiles_uint8.ndim != 4 or tiles_uint8.shape[-1] != 3:
            raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {tiles_uint8.dtype} {tuple(tiles_uint8.shape)}")
        x = tiles_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        out = []
        for spec in self.views:
            for _ in range(spec.count):
                out.append(self.view(x, spec))
        return out

    def view(self, x01: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
        """One augmented, normalised view of every tile in ``x01`` (B, 3, H, W) float in 0-1."""
        import torch

        g, p, n = self.generator, self.params, len(x01)
        boxes = random_crop_boxes(n, x01.shape[-1], spec.scale, p.ratio, generator=g)
        v = crop_resize(x01, boxes.to(x01.device), spec.px)
        v = dihedral(v, torch.randint(0, 8, (n,), generator=g).to(x01.device))
        scale = 1.0 + torch.empty(n, 3).uniform_(-p.hed_scale, p.hed_scale, generator=g)
        shift = torch.empty(n, 3).uniform_(-p.hed_shift, p.hed_shift, generator=g)
        v = hed_jitter(v, scale.to(v), shift.to(v))
        blur = torch.rand(n, generator=g) < p.blur_prob
        if bool(blur.any()):
            idx = blur.nonzero(as_tuple=True)[0].to(v.device)
            sigma = torch.empty(int(blur.sum())).uniform_(*p.blur_sigma, generator=g)
            v[idx] = gaussian_blur(v[idx], sigma.to(v))
        mean = torch.tensor(self.mean, device=v.device, dtype=v.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=v.device, dtype=v.dtype).view(1, 3, 1, 1)
        return ((v - mean) / std).contiguous(memory_format=torch.channels_last)
