"""Peak memory of ``weakstil extract`` + ``weakstil score`` on a very large slide versus a small one.

``python -m benchmarks.bench_scale [--large-px 60000] [--small-px 10000] [--dir DIR] [--device cpu]``

Writes two synthetic Aperio-like slides at 0.25 µm/px — ``small-px``² and ``large-px``² pixels
(default 10,000² and 60,000²: 2.5 mm and 15 mm square) — mostly background with a few tissue
blobs, the same tissue fraction in both. The slides are written *lazily*: every tile of every
pyramid level is rendered on demand from a coarse tissue map and a small bank of textures, so the
writer holds a few tiles at a time, never a level. A tiny model is trained on a synthetic cohort
(the encoder and tiling of the defaults), then for each slide ``weakstil extract`` and
``weakstil score`` run as subprocesses and their peak memory is measured two ways:

- ``peak_rss_gb``: the largest resident set of any one process of the command (the CLI or one of
  its tile-reading workers), from ``getrusage(RUSAGE_CHILDREN)`` in a wrapper process that runs only
  that command;
- ``tree_rss_gb``: the largest *sum* over the command's process tree, polling ``/proc`` every 50 ms.

The target (issue 5): the large slide stays under 3 GB, and peak memory does not grow with the slide
beyond its per-slide feature arrays (N × 512 float16, ~1 KB a tile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MPP = 0.25
TILE = 256  # the TIFF's tile edge
CELL_L0 = 448  # tissue map cell: one 112-µm tile at 0.25 µm/px
TISSUE_RGB = np.array([225, 140, 185], np.int16)
NUCLEUS_RGB = np.array([105, 55, 145], np.int16)
BACKGROUND = 244
GB = 2**30
REPO = Path(__file__).resolve().parents[1]


# --- a slide rendered tile by tile ---------------------------------------------------------------
class LazySlide:
    """Pixels of a ``width`` × ``height`` slide at any downsample, computed on demand.

    Tissue is where a coarse map (one cell per ``CELL_L0`` level-0 px) says so: a few elliptic
    blobs covering about ``tissue`` of the slide. Tissue pixels come from a bank of pink textures
    with purple nuclei, background from a bank of near-white noise; both are picked per tile, so
    memory stays at the banks (a few MB) whatever the slide size.
    """

    def __init__(self, width: int, height: int, *, seed: int = 0, tissue: float = 0.15, bank: int = 8):
        self.width, self.height = width, height
        rng = np.random.default_rng(seed)
        gw, gh = -(-width // CELL_L0), -(-height // CELL_L0)
        yy, xx = np.mgrid[:gh, :gw]
        mask = np.zeros((gh, gw), bool)
        target = tissue * gw * gh
        while mask.sum() < target:  # blobs of 4–12 % of the short side until the fraction is reached
            cx, cy = rng.uniform(0.15, 0.85) * gw, rng.uniform(0.15, 0.85) * gh
            rx, ry = rng.uniform(0.04, 0.12, size=2) * min(gw, gh) + 1.5
            mask |= ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        self.mask = mask
        self.tissue_bank = np.stack([self._tissue_texture(rng) for _ in range(bank)])
        self.background_bank = np.stack([
            np.clip(BACKGROUND + rng.integers(-3, 4, size=(TILE, TILE, 1)), 0, 255).repeat(3, axis=2)
            for _ in range(bank)]).astype(np.uint8)

    @staticmethod
    def _tissue_texture(rng) -> np.ndarray:
        image = np.empty((TILE, TILE, 3), np.int16)
        image[:] = TISSUE_RGB
        image += rng.integers(-14, 15, size=(TILE, TILE, 3), dtype=np.int16)
        for x, y in rng.integers(3, TILE - 4, size=(rng.integers(40, 160), 2)):
            image[y - 3:y + 4, x - 3:x + 4] = NUCLEUS_RGB + rng.integers(-10, 11, size=3)
        return np.clip(image, 0, 255).astype(np.uint8)

    def level_size(self, ds: int) -> tuple[int, int]:
        return -(-self.width // ds), -(-self.height // ds)

    def region(self, x0: int, y0: int, w: int, h: int, ds: float) -> np.ndarray:
        """(h, w, 3) uint8 at downsample ``ds``; (x0, y0) in that level's pixels; w, h ≤ TILE."""
        cx = np.minimum(((x0 + np.arange(w)) * ds // CELL_L0).astype(np.intp), self.mask.shape[1] - 1)
        cy = np.minimum(((y0 + np.arange(h)) * ds // CELL_L0).astype(np.intp), self.mask.shape[0] - 1)
        inside = self.mask[np.ix_(cy, cx)]
        k = hash((x0, y0, ds)) % len(self.tissue_bank)
        background = self.background_bank[k, :h, :w]
        if not inside.any():
            return background
        return np.where(inside[..., None], self.tissue_bank[k, :h, :w], background)

    def tiles(self, ds: int):
        """Every TILE × TILE tile of the level at ``ds``, in row-major order (edge tiles padded)."""
        lw, lh = self.level_size(ds)
        for y0 in range(0, lh, TILE):
            for x0 in range(0, lw, TILE):
                w, h = min(TILE, lw - x0), min(TILE, lh - y0)
                tile = self.region(x0, y0, w, h, ds)
                if (w, h) != (TILE, TILE):
                    padded = np.full((TILE, TILE, 3), 255, np.uint8)
                    padded[:h, :w] = tile
                    tile = padded
                yield tile

    def thumbnail(self, max_px: int = 768) -> np.ndarray:
        ds = max(self.width, self.height) / max_px
        w, h = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        out = np.empty((h, w, 3), np.uint8)
        for y0 in range(0, h, TILE):
            for x0 in range(0, w, TILE):
                bw, bh = min(TILE, w - x0), min(TILE, h - y0)
                out[y0:y0 + bh, x0:x0 + bw] = self.region(x0, y0, bw, bh, ds)
        return out


def pyramid_downsamples(width: int, height: int, *, downsample: int = 4, min_px: int = 512) -> list[int]:
    """Downsamples of the levels ``weakstil.slidewriter.pyramid_levels`` would write: ÷4 while the
    smaller side stays ≥ ``min_px``."""
    out, ds = [1], 1
    while min(width, height) // (ds * downsample) >= min_px:
        ds *= downsample
        out.append(ds)
    return out


def write_lazy_slide(path: Path, slide: LazySlide, mpp: float = MPP, *, quality: int = 90) -> Path:
    """The layout of :func:`weakstil.wsi.writer.write_aperio_tiff` (level 0, stripped thumbnail,
    reduced levels; Aperio description with MPP), but from tile iterators: bounded memory."""
    import tifffile

    from weakstil.wsi.writer import APERIO_HEADER

    width, height = slide.width, slide.height
    meta = f"|AppMag = 40|MPP = {mpp:g}"
    common = {"photometric": "rgb", "metadata": None, "compression": "jpeg",
              "compressionargs": {"level": quality}, "subfiletype": 0}
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        head = f"{APERIO_HEADER}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
        tw.write(slide.tiles(1), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE),
                 description=head + meta, **res, **common)
        thumb = slide.thumbnail()
        tw.write(thumb, description=f"{APERIO_HEADER}{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}",
                 **common)
        for ds in pyramid_downsamples(width, height)[1:]:
            lw, lh = slide.level_size(ds)
            tw.write(slide.tiles(ds), shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE),
                     description=f"{head} -> {lw}x{lh} JPEG/RGB Q={quality}", **common)
    tmp.replace(path)
    return path


# --- measuring -------------------------------------------------------------------------------------
WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr)
"""


def _tree_rss_kb(root: int) -> int:
    """The summed VmRSS of ``root`` and its descendants now (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = {}
            for line in open(f"/proc/{entry.name}/status"):
                key, _, value = line.partition(":")
                if key in ("PPid", "VmRSS"):
                    fields[key] = int(value.split()[0])
        except (OSError, ValueError, IndexError):
            continue
        pid = int(entry.name)
        children.setdefault(fields.get("PPid", 0), []).append(pid)
        rss[pid] = fields.get("VmRSS", 0)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def measure(cmd: list[str], *, cwd: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in a wrapper; its peak RSS (largest single process) and peak tree RSS (sum)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], cwd=cwd, stdout=out, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **(env or {})})
        tree_peak = 0
        while proc.poll() is None:
            tree_peak = max(tree_peak, _tree_rss_kb(proc.pid))
            time.sleep(0.05)
        stderr = proc.stderr.read()
    lines = stderr.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr}") from None
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['rc']}; see {log}\n{stderr[-3000:]}")
    # tree_rss includes the wrapper's own small python (~10 MB)
    return {"seconds": round(result["seconds"], 1), "peak_rss_gb": round(result["peak_rss_kb"] / 2**20, 3),
            "tree_rss_gb": round(tree_peak / 2**20, 3)}


def train_tiny_model(root: Path) -> Path:
    """A quick model on a small synthetic cohort (default encoder and tiling), trained once."""
    model = root / "models" / "bench"
    if (model / "model.ckpt").exists():
        return model
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.cohort import train_from_cache
    from weakstil.runs.batch import extract_slides
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    synth_cohort(root / "cohort", n=6, size_um=600, seed=3, progress=False)
    sources = slide_sources(find_slides(root / "cohort" / "slides"))
    extract_slides(sources, root / "cohort-features", encoder=create_encoder("resnet18-random"), spec=TileSpec(),
                   tissue=TissueParams(), opts=ExtractOptions(progress=False))
    train_from_cache(root / "cohort" / "labels.csv", root / "cohort-features", models_dir=root / "models",
                     name="bench", max_epochs=3, n_folds=2, n_boot=20, progress=False)
    return model


def run(args: argparse.Namespace) -> dict:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    model = train_tiny_model(root)
    report = {"mpp": MPP, "device": args.device, "slides": {}}
    env = {}
    if args.malloc_mmap_threshold:  # glibc: big buffers from mmap, returned to the OS when freed
        env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold),
               "MALLOC_TRIM_THRESHOLD_": str(args.malloc_mmap_threshold)}
        report["env"] = env
    for label, px in (("small", args.small_px), ("large", args.large_px)):
        if args.only and label != args.only:
            continue
        work = root / f"{label}-{px}"
        slides = work / "slides"
        slides.mkdir(parents=True, exist_ok=True)
        path = slides / f"lazy-{px}px.svs"
        row: dict = {"width_px": px, "height_px": px}
        if not path.exists():  # in its own process, to measure the writer's memory too
            row["write"] = measure([sys.executable, "-m", "benchmarks.bench_scale", "--write", str(path),
                                    "--px", str(px)], cwd=REPO, log=work / "write.log")
        row["file_gb"] = round(path.stat().st_size / GB, 3)
        for sub in ("features", "results"):
            if (work / sub).exists():
                import shutil

                shutil.rmtree(work / sub)
        common = ["--device", args.device, "--quiet"]
        wst = [sys.executable, "-m", "weakstil.cli"]
        row["extract"] = measure([*wst, "extract", str(slides), "--features", str(work / "features"), *common],
                                 cwd=work, log=work / "extract.log", env=env)
        row["score"] = measure([*wst, "score", str(slides), "--model", str(model), "--features", str(work / "features"),
                                "--out", str(work / "results"), *common], cwd=work, log=work / "score.log", env=env)
        info = json.loads((work / "results" / "slides" / path.stem / "score.json").read_text())
        row["n_tiles"] = info["n_tiles"]
        row["features_mb"] = round(info["n_tiles"] * 512 * 2 / 2**20, 1)
        report["slides"][label] = row
        print(json.dumps({label: row}), flush=True)
    return report


def markdown(report: dict) -> str:
    lines = ["| slide | px | tiles | extract s | extract peak RSS GB (1 proc / tree) | score s | "
             "score peak RSS GB (1 proc / tree) |", "|---|---|---|---|---|---|---|"]
    for label, row in report["slides"].items():
        e, s = row["extract"], row["score"]
        lines.append(f"| {label} | {row['width_px']:,}² | {row['n_tiles']:,} | {e['seconds']} | "
                     f"{e['peak_rss_gb']} / {e['tree_rss_gb']} | {s['seconds']} | "
                     f"{s['peak_rss_gb']} / {s['tree_rss_gb']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--large-px", type=int, default=60_000)
    parser.add_argument("--small-px", type=int, default=10_000)
    parser.add_argument("--dir", default=str(Path(os.environ.get("WEAKSTIL_BENCH_DIR") or tempfile.gettempdir())
                                             / "weakstil-bench-scale"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="Also write the report as JSON here.")
    parser.add_argument("--only", choices=("small", "large"), help="Measure one of the two slides.")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="Run the commands with glibc's MALLOC_MMAP_THRESHOLD_ (and TRIM) set, e.g. 1048576: "
                             "shows how much of the peak is heap fragmentation.")
    parser.add_argument("--write", metavar="PATH", help="Only write one lazy slide of --px² px to PATH.")
    parser.add_argument("--px", type=int, default=10_000)
    args = parser.parse_args(argv)
    if args.write:
        write_lazy_slide(Path(args.write), LazySlide(args.px, args.px, seed=args.px))
        return 0
    report = run(args)
    print(markdown(report))
    large = report["slides"].get("large")
    if large:
        worst = max(large["extract"]["tree_rss_gb"], large["score"]["tree_rss_gb"])
        print(f"large slide peak (tree) {worst:.2f} GB: {'under' if worst < 3 else 'OVER'} the 3 GB target")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
