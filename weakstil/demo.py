"""`weakstil demo`: the whole pipeline on a synthetic cohort, offline, on the CPU.

synth (training cohort + a held-out test cohort) → extract (one feature cache) → cross-validate
both aggregations (weighted, mean) → score the test cohort with the better model (review bundle
per slide) → a metrics table: out-of-fold R²/AUC, test-set R², and the tile-level correlation of
the predictions with the synthetic ground truth (tiles that are at least a quarter stroma).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np

MIN_STROMA = 0.25  # tiles at least this much stroma count for the tile-level correlation
# the slides' canvas width in µm (height 0.8 ×; `weakstil synth` draws 2000): about 100 tiles a slide,
# the whole demo in about 3 minutes on 2 CPU cores, with room under 5 on a slower or busier machine
# (on 2000-µm slides it took 4.5–5.1 minutes: docs/performance.md)
DEMO_SIZE_UM = 1600.0


def tile_level_agreement(model, cache, truth_dir: Path, slide_ids, *, min_stroma: float = MIN_STROMA) -> dict:
    """Pearson r between tile predictions and synthetic per-tile sTIL% (stroma ≥ ``min_stroma``)."""
    from scipy.stats import pearsonr

    from weakstil.synth.lattice import tile_truth

    preds, truths = [], []
    for sid in slide_ids:
        cached = cache.read(sid)
        pred = model.predict(cached.features)
        truth = tile_truth(Path(truth_dir) / f"{sid}.npz", cached.coords_l0, float(cached.attrs["tile_size_l0"]),
                           float(cached.attrs["slide_mpp"]))
        keep = (truth["stroma_fraction"] >= min_stroma) & np.isfinite(truth["stil"])
        preds.append(pred.tile_pred[keep])
        truths.append(truth["stil"][keep])
    p, t = np.concatenate(preds), np.concatenate(truths)
    r = float(pearsonr(p, t)[0]) if len(p) > 2 and p.std() > 0 and t.std() > 0 else float("nan")
    return {"tile_pearson": r, "n_tiles": int(len(p))}


def slide_level_test(model, cache, labels_csv: Path) -> dict:
    """Metrics of the model's slide scores on a labelled test cohort."""
    import pandas as pd

    from weakstil.mil.metrics import regression_metrics

    df = pd.read_csv(labels_csv, dtype={"slide_id": str})
    scores = np.array([model.predict(cache.read(s).features).score for s in df["slide_id"]])
    return regression_metrics(df["stil"].to_numpy(float), scores)


def run_demo(out: Path, *, n: int = 40, n_test: int = 10, seed: int = 0, device: str = "auto",
             progress: bool = True, size_um: float | None = None, **train_kwargs) -> dict:
    """The whole pipeline on a synthetic cohort; prints the tables, returns (and writes) the summary.

    ``size_um`` is the slides' canvas width in µm (default :data:`DEMO_SIZE_UM`, 1600; `weakstil
    synth` draws 2000); a smaller one makes a quick smoke run (tests), at the cost of fewer tiles per
    slide.
    ``train_kwargs`` (e.g. ``n_folds=3, max_epochs=20``) go to the training config.
    """
    from rich.console import Console
    from rich.table import Table

    from weakstil.textout import emit

    from weakstil.embed.encoders import DEFAULT_ENCODER, create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.cohort import metrics_table, probe_verdict, train_from_cache
    from weakstil.mil.model import load_model
    from weakstil.runs.batch import extract_slides, score_slides
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    console = Console(stderr=True)
    out = Path(out)
    started = time.perf_counter()
    timings = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        console.print(f"[green]✓[/] {name} ({timings[name]:.0f} s)")

    title = "weakstil demo — synthetic cohort, random-init ResNet-18 encoder (NOT pretrained)"
    if console.is_terminal and console.width > len(title) + 4:
        console.rule(title)
    else:  # a rule shorter than its title cuts the title (and its warning) with "…"
        console.print(title, markup=False, soft_wrap=True)
    t0 = time.perf_counter()
    size_um = size_um or DEMO_SIZE_UM
    train_root = synth_cohort(out / "cohort", n=n, seed=seed, progress=progress, size_um=size_um)
    test_root = synth_cohort(out / "test", n=n_test, seed=seed + 1, prefix="TEST", progress=progress, size_um=size_um)
    step("synth", t0)

    t0 = time.perf_counter()
    encoder = create_encoder(DEFAULT_ENCODER)
    spec, tissue = TileSpec(), TissueParams()
    features = out / "features"
    opts = ExtractOptions(device=device, progress=progress)
    sources = slide_sources(find_slides(train_root / "slides")) + slide_sources(find_slides(test_root / "slides"))
    extracted = extract_slides(sources, features, encoder=encoder, spec=spec, tissue=tissue, opts=opts)
    if extracted.failed:
        names = ", ".join(o.key for o in extracted.failed)
        console.print(f"[yellow]warning:[/] {len(extracted.failed)} slide(s) failed to extract: {names}")
    step("extract", t0)

    t0 = time.perf_counter()
    accelerator = "cpu" if device == "cpu" else "auto"
    runs = train_from_cache(train_root / "labels.csv", extracted.cache.path, models_dir=out / "models",
                            name="demo", aggregations=("weighted", "mean"), overwrite=True, progress=progress,
                            accelerator=accelerator, run_info={"command": "demo", "seed": seed},
                            **train_kwargs)
    step(f"train ({train_kwargs.get('n_folds', 5)}-fold CV × 2 aggregations)", t0)
    from weakstil.mil.train import deployed_pooled

    best = max(runs, key=lambda r: deployed_pooled(r.metrics)["r2"])  # what each model folder deploys

    t0 = time.perf_counter()
    rows = {}
    for run in runs:
        model = load_model(run.path)
        test_ids = [s.slide_id for s in sources if s.slide_id.startswith("TEST-")]
        rows[run.name] = {
            "test": slide_level_test(model, extracted.cache, test_root / "labels.csv"),
            "tiles": tile_level_agreement(model, extracted.cache, test_root / "truth", test_ids),
            "oof_tiles": tile_level_agreement(model, extracted.cache, train_root / "truth",
                                              [s.slide_id for s in sources if s.slide_id.startswith("SYN-")]),
        }
    scored = score_slides(slide_sources(find_slides(test_root / "slides")), best.path, features_dir=features,
                          out_dir=out / "results", opts=opts)
    step("score test cohort", t0)

    seconds = time.perf_counter() - started
    stdout = Console(soft_wrap=True)  # never wrap: the last line is a command to copy
    emit(metrics_table(runs))
    for run in runs:
        verdict = probe_verdict(run)
        if verdict:
            stdout.print(verdict, markup=False, highlight=False)
    table = Table(title=f"held-out test cohort ({n_test} slides) and tiles vs synthetic ground truth",
                  title_justify="left")
    for col in ("model", "test R²", "test AUC@30", "test MAE", "tile r (test)", "tiles", "tile r (train)*"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, row in rows.items():
        test, tiles = row["test"], row["tiles"]
        table.add_row(name + (" (best)" if name == best.name else ""), f"{test['r2']:.2f}",
                      f"{test.get('auc@30', float('nan')):.2f}", f"{test['mae']:.1f}",
                      f"{tiles['tile_pearson']:.2f}", f"{tiles['n_tiles']:,}", f"{row['oof_tiles']['tile_pearson']:.2f}")
    emit(table)
    stdout.print(f"tile r: Pearson correlation of tile predictions with the true per-tile sTIL% over tiles "
                 f"≥ {MIN_STROMA:.0%} stroma. *train: the deployed ensemble on its own training slides.")
    summary = {
        "seconds": round(seconds, 1), "timings": timings, "best": best.name,
        "cv": {r.name: {"pooled": r.metrics["pooled"], "deployed": deployed_pooled(r.metrics),
                        "fold_mean_sd": r.metrics.get("fold_mean_sd"),
                        "n_slides": r.metrics.get("n_slides"), "n_tiles": r.metrics.get("n_tiles"),
                        "cv_seconds": r.metrics.get("cv_seconds")} for r in runs},
        "test": rows,
        "failed_slides": [o.key for o in extracted.failed + scored.failed],
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    stdout.print(f"\ndemo finished in {seconds / 60:.1f} min. Outputs under {out}/:\n"
                 f"  models      {out / 'models'} (metrics.json, cv_predictions.csv, plots/)\n"
                 f"  results     {out / 'results'} (scores.csv, slides/<id>/heatmap.png …)\n"
                 f"  features    {extracted.cache.path}\n"
                 f"  summary     {out / 'demo_summary.json'}\n"
                 f"Review them: weakstil view {shlex.quote(str(out / 'results'))} "
                 f"--slides {shlex.quote(str(test_root / 'slides'))}")
    return summary
