"""Commands that train and judge models: train."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    Aggregation,
    Backend,
    BackendOpt,
    MppOpt,
    ConfigOpt,
    Deploy,
    DeviceOpt,
    FoldsBy,
    QuietOpt,
    _fail,
    app,
)
from weakstil.cli import checks
from weakstil.errors import WeakstilError
from weakstil.mil import COLUMN_RULE, STROMA_FLOOR


class CV(str, Enum):
    kfold = "kfold"
    leave_center_out = "leave-center-out"


class Columns(str, Enum):  # mil.fit.COLUMN_SETS
    auto = "auto"
    all = "all"
    measured = "measured"
    measured_dark = "measured-dark"
    measured_wide = "measured-wide"
    measured_dark_wide = "measured-dark-wide"


@app.command()
def train(
    ctx: typer.Context,
    labels: Annotated[list[Path], typer.Argument(
        help="CSV(s) of slide_id,patient_id,stil[,center][,cohort] (sTIL% 0-100); several files = several cohorts.")],
    features: Annotated[list[Path], typer.Option(
        "--features", help="Feature cache folder (or one .zarr store); repeat for cohorts in several caches.")] = [
        Path("features")],
    encoder: Annotated[Optional[str], typer.Option(
        help="Which encoder's cache to use when --features holds several.")] = None,
    name: Annotated[str, typer.Option("--name", help="Model name: written to MODELS/NAME/.")] = "stil",
    models: Annotated[Path, typer.Option("--models", help="Folder of models.")] = Path("models"),
    aggregation: Annotated[Aggregation, typer.Option(
        help="How tile predictions become the slide score: weighted (sigmoid tile weights, the "
             "default), attention (ECTIL), mean (WeakSTIL), or both (two models NAME-attention and "
             "NAME-mean).")] = Aggregation.weighted,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 5,
    folds_by: Annotated[FoldsBy, typer.Option(
        "--folds-by", help="Keep each patient (or each center) inside one fold.")] = FoldsBy.patient,
    seeds: Annotated[int, typer.Option(
        "--seeds", min=1, help="Models per fold, each with its own seed (validation split, start, tile draws); "
                               "a slide's out-of-fold prediction is their mean and the deployed ensemble holds "
                               "them all (3 rather than 1: out-of-fold R² up to +0.04 on small noisy cohorts, "
                               "about 1.7x the training time; docs/accuracy.md, twenty-third run).")] = 3,
    deploy: Annotated[Deploy, typer.Option(
        help="Deployed model: the ensemble of the fold models, or final fits on all slides (one per --seeds).")] = Deploy.ensemble,
    max_tiles: Annotated[int, typer.Option("--max-tiles", help="Random tiles per bag per training step.")] = 512,
    max_epochs: Annotated[int, typer.Option(
        "--max-epochs", help="Most passes over the training slides per fold (early stopping may end sooner).")] = 100,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation R² before stopping.")] = 15,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", help="AdamW weight decay (L2 penalty on the weights; 0 turns it off).")] = 0.1,
    head: Annotated[str, typer.Option(
        help="Tile head: probe (starts as the linear probe, the default), linear (on the normalised "
             "features) or mlp (on a hidden layer).")] = "probe",
    calibrate: Annotated[bool, typer.Option(
        help="Apply a post-hoc linear calibration fitted on the out-of-fold predictions (its line and "
             "cross-fitted estimate are in metrics.json → calibration either way; off by default: it "
             "never helped out of fold with the default recipe, docs/accuracy.md).")] = False,
    blend: Annotated[bool, typer.Option(
        help="Deploy w·MIL + (1−w)·linear probe, w chosen on the out-of-fold predictions "
             "(off by default: the probe head already starts from the probe).")] = False,
    stroma_prior: Annotated[Optional[bool], typer.Option(
        "--stroma-prior/--no-stroma-prior",
        help="Weight each tile by its estimated stroma fraction when pooling (sTIL% is defined on "
             "stroma). Default: on when the features have the estimate (a +stainmorph encoder).",
        show_default=False)] = None,
    stroma_floor: Annotated[float, typer.Option(
        "--stroma-floor", min=0.001,
        help="With the stroma prior, the pooling weight of a tile estimated to hold no stroma, beside "
             "1 + this for a tile of all stroma (larger: trust the estimate less).")] = STROMA_FLOOR,
    columns: Annotated[Columns, typer.Option(
        help="Feature columns the MIL reads: auto (cross-validate all of them, the stain morphometry's "
             "five measurements of sTIL% alone, and the four of them that read lymphocytes by darkness, "
             "each with tumour nests marked by pale nuclei and by the wide band (pale or moderately dense), "
             f"on the same folds; deploy every set {COLUMN_RULE} R², their models averaged: "
             "metrics.json → columns), all, measured, measured-dark, measured-wide or "
             "measured-dark-wide (these need a +stainmorph encoder; the -wide ones stainmorph.v7 or later).")] = Columns.auto,
    measured_emphasis: Annotated[Optional[float], typer.Option(
        "--measured-emphasis", min=0.001,
        help="With --columns all (or auto), how much the MIL's start (the ridge probe) weights the "
             "morphometry's five measurements of sTIL% over each texture column. Default: 10 when the "
             "features have them, 1 (equal) otherwise.", show_default=False)] = None,
    high_cutoff: Annotated[float, typer.Option(
        "--high-cutoff", help="sTIL-high vs low cut-off (%) for the headline AUC.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Random seed (folds, initialisation, tile sampling).")] = 0,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model of that name.")] = False,
    init: Annotated[Optional[Path], typer.Option(
        "--init", help="Warm start: fine-tune this model folder (same encoder and tiling) on the labels.")] = None,
    cv: Annotated[CV, typer.Option(
        "--cv", help="kfold (--folds, --folds-by) or leave-center-out (one fold per cohort/center).")] = CV.kfold,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Cross-validated MIL regression on slide-level sTIL% labels; writes models/NAME/ (+ model card)."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.fs import plain_json
    from weakstil.mil.cohort import train_from_cache

    values["config_file"] = ctx.meta.get("config_file")
    accelerator = {"auto": "auto", "cpu": "cpu"}.get(device, "gpu")
    aggregations = ["attention", "mean"] if aggregation == Aggregation.both else [aggregation.value]
    names = [name] if len(aggregations) == 1 else [f"{name}-{a}" for a in aggregations]
    try:
        for path in labels:
            checks.labels_file(path)
        for folder in features:
            checks.existing_dir(folder, "--features", "run `weakstil extract SLIDES --features DIR` first, or "
                                                      "point --features at the folder it wrote")
        if init is not None:
            checks.model_dir(init)
        checks.new_model_dirs(models, names, overwrite)
        results = train_from_cache(
            labels, features, encoder=encoder, models_dir=models, name=name, aggregations=aggregations,
            n_folds=folds, seeds=seeds, folds_by=folds_by.value, deploy=deploy.value, max_tiles=max_tiles,
            max_epochs=max_epochs, patience=patience, lr=lr, weight_decay=weight_decay, head=head,
            calibrate=calibrate, blend=blend, stroma_prior=stroma_prior, stroma_floor=stroma_floor,
            columns=columns.value,
            measured_emphasis=measured_emphasis,
            high_cutoff=high_cutoff, seed=seed, accelerator=accelerator, overwrite=overwrite,
            progress=not quiet, run_info=plain_json(values), init=init, cv=cv.value)
    except WeakstilError as exc:
        _fail(exc)
    from weakstil.mil.cohort import metrics_table, probe_verdict
    from weakstil.textout import emit

    emit(metrics_table(results))
    for run in results:
        verdict = probe_verdict(run)
        if verdict:
            typer.echo(f"train: {verdict}")
    for run in results:
        typer.echo(f"train: model {run.name} in {run.path} (model.ckpt, metrics.json, cv_predictions.csv, plots/)")
    best = max(results, key=lambda r: _r2_or_worst(r.metrics))
    typer.echo(checks.next_step(f"weakstil score SLIDES --model {best.path} --features {features[0]} --out results"))


def _r2_or_worst(metrics: dict) -> float:
    """Pooled R² for choosing the model to suggest; NaN or missing ranks last."""
    r2 = metrics.get("pooled", {}).get("r2")
    return r2 if isinstance(r2, (int, float)) and r2 == r2 else float("-inf")


@app.command()
def evaluate(
    ctx: typer.Context,
    labels: Annotated[Path, typer.Argument(help="CSV of slide_id,patient_id,stil of the new cohort (sTIL% 0-100).")],
    model: Annotated[Path, typer.Option("--model", help="A model folder written by `weakstil train`.")] = Path(
        "models/stil"),
    slides: Annotated[Optional[Path], typer.Option(
        "--slides", help="Folder of the cohort's slides: those missing from the cache are extracted.")] = None,
    features: Annotated[Path, typer.Option("--features", help="Feature cache folder.")] = Path("features"),
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, predictions.csv, plots/, "
                                                    "report.md.")] = Path("evaluation"),
    weights: Annotated[Optional[str], typer.Option(
        help="Where the model's encoder weights are now (file:/path), if they moved.")] = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """External validation on a new labelled cohort: metrics with 95% CIs, plots, report; adds to the model card."""
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.outputs.evaluate import evaluate_model
    from weakstil.wsi.slide import find_slides

    try:
        sources = slide_sources(find_slides(slides), backend=backend.value, mpp=mpp) if slides else []
        result = evaluate_model(labels, model, features_dir=features, out_dir=out, slides=sources, weights=weights,
                                opts=ExtractOptions(device=device, progress=not quiet))
    except WeakstilError as exc:
        _fail(exc)
    from weakstil.mil.cohort import _fmt

    m = result.metrics
    p, ci = m["pooled"], m["pooled_ci95"]
    r2_ci = ci.get("r2") or [None, None]
    failed = f"; {len(result.failed)} slide(s) could not be read: {', '.join(result.failed)}" if result.failed else ""
    typer.echo(f"evaluate: {m['n_slides']} slides: R² {_fmt(p.get('r2'), 3)} [{_fmt(r2_ci[0], 3)}, {_fmt(r2_ci[1], 3)}], "
               f"AUC@30 {_fmt(p.get('auc@30'), 3)}, MAE {_fmt(p.get('mae'), 1)}; {m['n_flagged']} QC-flagged"
               f"{failed}; report: {result.report}")
    advice = (m.get("scale") or {}).get("advice")
    if advice:
        typer.echo(f"evaluate: {advice}.")
    typer.echo(checks.next_step(f"open {result.report}, or review the slides: weakstil view {out}"))
