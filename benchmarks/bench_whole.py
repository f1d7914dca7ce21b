"""Whole case: extraction as users run it, beside the encoder alone and TRIDENT's pipeline shape.

For each synthetic slide (several sizes and shapes), in one run and one after the other:

* **forward only** — the :class:`TileEmbedder` on the slide's tissue tiles preloaded in memory, in
  batches of the same size: what extraction could reach if everything else were free.
* **whole command** — ``weakstil extract SLIDE`` in a new process, timed from start to exit: Python
  and torch imports, encoder creation, opening the slide, tissue mask, QC picture, grid, reading,
  encoder, cache writes.
* **forward-only command** — a fresh process that imports torch, builds the same encoder and runs
  it on as many in-memory tiles, in batches of the same size, timed from start to exit: the floor
  for any PyTorch command (Python and torch start-up, ~1.2 s on 2 cores, included).
* **in-process** — :class:`weakstil.embed.extract.SlideExtractor` on the slide (everything but the
  process start-up and encoder creation), with its per-stage seconds.
* **TRIDENT-shaped** — one OpenSlide ``read_region`` per tile (``bench_read.naive_tiles``) in a
  background thread, batches fed to the same encoder in the plain (NCHW, not ``channels_last``)
  layout, fp32: the pipeline shape TRIDENT publishes.

**Many slides**: k copies of the small slide (distinct ids) through one SlideExtractor (reader
start-up paid once) against the rate of one larger slide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bench_read import TILE_PX, naive_tiles, slide_tiles
from .common import Row, synthetic_slide

ENCODER = "resnet18-random"
# mode -> slides {label: canvas µm}, the small slide and copies for "many", the large one
WHOLE = {
    "full": {"slides": {"square ~430 tiles": (3000.0, 3000.0), "strip ~560 tiles": (7000.0, 1500.0),
                        "square ~1,700 tiles": (6000.0, 6000.0)},
             "many": ("square ~430 tiles", 8), "large": "square ~1,700 tiles"},
    "quick": {"slides": {"square ~430 tiles": (3000.0, 3000.0), "strip ~560 tiles": (7000.0, 1500.0)},
              "many": ("square ~430 tiles", 3), "large": "strip ~560 tiles"},
    "smoke": {"slides": {"tiny": (640.0, 512.0)}, "many": ("tiny", 2), "large": "tiny"},
}


class PlainEmbedder:
    """The encoder as TRIDENT runs it on a CPU: contiguous NCHW tensors, fp32, no channels_last."""

    def __init__(self, encoder):
        import copy

        import torch

        self.encoder = copy.deepcopy(encoder).eval().to(memory_format=torch.contiguous_format)

    def __call__(self, tiles):
        import torch

        with torch.inference_mode():
            return self.encoder(self.encoder.preprocess(tiles).contiguous()).numpy().astype(np.float16)


def forward_seconds(embedder, tiles, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tiles), batch):
        embedder(tiles[start : start + batch])
    return time.perf_counter() - t0


def naive_seconds(path, coords, size_l0, embedder, batch: int) -> float:
    """Naive reads in one background thread (as a DataLoader worker would), batches to ``embedder``."""
    import torch

    from weakstil.embed.extract import _thread_reader

    t0 = time.perf_counter()
    tiles = naive_tiles(path, coords, size_l0)
    starts = list(range(0, len(coords), batch))

    def read(i: int):
        return np.stack([next(tiles) for _ in range(min(batch, len(coords) - starts[i]))])

    for arr in _thread_reader(read, len(starts), depth=2):
        embedder(torch.from_numpy(arr))
    return time.perf_counter() - t0


FORWARD_ONLY = """
import sys, torch
from weakstil.embed.encoders import create_encoder
from weakstil.embed.extract import TileEmbedder
n, batch, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
embedder = TileEmbedder(create_encoder(sys.argv[4]), device)
tiles = torch.full((batch, {px}, {px}, 3), 128, dtype=torch.uint8)
for start in range(0, n, batch):
    embedder(tiles[: min(batch, n - start)])
import os
os._exit(0)  # no interpreter teardown, as `weakstil` itself ends
"""


def forward_command_seconds(n: int, device: str, batch: int) -> float:
    """A fresh process: import torch, build the encoder, embed ``n`` in-memory tiles; start to exit."""
    cmd = [sys.executable, "-c", FORWARD_ONLY.format(px=TILE_PX), str(n), str(batch), device, ENCODER]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"forward-only command failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def command_seconds(path: Path, features: Path, device: str, batch: int) -> float:
    """``weakstil extract`` in a fresh process, start to exit."""
    cmd = [sys.executable, "-m", "weakstil.cli", "extract", str(path), "--features", str(features),
           "--encoder", ENCODER, "--device", device, "--batch-size", str(batch), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"weakstil extract failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def extractor_run(extractor_factory, paths: list[Path]) -> tuple[float, int, list[dict]]:
    """(seconds, tiles, per-slide stage timings) of one SlideExtractor over ``paths`` (a fresh cache)."""
    from weakstil.embed.extract import slide_sources

    job = extractor_factory()
    try:
        t0 = time.perf_counter()
        n, stages = 0, []
        for source in slide_sources(paths):
            n += job(source)
            stages.append({k: round(v, 3) for k, v in job.timings.items()})
        return time.perf_counter() - t0, n, stages
    finally:
        job.close()


def run(mode, device: str = "cpu") -> list[Row]:
    import torch

    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import (
        ExtractOptions,
        SlideExtractor,
        TileEmbedder,
        default_batch_size,
        open_cache,
        resolve_device,
    )
    from weakstil.wsi.reader import read_block_tiles
    from weakstil.wsi.slide import open_slide
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    device = resolve_device(device)
    plan = WHOLE[mode.name]
    batch = mode.extract_batch if device == "cpu" else default_batch_size(device)
    encoder = create_encoder(ENCODER)
    embedder = TileEmbedder(encoder, device)
    plain = PlainEmbedder(encoder) if device == "cpu" else None
    spec, tissue = TileSpec(tile_px=TILE_PX, mpp=0.5), TissueParams()
    opts = ExtractOptions(device=device, batch_size=batch, progress=False)
    rows, rates = [], {}
    with tempfile.TemporaryDirectory(prefix="weakstil-bench-whole-") as tmp:
        tmp = Path(tmp)
        counter = iter(range(10**6))

        def factory():
            cache = open_cache(tmp / f"features-{next(counter)}", encoder, spec, tissue)
            return SlideExtractor(cache, embedder, spec, tissue, opts)

        embedder(torch.zeros((batch, TILE_PX, TILE_PX, 3), dtype=torch.uint8))  # warm-up
        for label, size_um in plan["slides"].items():
            path = synthetic_slide(0.25, size_um)
            coords, size_l0, blocks = slide_tiles(path)
            n = len(coords)
            with open_slide(path) as slide:
                tiles = torch.from_numpy(np.concatenate([read_block_tiles(slide, b, coords, size_l0=size_l0,
                                                                          tile_px=TILE_PX) for b in blocks]))
            fwd = forward_seconds(embedder, tiles, batch)
            del tiles
            inproc, n_in, stages = extractor_run(factory, [path])
            cmd = command_seconds(path, tmp / f"cmd-{next(counter)}", device, batch)
            fwd_cmd = forward_command_seconds(n, device, batch)
            naive = naive_seconds(path, coords, size_l0, plain, batch) if plain is not None else None
            load = os.getloadavg()[0]
            rates[label] = n_in / inproc
            shape = f"{label} ({n} tiles, {size_um[0]:g}×{size_um[1]:g} µm)"
            big = n >= 500
            rows.append(Row("whole", f"`weakstil extract` whole command, start-up included, {shape}", n / cmd,
                            "tiles/s", "encoder forward only, preloaded tiles, in a warm process", n / fwd,
                            fwd / cmd, "≥ 0.95×" if big else "", (fwd / cmd >= 0.95) if big else None,
                            extra={"seconds": {"command": round(cmd, 2), "forward": round(fwd, 2),
                                               "forward_command": round(fwd_cmd, 2)}, "load1": load}))
            rows.append(Row("whole", f"`weakstil extract` whole command vs forward-only command, {shape}", n / cmd,
                            "tiles/s", "fresh process: import torch, build the encoder, embed N in-memory tiles",
                            n / fwd_cmd, fwd_cmd / cmd, "≥ 0.95×" if big else "", (fwd_cmd / cmd >= 0.95) if big else None,
                            extra={"seconds": {"command": round(cmd, 2), "forward_command": round(fwd_cmd, 2)}}))
            rows.append(Row("whole", f"in-process SlideExtractor (no imports/encoder set-up), {shape}", n_in / inproc,
                            "tiles/s", "encoder forward only, preloaded tiles", n / fwd, fwd / inproc,
                            "≥ 0.95×" if big else "", (fwd / inproc >= 0.95) if big else None,
                            extra={"stages": stages[0], "seconds": round(inproc, 2), "load1": load}))
            if naive is not None:  # both without process start-up (TRIDENT has its own imports too)
                rows.append(Row("whole", f"in-process vs TRIDENT-shaped pipeline, {shape}", n_in / inproc, "tiles/s",
                                "read_region per tile in a thread + NCHW fp32 forward", n / naive, naive / inproc,
                                "≥ 1.3×", naive / inproc >= 1.3,
                                extra={"seconds": {"naive": round(naive, 2)}, "whole_command_vs_naive": naive / cmd}))
        small, k = plan["many"]
        src = synthetic_slide(0.25, plan["slides"][small])
        folder = tmp / "many"
        folder.mkdir()
        copies = []
        for i in range(k):
            copies.append(folder / f"copy{i:03d}.svs")
            os.link(src, copies[-1])
        secs, n_many, stages = extractor_run(factory, copies)
        large = plan["large"]
        rows.append(Row("whole", f"{k} slides × {n_many // k} tiles, one run (reader start-up once)", n_many / secs,
                        "tiles/s", f"one slide ({large}), in-process", rates[large], n_many / secs / rates[large],
                        "≥ 0.8×", n_many / secs / rates[large] >= 0.8,
                        extra={"stages_first": stages[0], "stages_last": stages[-1], "load1": os.getloadavg()[0]}))
    return rows
