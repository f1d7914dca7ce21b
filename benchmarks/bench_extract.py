"""Extract case: end-to-end tiles/s vs the encoder alone; pipeline efficiency = their ratio.

* **end-to-end** — :func:`weakstil.embed.extract.embed_tiles` with the default :class:`ExtractOptions`
  (DataLoader workers reading blocks through weakstil's reader, the encoder on ``device``), writing
  into a :class:`weakstil.embed.cache.FeatureCache` slide group, as ``weakstil extract`` does.
* **forward only** — the same :class:`TileEmbedder` (uint8 → normalise → encoder → float16) on the
  same tiles, preloaded in memory, in batches of the same size: the rate the pipeline could reach if
  reading, batching and writing were free.

Encoders are random-init (no network): ``resnet18-random`` and a random ViT-S/16
(``timm:vit_small_patch16_224``'s spec registered with ``random-init`` weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .bench_read import TILE_PX, slide_tiles
from .common import Row, best_of, synthetic_slide

VIT_NAME = "bench-vit_small_patch16_224-random"


def make_encoder(key: str):
    from dataclasses import replace

    from weakstil.embed.encoders import RANDOM_INIT, create_encoder, get_encoder_spec, register_encoder
    from weakstil.errors import UnknownEncoderError

    if key == "resnet18":
        return create_encoder("resnet18-random")
    if key == "vit_s16":
        try:
            get_encoder_spec(VIT_NAME)
        except UnknownEncoderError:
            spec = get_encoder_spec("timm:vit_small_patch16_224")
            register_encoder(replace(spec, name=VIT_NAME, weights=RANDOM_INIT, pretrained=False,
                                     description="random ViT-S/16 for benchmarks"))
        return create_encoder(VIT_NAME)
    raise ValueError(f"unknown benchmark encoder {key!r}")


def first_blocks(blocks, n_tiles: int):
    """The leading blocks holding about ``n_tiles`` tiles (whole blocks) and their tile count."""
    chosen, n = [], 0
    for block in blocks:
        if n >= n_tiles:
            break
        chosen.append(block)
        n += len(block.index)
    return chosen, n


def repeat_blocks(blocks, coords: np.ndarray, n: int, passes: int):
    """The first ``n`` tiles' blocks ``passes`` times over (rows renumbered): enough tiles to keep a
    GPU busy from a slide that is quick to synthesise. Blocks align with the slide's JPEG tiles (no
    JPEG tile is shared between blocks), so every pass decodes as much as the first."""
    from weakstil.wsi.reader import Block

    out = [Block(b.index + k * n, b.xy_l0, b.size_l0) for k in range(passes) for b in blocks]
    return out, np.tile(coords[:n], (passes, 1))


GPU_TILES = {"resnet18": 16384, "vit_s16": 16384}  # tiles per encoder on a GPU (full mode): one
# typical slide, reader start-up included
GPU_SCALE = {"full": 1.0, "quick": 0.25, "smoke": 0.01}


def run(mode, device: str = "cpu") -> list[Row]:
    from dataclasses import replace

    import torch

    from weakstil.embed.cache import FeatureCache
    from weakstil.embed.extract import (ExtractOptions, TileEmbedder, default_batch_size, default_workers, embed_tiles,
                                  resolve_device)
    from weakstil.wsi import reader
    from weakstil.wsi.reader import read_block_tiles
    from weakstil.wsi.slide import open_slide

    device = resolve_device(device)
    cache_bytes = reader.TILE_CACHE_BYTES
    path = synthetic_slide(0.25, mode.slide_um)
    coords, size_l0, all_blocks = slide_tiles(path)
    rows: list[Row] = []
    for key, n_wanted in mode.extract_tiles.items():
        blocks, n = first_blocks(all_blocks, n_wanted)
        coords_n = coords[: n]
        # More tiles than the slide holds (a GPU, or the full run's 2,048 on a CPU, so that per-slide
        # start-up weighs as on a real slide): read it over again.
        target = GPU_TILES[key] * GPU_SCALE.get(mode.name, 1.0) if device.startswith("cuda") else n_wanted
        passes = max(1, round(target / max(n, 1)))
        with open_slide(path) as slide:
            tiles = torch.from_numpy(np.concatenate([
                read_block_tiles(slide, b, coords, size_l0=size_l0, tile_px=TILE_PX) for b in blocks]))
        if device.startswith("cuda"):
            tiles = tiles.pin_memory()
        encoder = make_encoder(key)
        embedder = TileEmbedder(encoder, device)
        batch = mode.extract_batch if device == "cpu" else default_batch_size(device)
        opts = ExtractOptions(device=device, batch_size=batch, progress=False)
        for _ in range(1 if device == "cpu" else 3):
            embedder(tiles[: opts.batch_size])  # warm-up (oneDNN / cuDNN kernels, autotuning)

        def forward_only():
            for _ in range(passes):
                for start in range(0, n, opts.batch_size):
                    embedder(tiles[start : start + opts.batch_size])

        with tempfile.TemporaryDirectory(prefix="weakstil-bench-extract-") as tmp:
            cache = FeatureCache.open(Path(tmp), encoder.fingerprint(), {"bench": key, "tile_px": TILE_PX})

            run_blocks, run_coords = repeat_blocks(blocks, coords, n, passes) if passes > 1 else (blocks, coords_n)
            if passes > 1:  # every pass must decode: no decoded JPEG tiles kept from an earlier pass
                reader.TILE_CACHE_BYTES = 0

            def end_to_end(decode: str = "auto"):
                with cache.slide_writer("bench", run_coords, embedder.embed_dim,
                                        {"slide_mpp": 0.25, "tile_size_l0": size_l0}) as writer:
                    done = embed_tiles(path, run_coords, run_blocks, size_l0, TILE_PX, embedder, writer.write,
                                       replace(opts, decode=decode))
                assert done == len(run_coords), (done, len(run_coords))

            fns = {"forward": forward_only, "e2e": end_to_end}
            if device.startswith("cuda"):  # JPEG decoding on the GPU (the default there) vs on the CPU
                fns["e2e_cpu_decode"] = lambda: end_to_end("cpu")
            try:
                secs = best_of(fns, mode.extract_rounds)
            finally:
                reader.TILE_CACHE_BYTES = cache_bytes
        total = n * passes
        fwd, e2e = total / secs["forward"], total / secs["e2e"]
        workers = opts.workers if opts.workers is not None else default_workers(device)
        # targets (issue #18): ResNet-18 on a CPU >= 0.9x; on a GPU ResNet-18 >= 0.6x, ViT-S >= 0.9x
        goal = {"resnet18": 0.6, "vit_s16": 0.9}.get(key) if device.startswith("cuda") else (
            0.9 if key == "resnet18" else None)
        where = "JPEG decoded on the GPU" if device.startswith("cuda") else f"{workers} reader worker(s)"
        rows.append(Row("extract", f"{key} end-to-end ({device}, {where}, batch {opts.batch_size})",
                        e2e, "tiles/s", "encoder forward only, preloaded tiles", fwd, e2e / fwd,
                        f"≥ {goal}×" if goal else "", (e2e / fwd >= goal) if goal else None,
                        extra={"tiles": total, "passes": passes, "threads": torch.get_num_threads(),
                               "seconds": {k: round(v, 3) for k, v in secs.items()}}))
        if "e2e_cpu_decode" in secs:
            cpu_dec = total / secs["e2e_cpu_decode"]
            rows.append(Row("extract", f"{key} end-to-end, JPEG decoded on the CPU ({workers} reader processes)",
                            cpu_dec, "tiles/s", "encoder forward only, preloaded tiles", fwd, cpu_dec / fwd,
                            extra={"gpu_decode_vs_cpu_decode": e2e / cpu_dec}))
        del embedder, encoder
    return rows
