"""``python -m benchmarks run [--device cpu|cuda] [--quick|--smoke] [--only CASE ...] [--out FILE.json]``.

``python -m benchmarks table FILE.json`` prints the table of an earlier run again.

Prints a markdown table of every figure with its reference and ratio, and writes the same as JSON
(with the machine: CPU model, cores, memory, load average, library versions).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from .common import MODES, gpu_name, machine, markdown_table

CASES = ("read", "extract", "whole", "precision", "cache", "train", "score", "memory")
# Long (minutes of synthesis, extraction, many CVs, pretraining) and, for accuracy, not timed: only when
# named with --only.
OPT_IN = ("accuracy", "heldout", "morph", "warmstart", "pretrain")


def _runner(case: str):
    if case == "read":
        from .bench_read import run
    elif case == "extract":
        from .bench_extract import run
    elif case == "whole":
        from .bench_whole import run
    elif case == "precision":
        from .bench_precision import run
    elif case == "cache":
        from .bench_cache import run
    elif case == "train":
        from .bench_train import run_train as run
    elif case == "score":
        from .bench_train import run_score as run
    elif case == "memory":
        from .bench_memory import run
    elif case == "accuracy":
        from .bench_accuracy import run
    elif case == "heldout":
        from .bench_heldout import run
    elif case == "morph":
        from .bench_morph import run
    elif case == "warmstart":
        from .bench_cohort import run
    elif case == "pretrain":
        from .bench_pretrain import run
    else:
        raise ValueError(case)
    return run


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
            return 2
    info = machine()
    info["gpu"] = gpu_name() if args.device.startswith("cuda") else None
    cases = args.only or list(CASES)
    rows, timings, failures = [], {}, {}
    t_all = time.perf_counter()
    for case in cases:
        t0 = time.perf_counter()
        print(f"[{case}] running ({mode.name})…", file=sys.stderr, flush=True)
        try:
            new = _runner(case)(mode, args.device)
            rows.extend(new)
            if new:
                print(markdown_table(new).split("\n", 2)[2], file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
            failures[case] = f"{type(exc).__name__}: {exc}"
            print(f"[{case}] failed: {failures[case]}", file=sys.stderr, flush=True)
            if args.fail_fast:
                raise
        timings[case] = round(time.perf_counter() - t0, 1)
        print(f"[{case}] {timings[case]} s", file=sys.stderr, flush=True)
    try:
        import os

        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    total = time.perf_counter() - t_all
    table = markdown_table(rows)
    header = (f"weakstil benchmarks — mode {mode.name}, device {args.device}, {info['date']}, "
              f"{info['cpu_model']} × {info['nproc']} cores, {info['memory_gb']} GB"
              + (f", GPU {info['gpu']}" if info.get("gpu") else "") + f"; {total:.0f} s")
    print(header)
    print()
    print(table)
    if failures:
        print()
        for case, err in failures.items():
            print(f"- {case} failed: {err}")
    doc = {"mode": mode.name, "device": args.device, "machine": info, "case_seconds": timings,
           "total_seconds": round(total, 1), "failures": failures, "rows": [r.as_dict() for r in rows],
           "table": table}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n")
    tmp.replace(out)
    print(f"\nJSON written to {out}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the benchmark cases and print the table")
    r.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes: under 5 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite (under a minute)")
    r.add_argument("--only", nargs="+", choices=CASES + OPT_IN,
                   help="run only these cases (%s only when named here)" % ", ".join(OPT_IN))
    r.add_argument("--out", default="benchmark-results.json", help="JSON file to write (default: %(default)s)")
    r.add_argument("--fail-fast", action="store_true", help="stop at the first failing case, with its traceback")
    t = sub.add_parser("table", help="print the markdown table of a JSON result file")
    t.add_argument("json", help="a file written by `run --out`")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "table":
        doc = json.loads(Path(args.json).read_text())
        print(doc["table"])
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
