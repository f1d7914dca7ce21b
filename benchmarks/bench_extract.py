"""Extract case: end-to-end tiles/s vs the encoder alone; pipeline efficiency = their ratio.

* **end-to-end** — :func:`weakstil.extract.embed_tiles` with the default :class:`ExtractOptions`
  (DataLoader workers reading blocks through weakstil's reader, the encoder on ``device``), writing
  into a :class:`weakstil.cache.FeatureCache` slide group, as ``weakstil extract`` does.
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

    from weakstil.encoders import RANDOM_INIT, create_encoder, get_encoder_spec, register_encoder
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


def run(mode, device: str = "cpu") -> list[Row]:
    import torch

    from weakstil.cache import FeatureCache
    from weakstil.extract import ExtractOptions, TileEmbedder, default_workers, embed_tiles, resolve_device
    from weakstil.reader import read_block_tiles
    from weakstil.slide import open_slide

    device = resolve_device(device)
    path = synthetic_slide(0.25, mode.slide_um)
    coords, size_l0, all_blocks = slide_tiles(path)
    rows: list[Row] = []
    for key, n_wanted in mode.extract_tiles.items():
        blocks, n = first_blocks(all_blocks, n_wanted)
        coords_n = coords[: n]
        with open_slide(path) as slide:
            tiles = torch.from_numpy(np.concatenate([
                read_block_tiles(slide, b, coords, size_l0=size_l0, tile_px=TILE_PX) for b in blocks]))
        if device.startswith("cuda"):
            tiles = tiles.pin_memory()
        encoder = make_encoder(key)
        embedder = TileEmbedder(encoder, device)
        opts = ExtractOptions(device=device, batch_size=mode.extract_batch, progress=False)
        embedder(tiles[: opts.batch_size])  # warm-up (oneDNN / cuDNN kernels)

        def forward_only():
            for start in range(0, n, opts.batch_size):
                embedder(tiles[start : start + opts.batch_size])

        with tempfile.TemporaryDirectory(prefix="weakstil-bench-extract-") as tmp:
            cache = FeatureCache.open(Path(tmp), encoder.fingerprint(), {"bench": key, "tile_px": TILE_PX})

            def end_to_end():
                with cache.slide_writer("bench", coords_n, embedder.embed_dim,
                                        {"slide_mpp": 0.25, "tile_size_l0": size_l0}) as writer:
                    done = embed_tiles(path, coords_n, blocks, size_l0, TILE_PX, embedder, writer.write, opts)
                assert done == n, (done, n)

            secs = best_of({"forward": forward_only, "e2e": end_to_end}, mode.extract_rounds)
        fwd, e2e = n / secs["forward"], n / secs["e2e"]
        workers = opts.workers if opts.workers is not None else default_workers(device)
        is_target = key == "resnet18" and device == "cpu"
        rows.append(Row("extract", f"{key} end-to-end ({device}, {workers} reader worker(s), batch {opts.batch_size})",
                        e2e, "tiles/s", "encoder forward only, preloaded tiles", fwd, e2e / fwd,
                        "≥ 0.9×" if is_target else "", (e2e / fwd >= 0.9) if is_target else None,
                        extra={"tiles": n, "threads": torch.get_num_threads(),
                               "seconds": {k: round(v, 3) for k, v in secs.items()}}))
        del embedder, encoder
    return rows
