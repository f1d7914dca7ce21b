"""Stain morphometry: a small, fixed (not learned) tile encoder that measures what sTIL% is made of.

sTIL% is lymphocyte area over stromal area. A random or natural-image encoder summarises texture,
and which texture means "lymphocyte" differs from one scanner, stain and slide generator to the
next. This encoder measures the quantities a pathologist reads instead, from the hematoxylin and
eosin amounts of each pixel (colour deconvolution with the reference stains of
:mod:`weakstil.embed.stain`, so tiles are best stain-normalised first, the default):

* how much of the tile is tissue, hematoxylin- and eosin-rich, and eosin-rich with few nuclei
  (stroma-like);
* nuclei found as blobs of hematoxylin in a difference-of-Gaussians scale space (5 scales, about
  3–15 µm across at 0.5 µm/px), counted per scale: small round dark nuclei are lymphocyte-like,
  large ones tumour-like;
* where they are: small nuclei counted inside stroma-like areas (the numerator of sTIL%) and
  inside crowded large-nucleus areas (tumour nests, the confounder), each over the area it sits in.

It returns :data:`N_FEATURES` numbers per tile on scales of about one (fractions, concentrations,
``log1p`` densities), costs a few separable convolutions per tile (a fraction of a ResNet-18 pass),
and has no weights: the same numbers on every machine. Use it alone (``--encoder stainmorph``) or
beside a network (``resnet18-random+stainmorph``: both feature sets side by side).

Thresholds are in the reference stain's concentration units (its 99th percentiles are
H 1.97, E 1.03) and pixel scales assume the default 0.5 µm/px tiles.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakstil.embed.stain import IO, REF_HE

SIGMAS = (1.5, 2.2, 3.2, 4.6, 6.6)  # DoG scales in px (blob diameter ≈ 2.8 σ: 4–18 px = 2–9 µm)
DOG_RATIO = 1.6
FAINT, DARK = 0.05, 0.2  # DoG responses (H concentration) of a faint and of a dark nucleus
TISSUE_OD = 0.15  # summed optical density above which a pixel is tissue (Macenko's beta)
SMALL = (1, 2)  # scales of lymphocyte-like nuclei (dark, 3–4.5 µm across)
LARGE = (3, 4)  # scales of tumour-like nuclei (any contrast, 6–9 µm)
AREA = 1e4  # densities are per 10,000 px (50 × 50 µm at 0.5 µm/px)
CONTEXT_SIGMA = 16.0  # px: the neighbourhood (8 µm) that says "stroma" or "tumour nest"
NEST = 1 / 1200  # large nuclei per px (one per 300 µm²) from which a neighbourhood is a nest
NAMES = (
    "tissue", "h_mean", "e_mean", "h_sd", "e_sd", "h_rich", "e_rich", "stroma_like",
    *(f"nuclei_s{i}" for i in range(len(SIGMAS))), *(f"dark_nuclei_s{i}" for i in range(len(SIGMAS))),
    "small_in_stroma", "small_in_nests", "small_per_stroma", "small_share", "nest_like", "small_contrast",
)
N_FEATURES = len(NAMES)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class StainMorph(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] → (B, :data:`N_FEATURES`) stain-morphometric features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("to_conc", torch.as_tensor(np.linalg.pinv(REF_HE), dtype=torch.float32))
        sig = sorted({*SIGMAS, *(s * DOG_RATIO for s in SIGMAS), CONTEXT_SIGMA})
        self._sigmas = sig
        for i, s in enumerate(sig):
            self.register_buffer(f"k{i}", _gauss_kernel(s))
        self.num_features = N_FEATURES

    def _blur(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        k = getattr(self, f"k{self._sigmas.index(sigma)}")
        c, r = x.shape[1], (len(k) - 1) // 2
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        od = (x * 255.0 + 1.0).div(IO).log().neg().clamp(min=0)
        conc = torch.einsum("ck,bkhw->bchw", self.to_conc, od).clamp(min=0)
        h, e = conc[:, :1], conc[:, 1:]
        tissue = (od.sum(1, keepdim=True) > TISSUE_OD).float()
        area = x.shape[-1] * x.shape[-2]

        def frac(m):  # mean over the tile
            return m.flatten(1).mean(1)

        n_t = frac(tissue).clamp(min=1e-3)
        h_mean = frac(h * tissue) / n_t
        e_mean = frac(e * tissue) / n_t
        h_sd = (frac(h.square() * tissue) / n_t - h_mean.square()).clamp(min=0).sqrt()
        e_sd = (frac(e.square() * tissue) / n_t - e_mean.square()).clamp(min=0).sqrt()
        h_rich = (h > 1.0).float()
        e_rich = ((e > 0.35) & (h < 0.6)).float()

        # nuclei: maxima of the DoG scale space of the hematoxylin amount
        dog = torch.cat([self._blur(h, s) - self._blur(h, s * DOG_RATIO) for s in SIGMAS], 1)  # (B, K, H, W)
        peak = F.max_pool3d(dog.unsqueeze(1), (3, 5, 5), stride=1, padding=(1, 2, 2)).squeeze(1)
        blobs = ((dog >= peak) & (dog > FAINT)).float()  # (B, K, H, W) one-pixel marks
        dark = blobs * (dog > DARK)
        small = dark[:, list(SMALL)].sum(1, keepdim=True)
        large = blobs[:, list(LARGE)].sum(1, keepdim=True)
        # context: eosin-rich neighbourhoods with few large nuclei are stroma; crowded ones are nests
        ctx = self._blur(torch.cat([e_rich, large / NEST], 1), CONTEXT_SIGMA)  # eosin share; nest density
        stroma = ((ctx[:, :1] > 0.3) & (ctx[:, 1:] < 1)).float() * tissue
        nests = (ctx[:, 1:] >= 1).float() * tissue
        n_small, n_large = small.flatten(1).sum(1), large.flatten(1).sum(1)
        in_stroma = (small * stroma).flatten(1).sum(1)
        in_nests = (small * nests).flatten(1).sum(1)
        stroma_px = stroma.flatten(1).sum(1)
        contrast = (dog[:, list(SMALL)].amax(1, keepdim=True) * small).flatten(1).sum(1) / n_small.clamp(min=1)
        dens = AREA / area
        feats = [
            frac(tissue), h_mean, e_mean, h_sd, e_sd, frac(h_rich * tissue), frac(e_rich), frac(stroma),
            *torch.log1p(blobs.flatten(2).sum(2) * dens).unbind(1), *torch.log1p(dark.flatten(2).sum(2) * dens).unbind(1),
            torch.log1p(in_stroma * dens), torch.log1p(in_nests * dens),
            torch.log1p(in_stroma * AREA / stroma_px.clamp(min=AREA / 4)),
            n_small / (n_small + n_large).clamp(min=1), frac(nests), contrast,
        ]
        return torch.stack(feats, 1)


class Concat(nn.Module):
    """A network and :class:`StainMorph` side by side on the same [0, 1] RGB input; the network
    gets its own mean/std normalisation."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.morph = StainMorph()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return torch.cat([net, self.morph(x).to(net.dtype)], 1)
