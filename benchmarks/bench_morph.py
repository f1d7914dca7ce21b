"""The stain morphometry's own readings against the synthetic truth, before any training (``--only morph``).

A change to :mod:`weakstil.embed.morph` means re-extracting every cache before the accuracy benchmark
can judge it (about 40 minutes on two cores). This case judges the readings first: for each cohort
of the accuracy benchmark (prepared as ``--only accuracy`` prepares them, in the same folder), it
re-renders the cached tiles — coordinates, tile size and the slide's stain estimate come from the
cache — and computes **this working tree's** morphometry on them (the morphometry alone: about a
second per 32 tiles), beside the numbers the cache holds (the version it was extracted with). Per
nest rule (``pale``: the last five columns; ``wide``: the five before them, ``stainmorph.v7`` on):

* ``stroma_r``: Pearson r of the tile's ``stroma_est`` with its true stroma fraction;
* ``est_on_tumour``: the mean ``stroma_est`` of tiles at least 70 % tumour (0 is right);
* ``slide_r``: Pearson r of the slide's Σ ``lymph_per_stroma`` × ``stroma_est`` / Σ ``stroma_est``
  (its sTIL% as the pixels read it, before any model) with the true sTIL%.

Each row's value is the working tree's, its reference the cache's; on an unchanged morphometry the
two agree to the cache's float16 rounding. docs/pitfalls.md ("a share is only as good as its
denominator") tells how the twenty-sixth run's rule was chosen this way.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from weakstil.embed.encoders import MEASURED_DIM
from weakstil.embed.morph import MEASURED

from .common import Row

# the measured blocks' columns: the pale rule's last, the wide rule's just before it (encoders.WIDE_ARCHS)
RULES = {"pale": slice(-MEASURED_DIM, None), "wide": slice(-2 * MEASURED_DIM, -MEASURED_DIM)}
SHARE, STROMA = MEASURED.index("lymph_per_stroma"), MEASURED.index("stroma_est")  # within a block
TUMOUR_TILE = 0.7  # tiles at least this much tumour: their stroma estimate should be near 0


def _tiles(path: Path, slide_id: str, cached) -> np.ndarray:
    """The cached slide's tiles as the extractor saw them: (N, px, px, 3) uint8, stain-normalised."""
    import torch

    from weakstil.embed.stain import StainEstimate, normalize_tiles
    from weakstil.wsi.reader import plan_blocks, read_block_tiles
    from weakstil.wsi.slide import open_slide

    coords = np.asarray(cached.coords_l0)
    size, px = float(cached.attrs["tile_size_l0"]), int(cached.attrs["tile_px"])
    source = Path(cached.attrs.get("source_path") or next(path.glob(f"slides/{slide_id}.*")))
    if not source.exists():  # the cohort folder moved since extraction
        source = next(path.glob(f"slides/{slide_id}.*"))
    with open_slide(source) as slide:
        order, blocks = plan_blocks(coords, size)
        tiles = np.empty((len(coords), px, px, 3), np.uint8)
        for block in blocks:
            tiles[order[block.index]] = read_block_tiles(slide, block, coords[order], size_l0=size, tile_px=px)
    estimate = StainEstimate.from_attrs(cached.attrs.get("stain"))
    if estimate is not None:
        tiles = normalize_tiles(torch.as_tensor(tiles), estimate).numpy()
    return tiles


def morph_now(tiles: np.ndarray, *, batch: int = 64) -> np.ndarray:
    """This working tree's morphometry on uint8 tiles (N, px, px, 3) → (N, N_FEATURES) float32."""
    import torch

    from weakstil.embed.morph import StainMorph

    morph = StainMorph()
    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            x = torch.as_tensor(tiles[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            out.append(morph(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _r(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")


def figures(stroma_est, lymph_share, true_stroma, true_tumour, slide_of, slide_truth) -> dict:
    """The three figures of one nest rule (module docstring) from per-tile arrays; ``slide_of`` (N,)
    indexes ``slide_truth``."""
    est, share = np.clip(np.asarray(stroma_est, float), 0, 1), np.asarray(lymph_share, float)
    tumour = np.asarray(true_tumour, float) >= TUMOUR_TILE
    n = len(slide_truth)
    num = np.bincount(slide_of, weights=share * est, minlength=n)
    den = np.bincount(slide_of, weights=est, minlength=n)
    read = np.where(den > 0, 100 * num / np.maximum(den, 1e-9), 0.0)
    return {"stroma_r": _r(est, true_stroma),
            "est_on_tumour": float(est[tumour].mean()) if tumour.any() else float("nan"),
            "slide_r": _r(read, slide_truth)}


def cohort_figures(path: Path) -> dict:
    """``{source: {rule: figures}}`` for one prepared cohort folder; ``source`` is ``cache`` (the
    extracted version) and ``now`` (this working tree's morphometry on the same tiles)."""
    from weakstil.embed.cache import FeatureCache
    from weakstil.embed.encoders import MORPH_DIM, has_wide_columns
    from weakstil.mil.labels import read_labels
    from weakstil.synth.truth import load_truth, tile_truth

    from .bench_accuracy import features_dir

    cache = FeatureCache.find(features_dir(path))
    wide_cached = has_wide_columns(cache.encoder_fp)
    ids = [s for s in read_labels(path / "labels.csv").df["slide_id"] if s in set(cache.complete_ids())]
    cols = {"cache": [], "now": []}
    stroma, tumour, slide_of, truth = [], [], [], []
    start = time.perf_counter()
    for i, sid in enumerate(ids):
        cached = cache.read(sid)
        cols["cache"].append(np.asarray(cached.features, np.float32)[:, -MORPH_DIM:])
        cols["now"].append(morph_now(_tiles(path, sid, cached)))
        maps = load_truth(path / "truth" / f"{sid}.npz")
        t = tile_truth(maps, cached.coords_l0, float(cached.attrs["tile_size_l0"]), float(cached.attrs["slide_mpp"]))
        stroma.append(t["stroma_fraction"])
        tumour.append(t["tumour_fraction"])
        slide_of.append(np.full(len(t["stroma_fraction"]), i))
        truth.append(float(maps["stil"]))
        last = i + 1 == len(ids)
        if last or sys.stderr.isatty():  # written to a file: one line per cohort, not a line of updates
            rate = (i + 1) / max(time.perf_counter() - start, 1e-9)
            print(f"[morph] {path.name}: {i + 1}/{len(ids)} slides, {rate:.2f} slides/s", file=sys.stderr,
                  end="\n" if last else "\r", flush=True)
    stroma, tumour, slide_of = (np.concatenate(a) for a in (stroma, tumour, slide_of))
    out = {}
    for source, blocks in cols.items():
        f = np.concatenate(blocks)
        out[source] = {}
        for rule, cut in RULES.items():
            if rule == "wide" and source == "cache" and not wide_cached:
                continue  # a cache older than the wide rule
            block = f[:, cut]
            out[source][rule] = figures(block[:, STROMA], block[:, SHARE], stroma, tumour, slide_of, np.array(truth))
    return out


def run(mode, device: str) -> list[Row]:
    """Every cohort the accuracy benchmark judges (prepared and extracted first where missing)."""
    from .bench_accuracy import PLANS, cohort_plan, prepare_one
    from .common import bench_dir

    plan = PLANS[mode.name]
    root = bench_dir() / f"accuracy-{mode.name}"
    rows = []
    for family, setting, new, n in cohort_plan(plan):
        path = prepare_one(root, plan, family, setting, new, n)
        got = cohort_figures(path)
        for rule, now in got["now"].items():
            ref = got["cache"].get(rule, {})
            for name, value in now.items():
                rows.append(Row("morph", f"{path.name} {rule} {name}", value, "", "cache" if ref else "",
                                ref.get(name), None, "", None, ""))
    return rows
