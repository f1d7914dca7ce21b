"""Overlay case: write ``heatmap.tif`` for a very large slide and report time, file size and peak RSS.

``python -m benchmarks.bench_overlay [--width 100000] [--height 80000] [--tiles 25000] [--workers N]``

A fresh subprocess builds a geometry-only slide (the ``SlideHandle`` duck type without pixels: the
overlay never reads the slide) of ``width`` × ``height`` level-0 px at 0.25 µm/px, with about
``tiles`` tiles of 448 px (112 µm) filling a tissue ellipse on the regular grid and a smoothly
varying sTIL% plus noise, then writes the overlay with ``weakstil.outputs.overlay.heatmap_tiff`` and
reports:

- the write time (wall and CPU: on a busy machine the CPU time is the steadier figure), the file
  size and the number of TIFF tiles;
- the peak RSS of the process (``ru_maxrss``) and, as the reference, its RSS just before writing
  (Python, numpy, matplotlib, tifffile, imagecodecs and the tile arrays): the difference is what the
  writer itself needs, against the ``width × height × 3`` bytes a full-size RGB raster would take;
- a check that OpenSlide opens the file with the slide's dimensions and mpp, and that an even
  sample of ``check_tiles`` tiles (all of them in the tests) has each tile's own sTIL% colour at its
  centre and just inside two opposite corners (``pixels_wrong`` counts those that do not).

Nothing is asserted on time: the figures depend on the machine; read them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, math, os, resource, sys, time
import numpy as np

def rss_mb(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

args = json.loads(sys.argv[1])
from weakstil.outputs import colors, overlay

class GeometrySlide:
    # the SlideHandle duck type, geometry only (heatmap_tiff never reads pixels)
    def __init__(self, width, height, mpp):
        self.dimensions = (width, height)
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)
        self.mpp = mpp
        self.slide_id = "bench-overlay"

W, H, size = args["width"], args["height"], 448.0
slide = GeometrySlide(W, H, 0.25)
ys, xs = np.mgrid[0:H - size + 1:size, 0:W - size + 1:size]
cx, cy = (xs + size / 2) / W - 0.5, (ys + size / 2) / H - 0.5
frac = min(1.0, args["tiles"] / xs.size)  # an ellipse with that share of the grid's area
r = math.sqrt(frac / math.pi)
inside = (cx / r) ** 2 + (cy / r) ** 2 < 1
coords = np.stack([xs[inside], ys[inside]], 1).astype(np.int64)
rng = np.random.default_rng(0)
smooth = 50 + 35 * np.sin(coords[:, 0] / W * 7) * np.cos(coords[:, 1] / H * 5)
pred = np.clip(smooth + rng.normal(0, 8, len(coords)), 0, 100)
import_base = rss_mb()
import imagecodecs, tifffile  # what the writer imports, so that the reference holds the libraries
colors.colormap_lut()  # matplotlib, for the colour map
base = rss_mb()
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
path = overlay.heatmap_tiff(slide, coords, size, pred, args["out"], workers=args["workers"])
seconds = time.perf_counter() - t0
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
cpu_seconds = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import tifffile
with tifffile.TiffFile(path) as tif:
    pages = [(p.shape[1], p.shape[0], len(p.dataoffsets), len(set(p.dataoffsets))) for p in tif.pages]
import openslide
check_n = int(args.get("check_tiles", 2000))  # tiles whose pixels are compared (an even sample)
picked = np.unique(np.linspace(0, len(coords) - 1, min(check_n, len(coords))).astype(int))
wrong = []
with openslide.OpenSlide(str(path)) as osr:
    for k in picked:
        want = tuple(int(v) for v in colors.stil_rgb([pred[k]])[0])
        x0, y0 = (int(v) for v in coords[k])
        # the centre and two points just inside opposite corners: colour and placement
        for x, y in ((x0 + int(size) // 2, y0 + int(size) // 2), (x0 + 2, y0 + 2),
                     (x0 + int(size) - 3, y0 + int(size) - 3)):
            got = tuple(int(v) for v in np.asarray(osr.read_region((x, y), 0, (1, 1)))[0, 0, :3])
            if got != want:
                wrong.append({"tile": int(k), "xy_l0": [x, y], "got": got, "want": want})
    check = {"dimensions": list(osr.dimensions), "levels": [list(d) for d in osr.level_dimensions],
             "mpp": float(osr.properties["openslide.mpp-x"]),
             "tiles_checked": int(len(picked)), "pixels_wrong": len(wrong), "first_wrong": wrong[:3],
             "background_ok": tuple(np.asarray(osr.read_region((0, 0), 0, (1, 1)))[0, 0, :3].tolist())
             == colors.NO_PREDICTION_RGB}
print(json.dumps({"width": W, "height": H, "tiles": int(len(coords)), "seconds": seconds,
                  "cpu_seconds": cpu_seconds, "threads": overlay._encoder_threads(args["workers"]),
                  "bytes": os.path.getsize(path), "pages": pages, "rss_before_mb": base,
                  "rss_before_imports_mb": import_base,
                  "peak_rss_mb": peak, "full_raster_mb": W * H * 3 / 2**20, "check": check}))
"""


def run(width: int = 100_000, height: int = 80_000, tiles: int = 25_000, workers: int | None = None,
        out: Path | None = None, check_tiles: int = 2000) -> dict:
    """Run the case in a fresh interpreter; return its figures (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-overlay-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / "heatmap.tif"
        args = {"width": width, "height": height, "tiles": tiles, "workers": workers, "out": str(target),
                "check_tiles": check_tiles}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                            os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                              env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the overlay benchmark failed:\n{proc.stderr}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_overlay", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=100_000)
    parser.add_argument("--height", type=int, default=80_000)
    parser.add_argument("--tiles", type=int, default=25_000)
    parser.add_argument("--workers", type=int, default=None, help="deflate threads (default: up to 4 CPUs)")
    parser.add_argument("--out", type=Path, default=None, help="keep the TIFF here (default: a temp file)")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    result = run(args.width, args.height, args.tiles, args.workers, args.out)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    level0 = result["pages"][0]
    print(f"heatmap.tif for a {result['width']:,} x {result['height']:,} px slide with {result['tiles']:,} tiles")
    print(f"  write time      {result['seconds']:.2f} s wall, {result['cpu_seconds']:.2f} s CPU "
          f"({result['threads']} deflate threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"  file size       {result['bytes'] / 2**20:.1f} MB ({len(result['pages'])} pages; level 0: "
          f"{level0[2]:,} tiles, {level0[3]:,} distinct)")
    print(f"  peak RSS        {result['peak_rss_mb']:.0f} MB (before writing, libraries loaded: "
          f"{result['rss_before_mb']:.0f} MB, so the writer needs "
          f"{result['peak_rss_mb'] - result['rss_before_mb']:.0f} MB; a full-size RGB raster would be "
          f"{result['full_raster_mb']:,.0f} MB)")
    print(f"  OpenSlide check {result['check']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
