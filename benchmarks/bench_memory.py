"""Memory case: peak RSS of extracting every tissue tile of one large slide, in a fresh subprocess.

The subprocess does what ``weakstil extract`` does for one slide (open, tissue mask, tile grid, block
plan, ResNet-18 embeddings through the DataLoader, feature cache write) and reports its own peak RSS
(``VmHWM``) and the largest of its DataLoader workers' (``RUSAGE_CHILDREN``). The reference is the
RSS after importing torch and building the encoder, i.e. before any slide is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import Row, synthetic_slide

CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path

def rss_gb(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

path, device = sys.argv[1], sys.argv[2]
from weakstil.embed.cache import FeatureCache
from weakstil.embed.encoders import create_encoder
from weakstil.embed.extract import ExtractOptions, TileEmbedder, default_workers, embed_tiles
from weakstil.wsi.reader import aligned_block, plan_blocks
from weakstil.wsi.slide import open_slide
from weakstil.wsi.tiling import TileSpec, plan_tiles
from weakstil.wsi.tissue import TissueParams

encoder = create_encoder("resnet18-random")
embedder = TileEmbedder(encoder, device)
base = rss_gb()
t0 = time.perf_counter()
spec = TileSpec()
with open_slide(path) as slide:
    grid = plan_tiles(slide, spec)
    block = aligned_block(slide, grid.size_l0, spec.tile_px)
    dims = slide.dimensions
order, blocks = plan_blocks(grid.coords_l0, grid.size_l0, block=block)
coords = grid.coords_l0[order]
with tempfile.TemporaryDirectory() as tmp:
    cache = FeatureCache.open(Path(tmp), encoder.fingerprint(), spec.fingerprint(TissueParams()))
    with cache.slide_writer("slide", coords, embedder.embed_dim, {"slide_mpp": 0.25, "tile_size_l0": grid.size_l0}) as w:
        n = embed_tiles(Path(path), coords, blocks, grid.size_l0, spec.tile_px, embedder, w.write,
                        ExtractOptions(device=device, block=block, progress=False))
seconds = time.perf_counter() - t0
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print("RESULT", json.dumps({"tiles": n, "seconds": seconds, "baseline_gb": base, "peak_gb": rss_gb("VmHWM"),
                            "worker_peak_gb": children, "workers": default_workers(device), "slide_px": list(dims)}))
"""


def run(mode, device: str = "cpu") -> list[Row]:
    path = synthetic_slide(0.25, mode.memory_um)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), device], capture_output=True, text=True, env=env)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    if result is None:
        return [Row("memory", "peak RSS, extracting one slide", float("nan"), "GB", note="failed",
                    extra={"error": (proc.stderr or proc.stdout)[-2000:]})]
    w, h = result["slide_px"]
    return [Row("memory", f"peak RSS, extracting one {w:,}×{h:,} px slide ({result['tiles']:,} tiles, "
                f"ResNet-18, {device})", result["peak_gb"], "GB",
                "RSS after imports + encoder", result["baseline_gb"], result["peak_gb"] / result["baseline_gb"],
                note=(f"largest reader worker {result['worker_peak_gb']:.2f} GB; "
                      if result.get("workers") else "tiles read by a thread in-process; ")
                     + f"{result['tiles'] / result['seconds']:.0f} tiles/s incl. tissue mask",
                extra=result)]
