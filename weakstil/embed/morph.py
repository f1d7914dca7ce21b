"""Stain morphometry: a small, fixed (not learned) tile encoder that measures what sTIL% is made of.

sTIL% is lymphocyte area over stromal area. A random or natural-image encoder summarises texture,
and which texture means "lymphocyte" differs from one scanner, stain and slide generator to the
next. This encoder measures the quantities a pathologist reads instead, from the hematoxylin and
eosin amounts of each pixel (colour deconvolution with the reference stains of
:mod:`weakstil.embed.stain`, so tiles are best stain-normalised first, the default):

* how much of the tile is tissue, hematoxylin- and eosin-rich, and eosin-rich with few nuclei
  (stroma-like);
* nuclei found as blobs of hematoxylin in a difference-of-Gaussians scale space (5 scales, about
  2–9 µm across), counted per scale and by darkness: small round dark nuclei are lymphocyte-like,
  large ones tumour-like;
* where they are: small nuclei counted inside stroma-like areas (the numerator of sTIL%) and
  inside crowded large-nucleus areas (tumour nests, the confounder), each over the area it sits in;
* ``lymph_per_stroma`` (strict, loose) and ``lymph_per_nest``: the share of the estimated stroma
  (below) that is lymphocyte (:func:`lymphocyte_area`: cores of dark hematoxylin, H ≥ 1.0, grown
  to the nucleus's edge since v10), i.e. the tile's sTIL% read from its pixels,
  and the same share inside nests. Per-tile Pearson r with the true tile sTIL% (tiles ≥ 25 % stroma):
  lattice 1.00 / 0.99, cells 0.88 / 0.62–0.79 (standard / hard; strict–loose); the slide ratio
  Σ dark-in-stroma / Σ stroma has r 1.00 / 0.96 / 0.99 / 0.87 with the slide truth (10 slides each;
  v4); v5 on 40-slide cohorts (docs/accuracy.md, seventeenth run): lattice 1.00 / 0.95, cells
  0.90 / 0.72 (strict);
* ``lymph_per_stroma_sized``: the same share, but nuclei wide enough to hold a 9 × 9 µm square are
  taken for tumour nuclei whatever their darkness (left out of the lymphocytes, and marking nests
  with the pale ones). Darkness alone counts hyperchromatic tumour nuclei as lymphocytes
  (``weakstil synth --setting dark-nuclei``: per-tile r 0.66 → 0.83, 40 slides); this one misses
  lymphocytes piled into sheets (lattice: r 0.53). Neither is right everywhere, so it comes first in
  the measured block and training chooses out of fold between the five measurements and the four
  without it (:mod:`weakstil.mil.select`);
* ``stroma_est`` (last): the share of the tile that is solid tissue outside tumour nests, nests being
  neighbourhoods (8 µm) where at least a quarter of the pixels are pale, vesicular nucleus (H 0.15–0.8
  in runs at least 3 µm wide, :func:`pale_nuclei`: the blurred rims of packed lymphocytes pass
  through that range too; lymphocytes are darker, stroma has few nuclei), and solid meaning at least
  :data:`SOLID` of the neighbourhood is tissue: fat's thin septa and the faint tints inside its
  cells pass the tissue threshold but are not stroma (v6; per unit of area the estimate counted
  fat as 0.36 of stroma on cells-hard, now 0.07; docs/accuracy.md, nineteenth run). It is not fed to a
  pathologist as a measurement: the MIL uses it to keep tiles with little stroma out of the "highest
  sTIL%" ranking (sTIL% is defined on stroma). Pearson r with the true stroma fraction per tile (40
  slides each, v6): lattice 0.99 / 0.84, cells 0.96 / 0.87 (standard / hard settings),
  hyperchromatic nests 0.68 (docs/accuracy.md);
* the same five under the **wide nest rule** (``*_wide``, just before them; v7): nests marked by
  nuclei of H 0.15–1.2 (:data:`WIDE_PALE`), not 0.8. Tumour nuclei with clumped, moderately dense
  chromatin (``weakstil synth --family regions``) are too dark for the pale band, and the pale rule
  reads 0.67–0.80 of their tumour as stroma; the wide rule reads blurred lymphocyte crowds as nests
  instead (cells, hard setting). Neither is right everywhere, so both are measured and training
  chooses out of fold (:mod:`weakstil.mil.select`: ``measured-wide``, ``measured-dark-wide``;
  docs/accuracy.md, twenty-second run);
* both nest rules count their nest-marking nuclei over the neighbourhood's tissue that is **not
  lymphocyte** (v8; :func:`lymphocyte_room`: hematoxylin darker than the rule's nest nuclei, grown
  2 µm over the rims). A nest crowded with intratumoral lymphocytes has as many pale nuclei per unit
  of tumour as an empty one but fewer per unit of tissue, and v7 read it as stroma full of
  lymphocytes: tumour tiles' stroma estimate fell 0.30 → 0.22 (pale rule; fresh voronoi-hard cohort),
  0.26 → 0.14 (lattice-hard), 0.15 → 0.10 (cells-hard). Pearson r of the slide's Σ dark-in-stroma /
  Σ stroma with the truth (40 slides), v7 → v8: pale rule 0.77 → 0.84 (fresh voronoi-hard), 0.75 →
  0.83 (voronoi-hard), 0.95 → 0.98 (lattice-hard), 0.76 → 0.75 (cells-hard), 0.95 → 0.94
  (regions-standard); wide rule 0.83 → 0.89, 0.54 → 0.81 (cells-hard), 0.96 → 0.98, 0.69 → 0.71
  (regions-hard), but 0.98 → 0.95 on regions-standard (its tile r with the true stroma 0.91 → 0.82:
  clumps of its tumour chromatin pass H 1.2). docs/accuracy.md, twenty-sixth run;
* the wide rule also takes :func:`big_nuclei` (wide enough to hold a 9 × 9 µm square) for nest nuclei
  whatever their darkness, and never for the lymphocytes' room (v9): hyperchromatic tumour nuclei are as
  dark as lymphocytes, and the rule read their nests as stroma full of lymphocytes. Tumour tiles'
  stroma estimate under the wide rule (40 slides, v8 → v9): hyperchromatic nests (``cells --setting
  dark-nuclei``) 0.35 → 0.09, regions-hard 0.35 → 0.13, regions-standard 0.25 → 0.20; its tile r with
  the true stroma 0.82 → 0.91, 0.59 → 0.75, 0.82 → 0.83; but lattice's lymphocyte sheets, striped into
  bands a nucleus wide, now read partly as nests (0.99 → 0.68): the pale rule is unchanged and training
  chooses between them out of fold. docs/accuracy.md, twenty-seventh run;
* a lymphocyte counts with its whole nucleus (v10, :func:`lymphocyte_area`): up to v9 only its pixels of
  H ≥ 1.0, which on three of the four synthetic families is about half the nucleus — the rest of it
  is paler body and blurred edge — so the pixel-read sTIL% was half the true one there and the whole
  one on `lattice`, whose lymphocytes are solid: every family had its own scale, and a model trained on
  one misread the others. Slope of the true slide sTIL% on the read one (pale rule; 1 is the same scale),
  v9 → v10 (tiles re-read, 40 slides each):
  lattice-standard 1.05 → 0.99, cells-standard 1.87 → 1.29, regions-standard 2.50 → 1.48, voronoi-standard
  2.55 → 1.44, cells-hard 1.30 → 1.02, voronoi-hard 2.15 → 1.21, regions-hard 1.17 → 0.81.
  Cross-family transfer (24 directions, R² ≥ 0.8): 7 → 13. A lymphocyte blurred by a σ of 1 µm
  reads up to 1.6 times its drawn area. docs/accuracy.md, twenty-eighth run;
* the wide rule reads its room on hematoxylin blurred by 1 µm (v11, :func:`lymphocyte_room`): specks
  of clumped tumour chromatin make no room for lymphocytes. docs/accuracy.md, thirtieth run;
* the wide rule counts its nest nuclei over at least half the neighbourhood (v12,
  :data:`WIDE_MIN_ROOM`): in a dense lymphocyte sheet the room leaves a sliver of tissue, made of the
  sheet's faint lymphocytes and rims, and a few of them over that sliver made the sheet a nest
  (regions-hard: every slide above 38 % sTIL). Tile r of the wide stroma estimate with the true stroma,
  v11 → v12: regions-standard 0.85 → 0.91, voronoi-standard 0.81 → 0.85, voronoi-hard 0.75 → 0.78;
  voronoi-standard's worst top tiles 47 → 53 % stroma; cross-family transfer ≥ 0.8: 12 → 15 of 24.
  docs/accuracy.md, thirty-fourth run.

It returns :data:`N_FEATURES` numbers per tile on scales of about one (fractions, concentrations,
``log1p`` densities), costs a few Gaussian blurs per tile at 1 µm/px (12 % of an fp32 ResNet-18 pass
when first written; with the context and nest rules added since, and the ResNet in bf16, about half
of it: 0.30 s against 0.61 s per 32 tiles on a 2-core Xeon, 2026-12-06; since the blurs run as matrix
products, 4.7 against 12.1 ms a tile on a 2-core EPYC, 2026-12-07), and has no weights: the same
numbers on every machine. Use it alone (``--encoder stainmorph``) or
beside a network (``resnet18-random+stainmorph``: both feature sets side by side).

Thresholds are in the reference stain's concentration units (its 99th percentiles are
H 1.97, E 1.03) and pixel scales assume the default 0.5 µm/px tiles.
"""

from __future__ import annotations

import functools
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
NEST = 1 / 1600  # large nuclei per px (one per 400 µm², cells 20 µm apart) from which a neighbourhood is a nest
PALE = (0.15, 0.8)  # H concentration of a pale (vesicular, tumour-like) nucleus; lymphocytes are darker
WIDE_PALE = 1.2  # the wide nest rule's upper bound: moderately dense, clumped tumour chromatin marks nests too
PALE_WIDTH = 3  # px at 1 µm/px: pale runs narrower than this are lymphocyte rims and seams, not nuclei
PALE_NEST = 0.25  # share of pale-nucleus pixels in the neighbourhood from which it is a tumour nest
SOLID = 0.8  # share of tissue in the neighbourhood from which a pixel can be stroma (fat's septa and tints: less)
PALE_NEST_LOOSE = 0.35  # the same, tolerating nests crowded with dark lymphocytes (hard settings)
LYMPH_H = 1.0  # H concentration of a lymphocyte's dark, dense chromatin (stroma and pale nuclei stay below)
ROOM_GROW = 2  # px at 1 µm/px: lymphocytes are grown by 2 µm before the nest rules count the rest of the tissue
ROOM_SIGMA = 1.0  # px at 1 µm/px: the wide rule's room is grown from the H blurred this much (v11): specks fade
LYMPH_EDGE = 0.25  # H at a lymphocyte's blurred edge: its dark core grown to here is the lymphocyte's area
LYMPH_GROW = 2  # px at 1 µm/px: how far a dark core is grown toward that edge
MIN_ROOM = 0.05  # the floor of that tissue's neighbourhood share (a neighbourhood of lymphocytes only is not a nest)
# the wide rule's floor (v12): nest nuclei count over at least half the neighbourhood, so where lymphocytes
# take more than half of it, the faint ones and the rims its darkness band (H < 1.2) lets through are a share
# of half the neighbourhood, not of a sliver: a lymphocyte sheet is stroma full of lymphocytes, not a nest
WIDE_MIN_ROOM = 0.5
NUCLEUS_H = 0.5  # H concentration inside any nucleus, pale or dark (for the size-aware share)
BIG = 9  # px at 1 µm/px: a nucleus holding a 9 × 9 µm square (about 13 µm across and wider) is a tumour's, never a lymphocyte's
POOL = 2  # nuclei and context are found on the amounts averaged 2 × 2 (1 µm/px): 4× less to filter
# the measured block: sTIL% read from the pixels (sized, strict, loose), inside nests, and stroma_est
MEASURED = ("lymph_per_stroma_sized", "lymph_per_stroma", "lymph_per_stroma_loose", "lymph_per_nest", "stroma_est")
NAMES = (
    "tissue", "h_mean", "e_mean", "h_sd", "e_sd", "h_rich", "e_rich", "stroma_like",
    *(f"nuclei_s{i}" for i in range(len(SIGMAS))), *(f"dark_nuclei_s{i}" for i in range(len(SIGMAS))),
    "small_in_stroma", "small_in_nests", "small_per_stroma", "small_share", "nest_like", "small_contrast",
    # the measured block under the wide nest rule (v7): nests marked by nuclei of H 0.15–1.2
    *(f"{name}_wide" for name in MEASURED),
    *MEASURED,  # last, always: read by position (weakstil.embed.encoders.MEASURED_DIM, STROMA_COLUMN)
)
N_FEATURES = len(NAMES)


def _max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """The max over a (2r+1) × (2r+1) window of each pixel of ``x`` (..., H, W), as shifted maxima
    along each axis (several times faster than max_pool2d with stride 1 on a CPU)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (r, r, 0, 0), value=-math.inf)
    m = p[..., :w]
    for i in range(1, 2 * r + 1):
        m = torch.maximum(m, p[..., i:i + w])
    p = F.pad(m, (0, 0, r, r), value=-math.inf)
    m = p[..., :h, :]
    for i in range(1, 2 * r + 1):
        m = torch.maximum(m, p[..., i:i + h, :])
    return m


@functools.lru_cache(maxsize=128)
def blur_operator(n: int, sigma: float, pad: int, mode: str) -> np.ndarray:
    """(n, n) float64: the Gaussian blur of σ ``sigma`` px along one axis of ``n`` pixels, as
    :func:`gaussian_blurs` applies it — the axis padded by ``pad`` px (``mode`` ``reflect`` or
    ``replicate``), circularly convolved with the periodic Gaussian of that padded length (its transfer
    function ``exp(−2π²σ²f²)``), cropped back; row i holds the weights output pixel i gives each input
    pixel. The 2-D blur is separable, so ``A_h @ x @ A_wᵀ`` is the same operator as one 2-D FFT."""
    eye = np.pad(np.eye(n), ((pad, pad), (0, 0)), mode="reflect" if mode == "reflect" else "edge")
    f = np.fft.rfftfreq(n + 2 * pad)
    transfer = np.exp(-(f ** 2) * (2 * math.pi ** 2) * sigma * sigma)[:, None]
    return np.fft.irfft(np.fft.rfft(eye, axis=0) * transfer, n=n + 2 * pad, axis=0)[pad:pad + n]


@functools.lru_cache(maxsize=256)
def _operator_tensor(n: int, sigma: float, pad: int, mode: str, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """:func:`blur_operator` as a tensor on ``device``, made once (not copied to the device on every
    batch); an ordinary tensor even when first asked for under ``torch.inference_mode``."""
    with torch.inference_mode(False):
        return torch.as_tensor(blur_operator(n, sigma, pad, mode), dtype=dtype, device=device)


def gaussian_blurs(x: torch.Tensor, sigmas, *, ratio: float | None = None) -> list[torch.Tensor]:
    """``x`` (B, C, H, W) blurred with a Gaussian of each of ``sigmas`` (px) — or, with ``ratio``,
    the difference of Gaussians ``G(σ) − G(ratio · σ)``. The image is padded by reflection (3 σ of
    the widest; by replication where the tile is narrower than that) and blurred periodically, which
    keeps the borders unbiased; the blur is separable, so it runs as two matrix products with each
    axis's :func:`blur_operator` (built once per size and σ). Same operator as the 2-D FFT it replaced
    (largest difference 1e-6 on [0, 1] inputs) and 3–5× faster on a CPU at the morphometry's 112 × 112
    (the neighbourhood blur of nine maps was half of the morphometry's time); depthwise convolutions with
    long kernels are slower still."""
    pad = int(math.ceil(3 * max(sigmas) * (ratio or 1.0)))
    h, w = x.shape[-2:]
    mode = "reflect" if pad < min(h, w) else "replicate"

    def blur(s: float) -> torch.Tensor:
        rows, cols = (_operator_tensor(n, float(s), pad, mode, x.dtype, x.device) for n in (h, w))
        return rows @ x @ cols.T

    out = []
    for s in sigmas:
        y = blur(s)
        if ratio:
            y = y - blur(s * ratio)
        out.append(y)
    return out


class StainMorph(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] → (B, :data:`N_FEATURES`) stain-morphometric features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("to_conc", torch.as_tensor(np.linalg.pinv(REF_HE), dtype=torch.float32))
        self.num_features = N_FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # always in float32, whatever autocast the encoder runs under (fp16 on a GPU, bf16 on an AMX
        # CPU): thresholds must mean the same on every machine, and reduced-precision blurs would move
        # them (the FFTs these blurs replaced took neither bf16 nor, on CUDA, fp16 at most sizes)
        with torch.autocast(x.device.type, enabled=False):
            return self._features(x.float())

    def _features(self, x: torch.Tensor) -> torch.Tensor:
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
        tissue_frac, h_rich_frac, e_rich_frac = frac(tissue), frac(h_rich * tissue), frac(e_rich)

        # nuclei: maxima of the DoG scale space of the hematoxylin amount (at 1/POOL resolution;
        # every length below is in full-resolution px, divided by POOL)
        h, e_rich, tissue = (F.avg_pool2d(m, POOL) for m in (h, e_rich, tissue))
        tissue = (tissue >= 0.5).float()
        area = area / POOL ** 2
        dog = torch.cat(gaussian_blurs(h, [s / POOL for s in SIGMAS], ratio=DOG_RATIO), 1)  # (B, K, H, W)
        peak = _max_filter(dog, 1)  # a 3 × 3 × 3 max over (scale, y, x), axis by axis
        peak = torch.maximum(peak, torch.maximum(F.pad(peak[:, 1:], (0, 0, 0, 0, 0, 1), value=-math.inf),
                                                 F.pad(peak[:, :-1], (0, 0, 0, 0, 1, 0), value=-math.inf)))
        blobs = ((dog >= peak) & (dog > FAINT)).float()  # (B, K, H, W) one-pixel marks
        dark = blobs * (dog > DARK)
        small = dark[:, list(SMALL)].sum(1, keepdim=True)
        large = blobs[:, list(LARGE)].sum(1, keepdim=True)
        # context: eosin-rich neighbourhoods with few large nuclei are stroma; crowded ones are nests
        pale = pale_nuclei(h, tissue)
        wide = pale_nuclei(h, tissue, upper=WIDE_PALE)
        big = big_nuclei(h, tissue)
        # 0 on lymphocytes (darker than the rule's nest nuclei) and their rims, else 1
        room_p = 1 - lymphocyte_room(h, tissue, dark=LYMPH_H)
        # the wide rule (v9): big nuclei are tumour nuclei whatever their darkness: they mark nests and
        # are never the lymphocytes' room
        room_w = 1 - lymphocyte_room(h, tissue, dark=WIDE_PALE, blur=True) * (1 - big)
        ctx = gaussian_blurs(torch.cat([e_rich, large / (NEST * POOL ** 2), tissue, torch.maximum(pale, big),
                                        torch.maximum(wide, big), tissue * room_p, pale * room_p, tissue * room_w,
                                        torch.maximum(wide, big) * room_w], 1), [CONTEXT_SIGMA / POOL])[0]
        solid = tissue * (ctx[:, 2:3] >= SOLID).float()  # stroma is solid tissue: not fat's septa and tints
        stroma = ((ctx[:, :1] > 0.3) & (ctx[:, 1:2] < 1)).float() * tissue
        nests = (ctx[:, 1:2] >= 1).float() * tissue
        # the measured block twice: nests marked by pale nuclei (H below 0.8), and by the wide band, each
        # counted over the neighbourhood's tissue that is not lymphocyte (v8)
        nest_ctx = {rule: ctx[:, i + 1:i + 2] / ctx[:, i:i + 1].clamp(min=floor)
                    for rule, i, floor in (("pale", 5, MIN_ROOM), ("wide", 7, WIDE_MIN_ROOM))}
        # lymphocyte pixels (v10: whole nuclei), found once for both rules; the size-aware share's
        # leave the big nuclei out
        lymph = (lymphocyte_area(h, tissue), lymphocyte_area(h, tissue * (1 - big)))
        measured = {rule: measured_block(lymph, tissue, solid, nest_ctx[rule], ctx[:, j:j + 1], area)
                    for rule, j in (("pale", 3), ("wide", 4))}
        n_small, n_large = small.flatten(1).sum(1), large.flatten(1).sum(1)
        in_stroma = (small * stroma).flatten(1).sum(1)
        in_nests = (small * nests).flatten(1).sum(1)
        stroma_px = stroma.flatten(1).sum(1)
        contrast = (dog[:, list(SMALL)].amax(1, keepdim=True) * small).flatten(1).sum(1) / n_small.clamp(min=1)
        dens = AREA / POOL ** 2 / area
        feats = [
            tissue_frac, h_mean, e_mean, h_sd, e_sd, h_rich_frac, e_rich_frac, frac(stroma),
            *torch.log1p(blobs.flatten(2).sum(2) * dens).unbind(1), *torch.log1p(dark.flatten(2).sum(2) * dens).unbind(1),
            torch.log1p(in_stroma * dens), torch.log1p(in_nests * dens),
            torch.log1p(in_stroma * dens * area / stroma_px.clamp(min=area / 20)),
            n_small / (n_small + n_large).clamp(min=1), frac(nests), contrast,
            *measured["wide"], *measured["pale"],  # the pale rule's last: its stroma_est is the last column
        ]
        return torch.stack(feats, 1)


def measured_block(lymph, tissue, solid, nest_ctx, big_ctx, area) -> list:
    """The :data:`MEASURED` numbers under one nest rule: ``lymph`` the :func:`lymphocyte_area` of the
    tile and of the tile without its :func:`big_nuclei`; ``nest_ctx`` the neighbourhood share of the
    rule's nest-marking nuclei (of the tissue outside the :func:`lymphocyte_room`, v8), ``big_ctx`` the
    pale ones' with the big nuclei added (of all the tissue, as in v7)."""
    est_stroma = [solid * (nest_ctx <= PALE_NEST).float(), solid * (nest_ctx <= PALE_NEST_LOOSE).float(),
                  tissue * (nest_ctx > PALE_NEST).float()]
    strict, loose, nest_share = lymph_shares(lymph[0], est_stroma, area)
    return [sized_lymph_share(lymph[1], solid, big_ctx, area), strict, loose, nest_share,
            est_stroma[0].flatten(1).mean(1)]  # stroma_est: solid tissue outside the rule's nests


def lymph_shares(lymph, regions, area) -> list:
    """sTIL% of the tile as read from its pixels: the share of each region (the estimated stroma,
    strict and loose, and the nests: intratumoral lymphocytes, the confounder for the head to
    subtract) that is lymphocyte (``lymph``: :func:`lymphocyte_area`). Each area is floored at 1/20 of
    the tile so that a sliver of stroma cannot give a ratio near 1."""
    return [(lymph * r).flatten(1).sum(1) / r.flatten(1).sum(1).clamp(min=area / 20) for r in regions]


def lymphocyte_area(h, tissue):
    """Pixels of lymphocyte (v10): the dark cores (H ≥ :data:`LYMPH_H`) grown by :data:`LYMPH_GROW` px
    within H ≥ :data:`LYMPH_EDGE` — the whole nucleus, as sTIL% counts it, not its darkest part.
    Specks of dark chromatin in a tumour nucleus grow with the rest (growing only cores 3 µm wide read
    the tiles a little better but lost the standard settings' margins and cross-family transfer in the
    benchmark: docs/accuracy.md, twenty-ninth run)."""
    core = (h >= LYMPH_H).float() * tissue
    return _max_filter(core, LYMPH_GROW) * (h >= LYMPH_EDGE).float() * tissue


def lymphocyte_room(h, tissue, *, dark: float = LYMPH_H, blur: bool = False):
    """Pixels of lymphocyte-dark hematoxylin (H ≥ ``dark``: :data:`LYMPH_H` for the pale rule,
    :data:`WIDE_PALE` for the wide one, whose nest nuclei reach H 1.2) grown by :data:`ROOM_GROW` px
    over their blurred rims: the room lymphocytes take. The nest rules count nest-marking nuclei over the
    neighbourhood's tissue *outside* it (v8): a tumour nest crowded with intratumoral lymphocytes has
    as many pale nuclei per unit of tumour as an empty one, but fewer per unit of tissue, and read as
    stroma full of lymphocytes (hard settings: tumour tiles' stroma estimate 0.26 → 0.14 on
    lattice-hard; regions-hard's R² 0.41 → 0.62; docs/accuracy.md, twenty-sixth run). Stroma keeps
    few pale nuclei whatever its lymphocytes, since their rims are inside the room and left out.
    With ``blur`` (the wide rule's room, v11) the darkness is read on the H blurred by
    :data:`ROOM_SIGMA`: the clumped chromatin the wide rule looks for reaches lymphocyte darkness in
    specks a micrometre or two across, which fade, while a lymphocyte's core (4 µm and wider) stays
    dark. Grown by :data:`ROOM_GROW`, the specks took the whole nucleus out of the count, so a crowded
    nest of such nuclei read as stroma (regions-standard: tumour tiles' wide stroma estimate 0.20 →
    0.14, per-tile r with the true stroma 0.83 → 0.85). Blurring the pale rule's room as well gained as
    much in the benchmark's CVs but lost cross-family transfer (docs/accuracy.md, thirtieth to
    thirty-second runs)."""
    if blur:  # the wide rule's (v11): specks of chromatin fade, lymphocytes' cores stay
        h = gaussian_blurs(h, [ROOM_SIGMA])[0]
    return _max_filter((h >= dark).float() * tissue, ROOM_GROW)


def pale_nuclei(h, tissue, *, upper: float = PALE[1]):
    """Pixels of pale, vesicular nucleus (H in :data:`PALE`) at least :data:`PALE_WIDTH` px across: a
    morphological opening. A blurred lymphocyte's rim and the seams between lymphocytes packed side
    by side also pass through the pale range, one or two µm wide; counted as pale nucleus they made
    a lymphocyte crowd a "tumour nest" with no stroma, so a slide of 71 % sTIL read 4 % (docs/accuracy.md,
    fourteenth run). A tumour nucleus's pale interior is 5 µm across and more. With rims and seams
    gone, the band starts at H 0.15 (was 0.25): faint tumour nuclei mark their nests too (per-tile r
    of the stroma estimate with the true stroma, 40 slides: cells-standard 0.88 → 0.95, cells-hard
    0.81 → 0.85, lattice-hard 0.77 → 0.85, lattice-standard 0.99; seventeenth run). ``upper``
    :data:`WIDE_PALE` gives the wide nest rule's nuclei (v7)."""
    pale = ((h >= PALE[0]) & (h < upper)).float() * tissue
    r = PALE_WIDTH // 2
    return _max_filter(-_max_filter(-pale, r), r)


def big_nuclei(h, tissue):
    """Pixels of nuclei (H ≥ :data:`NUCLEUS_H`, pale or dark) wide enough to hold a :data:`BIG`-px
    square — a morphological opening, grown by a pixel over the rim: no lymphocyte is that wide."""
    r = BIG // 2
    nucleus = (h >= NUCLEUS_H).float() * tissue
    eroded = -_max_filter(-nucleus, r)
    return _max_filter(_max_filter(eroded, r), 1)


def sized_lymph_share(lymph, solid, big_ctx, area):
    """The lymphocyte share of the estimated stroma that does not take dark *large* nuclei for
    lymphocytes: the :func:`big_nuclei` are tumour nuclei whatever their darkness — left out of the
    lymphocytes and, with the pale nuclei (``big_ctx``: their share blurred over the neighbourhood),
    marking the nests. Where tumour nuclei are hyperchromatic (``weakstil synth --setting
    dark-nuclei``) the darkness-only shares count them as lymphocytes; where lymphocytes pile up into
    sheets (dense aggregates) this one misses them: training chooses out of fold (docs/accuracy.md,
    tenth run). ``lymph`` is the :func:`lymphocyte_area` of the tissue outside the big nuclei (cores
    outside them, grown, never into them); its stroma, like the estimate's, is ``solid`` tissue
    (:data:`SOLID`)."""
    stroma = solid * (big_ctx <= PALE_NEST).float()
    return (lymph * stroma).flatten(1).sum(1) / stroma.flatten(1).sum(1).clamp(min=area / 20)


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
