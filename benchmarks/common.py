"""Shared pieces: result rows, timing, the machine description, cached synthetic slides."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Row:
    """One figure: ``value`` (a rate or a time) and, where it has one, its reference and the ratio."""

    case: str
    name: str
    value: float
    unit: str
    reference: str = ""
    ref_value: float | None = None
    ratio: float | None = None  # value / ref_value for rates, ref_value / value for times
    target: str = ""
    met: bool | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Mode:
    """How big a run is: ``full`` (the published table), ``quick`` (< 5 min), ``smoke`` (tests)."""

    name: str
    slide_um: tuple[float, float]  # synthetic slide canvas (width, height) in µm
    read_repeats: int
    extract_tiles: dict  # encoder name -> tiles for the extract case
    extract_batch: int
    extract_rounds: int
    cache_slides: int
    cache_tiles: int
    train_sizes: tuple[int, ...]  # bag counts for the CV curve
    train_tiles: int
    train_dim: int
    train_epochs: int | None  # None: TrainConfig's defaults (max_epochs 60, patience 10)
    score_tiles: int
    memory_um: tuple[float, float]


MODES = {
    "full": Mode("full", (3000.0, 3000.0), 5, {"resnet18": 2048, "vit_s16": 512}, 32, 2, 5, 20000,
                 (100, 1000, 5000), 2000, 512, None, 20000, (4000.0, 4000.0)),
    "quick": Mode("quick", (2000.0, 1600.0), 3, {"resnet18": 256, "vit_s16": 64}, 32, 2, 3, 20000,
                  (25, 50, 100), 500, 128, 4, 20000, (2000.0, 1600.0)),
    "smoke": Mode("smoke", (640.0, 512.0), 1, {"resnet18": 8, "vit_s16": 4}, 4, 1, 1, 2000,
                  (10, 20), 64, 16, 2, 2000, (640.0, 512.0)),
}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest seconds of each function over ``repeats`` rounds, the functions interleaved so that
    load from other processes hits them alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(max(1, repeats)):
        for key, fn in fns.items():
            best[key] = min(best[key], timed(fn)[0])
    return best


def machine() -> dict:
    """Where the numbers come from: CPU model, cores, memory, load, library versions."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    versions = {}
    for mod in ("torch", "timm", "openslide", "tiffslide", "tifffile", "imagecodecs", "PIL", "zarr", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    try:
        import openslide

        versions["libopenslide"] = openslide.__library_version__
    except (ImportError, AttributeError):
        pass
    info["versions"] = versions
    return info


def gpu_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except (ImportError, RuntimeError):
        return None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def bench_dir() -> Path:
    """Where synthetic slides are cached between runs (``$WEAKSTIL_BENCH_DIR`` or the temp dir)."""
    root = Path(os.environ.get("WEAKSTIL_BENCH_DIR") or Path(tempfile.gettempdir()) / "weakstil-bench")
    root.mkdir(parents=True, exist_ok=True)
    return root


def synthetic_slide(mpp: float, size_um: tuple[float, float], *, seed: int = 1) -> Path:
    """An Aperio-like synthetic slide (weakstil.synth.lattice) at ``mpp``, written once and then reused."""
    from weakstil.synth.lattice import SlideParams, write_slide

    path = bench_dir() / f"synth-s{seed}-{size_um[0]:g}x{size_um[1]:g}um-{mpp:g}mpp.svs"
    if not path.exists():
        write_slide(path, SlideParams(seed, stil_target=30.0, size_um=size_um), mpp)
    return path


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def markdown_table(rows: list[Row]) -> str:
    """The rows as a markdown table: case, figure, value, reference, ratio, target, met."""
    lines = ["| case | figure | value | reference | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = f"{r.reference}: {fmt(r.ref_value)}" if r.reference else ""
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        value = f"{fmt(r.value)} {r.unit}"
        name = r.name + (f" ({r.note})" if r.note else "")
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else ""
        lines.append(f"| {r.case} | {name} | {value} | {ref} | {ratio} | {r.target} | {met} |")
    return "\n".join(lines)
