"""Precision case: the encoder's forward in fp32, bf16 autocast and ``torch.compile``, same tiles.

Rates (tiles/s over two batches, best of three interleaved rounds) against fp32, and what each does
to the features: cosine similarity of every tile's feature vector with fp32's (mean and minimum), as
stored (float16). On a GPU the comparison is fp16 (the default there) vs fp32.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .bench_read import TILE_PX, slide_tiles
from .common import Row, synthetic_slide

ROUNDS = {"full": 3, "quick": 2, "smoke": 1}


def cosines(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    ref, other = ref.astype(np.float64), other.astype(np.float64)
    return np.sum(ref * other, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(other, axis=1) + 1e-12)


def run(mode, device: str = "cpu") -> list[Row]:
    import copy

    import torch

    from weakstil.embed.extract import TileEmbedder, cpu_flags, resolve_device
    from weakstil.wsi.reader import read_block_tiles
    from weakstil.wsi.slide import open_slide

    from .bench_extract import make_encoder

    device = resolve_device(device)
    cuda = device.startswith("cuda")
    batch = mode.extract_batch if not cuda else 256
    path = synthetic_slide(0.25, mode.slide_um)
    coords, size_l0, blocks = slide_tiles(path)
    with open_slide(path) as slide:
        tiles = torch.from_numpy(np.concatenate([read_block_tiles(slide, b, coords, size_l0=size_l0, tile_px=TILE_PX)
                                                 for b in blocks]))
    tiles = tiles[: 2 * batch] if len(tiles) >= 2 * batch else tiles
    flags = sorted(cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512f", "amx_tile"})
    rows = []
    for key in mode.extract_tiles:
        encoder = make_encoder(key)
        low = "fp16" if cuda else "bf16"
        variants = {"fp32": TileEmbedder(encoder, device, precision="fp32"),
                    low: TileEmbedder(encoder, device, precision=low)}
        if mode.name != "smoke":  # compiling takes minutes on 2 busy cores
            variants["fp32 + compile"] = TileEmbedder(copy.deepcopy(encoder), device, precision="fp32", compile=True)
        feats, first, best = {}, {}, {k: float("inf") for k in variants}
        for name, embed in variants.items():
            t0 = time.perf_counter()
            feats[name] = np.concatenate([embed(tiles[s : s + batch]) for s in range(0, len(tiles), batch)])
            first[name] = time.perf_counter() - t0
        for _ in range(ROUNDS[mode.name]):
            for name, embed in variants.items():
                t0 = time.perf_counter()
                for s in range(0, len(tiles), batch):
                    embed(tiles[s : s + batch])
                if cuda:
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
        for name in variants:
            if name == "fp32":
                continue
            cos = cosines(feats["fp32"], feats[name])
            rows.append(Row("precision", f"{key} forward, {name} ({device}; CPU flags {', '.join(flags) or 'none'})",
                            len(tiles) / best[name], "tiles/s", "fp32 forward", len(tiles) / best["fp32"],
                            best["fp32"] / best[name],
                            note=f"feature cosine vs fp32: mean {cos.mean():.6f}, min {cos.min():.6f}",
                            extra={"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                                   "first_pass_s": round(first[name], 2), "fp32_first_pass_s": round(first["fp32"], 2),
                                   "tiles": len(tiles), "load1": os.getloadavg()[0]}))
        del variants, encoder
    return rows
