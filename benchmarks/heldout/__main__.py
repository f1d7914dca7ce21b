"""``python -m benchmarks.heldout OUT --n 40 --seed S --setting standard|hard --size-um 1200 [--workers 2]``"""

from __future__ import annotations

import argparse

from . import SETTINGS, write_cohort


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.heldout",
                                 description="Write a held-out synthetic H&E cohort (HOG-NNN slides, truth, labels).")
    ap.add_argument("out", help="output folder (slides/, truth/, labels.csv, render_log.csv, DONE)")
    ap.add_argument("--n", type=int, default=40, help="number of slides (default 40)")
    ap.add_argument("--seed", type=int, default=1, help="cohort seed (default 1)")
    ap.add_argument("--setting", choices=list(SETTINGS), default="standard", help="difficulty (default standard)")
    ap.add_argument("--size-um", type=float, default=1200.0, help="canvas width in µm; height is 0.8× (default 1200)")
    ap.add_argument("--workers", type=int, default=2, help="render processes (default 2)")
    ap.add_argument("--start", type=int, default=0, help="index of the first slide (default 0)")
    a = ap.parse_args(argv)
    write_cohort(a.out, n=a.n, seed=a.seed, setting=a.setting, size_um=a.size_um, workers=a.workers, start=a.start)


if __name__ == "__main__":
    main()
