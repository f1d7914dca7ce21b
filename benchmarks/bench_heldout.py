"""Held-out case (``--only heldout``): the default recipe on a generator it was never chosen on.

The four families of ``weakstil synth`` are the ones the recipe is developed and chosen on
(``--only accuracy``). :mod:`benchmarks.heldout` ("HOG") is a fifth generator, written independently
of all four by an engineer who read none of them (explicit geometry: nests as unions of disks along
branching random walks, cells by Poisson-disc sampling, collagen as streamlines; a lobular pattern
of small uniform tumour nuclei; a skewed sTIL% distribution with most slides under 10 %; scans at
0.25, 0.2631 and 0.5 µm/px). It stays outside the package and outside the recipe's choices: this
case only reports how the recipe does there, beside the linear probe on the same folds.

Cohorts (sizes of the accuracy plan, ``PLANS``): ``ho-standard`` and ``ho-hard`` (seed 1),
``ho-hard-new`` (seed 2, the new-seed check). Figures: the accuracy case's for each CV (the same
acceptance tests from issue #14), the new-seed transfer, and, where the accuracy case's cohorts are
prepared in the same bench folder, cross-family transfer both ways (each family's model trained
again here: about six minutes). ``WEAKSTIL_ACCURACY_RECIPES`` (the accuracy case's recipe names, comma-
separated) adds other recipes' CVs and new-seed figures to the JSON: whether the choices made on the
four families hold here. JSON in ``docs/benchmarks/<date>-heldout.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import bench_accuracy as acc
from .common import Row, bench_dir

COHORTS = (("ho-standard", "standard", 1), ("ho-hard", "hard", 1), ("ho-hard-new", "hard", 2))


def prepare(root: Path, plan, *, progress: bool = False) -> dict[str, Path]:
    """Write the held-out cohorts and extract their features (both resume)."""
    from .heldout import write_cohort

    out = {}
    for name, setting, seed in COHORTS:
        n = plan.n_new if name.endswith("-new") else plan.n_hard if setting == "hard" else plan.n
        path = write_cohort(root / name, n=n, seed=seed, setting=setting,
                            size_um=plan.size_um or 1200.0, progress=progress)
        acc.extract(path, progress=progress)
        out[name] = path
    return out


def run(mode, device: str, *, families: bool | None = None) -> list[Row]:
    """CV of both held-out cohorts, the new seed, and cross-family transfer where the accuracy case's
    cohorts are there (``families`` forces it on or off)."""
    plan = acc.PLANS[mode.name]
    # the default, and the recipes named in $WEAKSTIL_ACCURACY_RECIPES beside it (the accuracy case's
    # names): whether the choices made on the four families hold here; rows for the default only
    names = ["default"] + [r for r in os.environ.get("WEAKSTIL_ACCURACY_RECIPES", "").split(",")
                           if r and r != "default"]
    unknown = [r for r in names if r not in acc.RECIPES]
    if unknown:
        from weakstil.errors import ConfigError

        raise ConfigError(f"unknown recipe(s) in WEAKSTIL_ACCURACY_RECIPES: {', '.join(unknown)} "
                          f"(known: {', '.join(acc.RECIPES)})",
                          fix="name recipes of benchmarks/bench_accuracy.RECIPES, comma-separated, or unset it")
    recipes = {r: acc.RECIPES[r] for r in names}
    paths = prepare(bench_dir() / f"heldout-{mode.name}", plan)
    cohorts = {name: acc.load_cohort(path) for name, path in paths.items()}
    doc = {"plan": plan.__dict__, "recipes": recipes, "cv": {}, "transfer": {}}
    rows, trained = [], {r: {} for r in recipes}
    for name in ("ho-standard", "ho-hard"):
        acc._cross_validate(name, cohorts[name], recipes, trained, doc, rows, plan)
    for rname in recipes:
        cv_r2 = trained[rname]["ho-hard"]["mil"]["r2_truth"]
        acc._transfer(rname, trained[rname], cohorts, "ho-hard", "ho-hard-new", doc, rows,
                      lambda m, cv_r2=cv_r2: ("≥ CV − 0.1", m["r2_truth"] >= cv_r2 - 0.1
                                              and abs(m["pred_mean"] - m["truth_mean"]) <= 3))
    family_root = bench_dir() / f"accuracy-{mode.name}"
    if families is None:
        families = all((acc.cohort_dir(family_root, f, s) / "labels.csv").exists()
                       for f in acc.FAMILIES for s in acc.SETTINGS)
    if families:
        for setting in acc.SETTINGS:
            for family in acc.FAMILIES:
                name = f"{family}-{setting}"
                path = acc.prepare_one(family_root, plan, family, setting, False,
                                       plan.n_hard if setting == "hard" else plan.n)
                cohorts[name] = acc.load_cohort(path)
                print(f"[heldout] training on {name}", file=sys.stderr, flush=True)
                trained["default"][name] = acc.run_recipe(cohorts[name], recipes["default"], plan)
                for src, dst in ((name, f"ho-{setting}"), (f"ho-{setting}", name)):
                    acc._transfer("default", trained["default"], cohorts, src, dst, doc, rows,
                                  lambda m: ("≥ 0.8", m["r2_truth"] >= 0.8))
    else:
        print(f"[heldout] no accuracy cohorts in {family_root}: cross-family transfer skipped "
              "(run --only accuracy first, or pass them with the same WEAKSTIL_BENCH_DIR)", file=sys.stderr)
    for row in rows:
        row.case = "heldout"
    if mode.name != "smoke" or os.environ.get("WEAKSTIL_HELDOUT_REPORT"):
        write_report(doc, rows)
    return rows


def write_report(doc: dict, rows: list[Row]) -> Path:
    """docs/benchmarks/<date>-heldout.json, written as the accuracy case writes its report."""
    return acc.write_report(doc, rows, case="heldout")
