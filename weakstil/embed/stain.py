"""Per-slide stain normalisation (Macenko et al., 2009) before the encoder.

Each slide's hematoxylin and eosin vectors and stain amounts are estimated once, from a sample of
its own tissue tiles averaged over 4 × 4 pixels (:func:`estimate_slide_stain`); every tile is then mapped in
optical-density space onto a fixed reference (:func:`normalize_tiles`): concentrations of the
slide's two stains, rescaled so their 99th percentiles match the reference's, re-rendered with the
reference vectors. One 3 × 3 map per pixel in optical density, batched in torch on the encoder's device.

Why per slide and not per tile (as torchstain's normaliser does): a tile with little hematoxylin or
little eosin gives a poor stain estimate, and per-tile estimates would wash out the very thing the
model measures (a tile crowded with lymphocytes would be rescaled to look like every other tile).
A slide-wide estimate only removes what differs between slides: stain hue, amount and scanner.
Why at a quarter of the tile resolution: Macenko's extreme angles (1st/99th percentile) and the 99th
percentile of each stain's amount sit in the tails, and the tails move with a scan's sharpness: the
same synthetic tissue written at 0.25 and at 0.5 µm/px gave eosin 99th percentiles of 1.51 and
1.80 from full-resolution tiles, and features that disagreed (median mean-centred r 0.87); pixels
averaged over 4 × 4 agree (0.99; tests/test_extract.py).
Written here (about 60 lines of numpy/torch) because torchstain fits and applies per image and has
no batched apply; StainTools is unmaintained.

Pen ink (dark, or green/blue) and folds are left out of the estimate (:func:`artefact_free_pixels`).

The reference (H&E vectors and 99th-percentile concentrations) is the one used by Macenko's
reference implementation and torchstain; the transmitted light ``IO`` is 240.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IO = 240.0  # transmitted light intensity (Macenko's Io)
BETA = 0.15  # optical density below which a pixel is background (transparent)
ALPHA = 1.0  # percentile of the angle distribution taken as each stain's direction
REF_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # columns: H, E (OD per RGB)
REF_MAX_C = np.array([1.9705, 1.0308])
MIN_PIXELS = 500  # fewer stained pixels than this: no estimate
SAMPLE_PIXELS = 200_000
POOL = 4  # tiles are averaged over POOL × POOL pixels before the estimate (2 µm/px at 0.5 µm/px tiles)
# pen ink and tissue folds: pixels darker (summed OD) than ARTEFACT_OD × the median of the tiles' own
# 99th percentiles are left out of the estimate (see :func:`artefact_free_pixels`)
ARTEFACT_OD = 1.3
PEN_GROW = 2  # pooled px (8 full-resolution px, 4 µm at 0.5 µm/px): green/blue ink and its blurred edge
# a change to the estimate bumps weakstil.wsi.tiling.STAIN_VERSION (the tiling fingerprint)


@dataclass(frozen=True)
class StainEstimate:
    """One slide's stains: ``he`` (3, 2) unit OD vectors (columns H, E), ``max_c`` (2,) 99th
    percentiles of their concentrations, ``n_pixels`` stained pixels the estimate used."""

    he: np.ndarray
    max_c: np.ndarray
    n_pixels: int

    def as_attrs(self) -> dict:
        return {"method": "macenko", "he": np.round(self.he, 5).tolist(),
                "max_c": np.round(self.max_c, 5).tolist(), "n_pixels": int(self.n_pixels)}

    @classmethod
    def from_attrs(cls, attrs: dict | None) -> StainEstimate | None:
        """The estimate :meth:`as_attrs` wrote into a slide's cache attrs; None where the slide's tiles
        were not normalised (no ``he``: stain ``none``, or too few stained pixels)."""
        if not attrs or "he" not in attrs:
            return None
        return cls(np.asarray(attrs["he"], dtype=np.float64), np.asarray(attrs["max_c"], dtype=np.float64),
                   int(attrs["n_pixels"]))


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1.0) / IO)


def pooled(tiles: np.ndarray, pool: int = POOL) -> np.ndarray:
    """(B, H, W, 3) tiles averaged over ``pool`` × ``pool`` pixels (float)."""
    b, h, w, _ = tiles.shape
    h, w = h // pool * pool, w // pool * pool
    # summed along rows, then columns, in uint16 (exact for uint8 tiles; 2.7x faster than a float mean)
    x = np.asarray(tiles)[:, :h, :w]
    x = x.astype(np.uint16 if x.dtype == np.uint8 else np.float64).reshape(b, h // pool, pool, w * 3)
    return x.sum(axis=2).reshape(b, h // pool, w // pool, pool, 3).sum(axis=3) / (pool * pool)


def estimate_stain(pixels: np.ndarray, *, seed: int = 0) -> StainEstimate | None:
    """Macenko's estimate from RGB ``pixels`` (0–255, any shape ending in 3; tiles are best given
    :func:`pooled`); None when fewer than :data:`MIN_PIXELS` pixels carry stain (a blank sample)."""
    rgb = np.asarray(pixels).reshape(-1, 3)
    if len(rgb) > SAMPLE_PIXELS:
        rgb = rgb[np.random.default_rng(seed).choice(len(rgb), SAMPLE_PIXELS, replace=False)]
    od = optical_density(rgb)
    od = od[(od > BETA).all(axis=1)]
    if len(od) < MIN_PIXELS:
        return None
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [1, 2]]  # the two directions of largest variance
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100 - ALPHA])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo], axis=1)  # H absorbs more red
    he = he * np.sign(he.sum(axis=0, keepdims=True))  # optical densities are positive
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    conc, *_ = np.linalg.lstsq(he, od.T, rcond=None)
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(he)) or not np.all(max_c > 1e-6):
        return None
    return StainEstimate(he=he, max_c=max_c, n_pixels=len(od))


def artefact_free_pixels(tiles: np.ndarray) -> np.ndarray:
    """The stained pixels (N, 3) of :func:`pooled` ``tiles`` (B, h, w, 3) without pen ink and folds.

    Macenko's extreme angles and 99th percentiles sit in the tails, and a pen stroke or a fold (tissue
    lying double) fills the tails: on the synthetic cells family one black stroke moved a slide's
    hematoxylin 99th percentile from about 1.5 to 4.1 and its H vector toward grey, so every tile was
    rendered with pale nuclei. Tissue's darkest pixels (nuclei) reach about the same optical density
    in most tiles, while ink and folds are far darker than that: a pixel whose summed OD exceeds
    :data:`ARTEFACT_OD` × the median over tiles of each tile's own 99th percentile is left out.
    Coloured ink is not always darker than nuclei, but no H&E stain is green or blue: pixels of
    :func:`weakstil.wsi.tissue.pen_marks` hue, grown by :data:`PEN_GROW` pooled pixels over the
    stroke's blurred edge, are left out too. A green stroke over 1.4 % of the sampled pixels had
    tilted a slide's hematoxylin vector 26° toward the ink, so that lymphocytes were normalised
    half into eosin (docs/accuracy.md, fourteenth run: 4 of 40 cells-hard slides off by > 10°, 1
    after). A slide without artefacts keeps every pixel (none of the 64 lattice slides of the accuracy
    benchmark changed; 8 of 40 cells-standard slides did, each with a pen mark or fold).
    """
    from scipy import ndimage

    from weakstil.wsi.tissue import pen_marks

    tiles = np.asarray(tiles)
    od = optical_density(tiles)
    total = od.sum(axis=-1).reshape(len(od), -1)
    stained = (od > BETA).all(axis=-1).reshape(len(od), -1)
    p99 = [np.percentile(t[m], 99) for t, m in zip(total, stained) if m.sum() >= 50]
    keep = stained
    if p99:
        keep = stained & (total <= ARTEFACT_OD * float(np.median(p99)))
    pen = pen_marks(tiles.reshape(-1, tiles.shape[2], 3)).reshape(tiles.shape[:3])  # tiles stacked as rows
    if pen.any():
        pen = ndimage.binary_dilation(pen, structure=np.ones((1, 3, 3), bool), iterations=PEN_GROW)
        keep = keep & ~pen.reshape(len(od), -1)
    return tiles.reshape(len(od), -1, 3)[keep]


def normalize_tiles(tiles, estimate: StainEstimate):
    """uint8 tiles (B, H, W, 3) torch tensor → the same tiles rendered with the reference stains
    (uint8, same shape and device)."""
    import torch

    x = torch.as_tensor(tiles)
    device = x.device
    dtype = torch.float32
    to_conc = torch.as_tensor(np.linalg.pinv(estimate.he) * (REF_MAX_C / estimate.max_c)[:, None], dtype=dtype,
                              device=device)  # (2, 3): OD → rescaled concentrations
    ref = torch.as_tensor(REF_HE, dtype=dtype, device=device)  # (3, 2)
    od = x.to(dtype).add_(1.0).div_(IO).log_().neg_()
    out = od @ (ref @ to_conc).T  # one 3 × 3 map per pixel: the slide's OD → the reference's
    return out.neg_().exp_().mul_(IO).round_().clamp_(0, 255).to(torch.uint8)


def estimate_slide_stain(slide, coords_l0: np.ndarray, *, size_l0: float, tile_px: int,
                         max_blocks: int = 8) -> StainEstimate | None:
    """Macenko's estimate from up to ``max_blocks`` blocks of a slide's tissue tiles (``coords_l0``,
    its tile grid), spread over the slide and :func:`pooled`. Extraction and pretraining both call it,
    so one slide and tiling give one estimate."""
    from weakstil.wsi.reader import aligned_block, plan_blocks, read_block_tiles

    if len(coords_l0) == 0:
        return None
    order, blocks = plan_blocks(coords_l0, size_l0, block=aligned_block(slide, size_l0, tile_px))
    coords = np.asarray(coords_l0)[order]
    picks = np.unique(np.linspace(0, len(blocks) - 1, min(max_blocks, len(blocks))).round().astype(int))
    tiles = [read_block_tiles(slide, blocks[i], coords, size_l0=size_l0, tile_px=tile_px) for i in picks]
    return estimate_stain(artefact_free_pixels(pooled(np.concatenate(tiles))))
