"""Commands that train and judge models: train."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    Aggregation,
    ConfigOpt,
    Deploy,
    DeviceOpt,
    FeaturesOpt,
    FoldsBy,
    QuietOpt,
    _fail,
    app,
)
from weakstil.errors import WeakstilError


@app.command()
def train(
    ctx: typer.Context,
    labels: Annotated[Path, typer.Argument(help="CSV of slide_id,patient_id,stil[,center] (sTIL% 0-100).")],
    features: FeaturesOpt = Path("features"),
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
    deploy: Annotated[Deploy, typer.Option(
        help="Deployed model: the ensemble of the fold models, or one final fit on all slides.")] = Deploy.ensemble,
    max_tiles: Annotated[int, typer.Option("--max-tiles", help="Random tiles per bag per training step.")] = 512,
    max_epochs: Annotated[int, typer.Option("--max-epochs")] = 100,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation R² before stopping.")] = 15,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.1,
    head: Annotated[str, typer.Option(
        help="Tile head: linear (on the features, the default) or mlp (on a hidden layer).")] = "linear",
    calibrate: Annotated[bool, typer.Option(
        help="Post-hoc linear calibration fitted on the out-of-fold predictions.")] = True,
    high_cutoff: Annotated[float, typer.Option(
        "--high-cutoff", help="sTIL-high vs low cut-off (%) for the headline AUC.")] = 30.0,
    seed: Annotated[int, typer.Option(help="Random seed (folds, initialisation, tile sampling).")] = 0,
    device: DeviceOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing model of that name.")] = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Cross-validated MIL regression on slide-level sTIL% labels; writes models/NAME/."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.config import to_plain
    from weakstil.mil.cohort import train_from_cache

    values["config_file"] = ctx.meta.get("config_file")
    accelerator = {"auto": "auto", "cpu": "cpu"}.get(device, "gpu")
    aggregations = ["attention", "mean"] if aggregation == Aggregation.both else [aggregation.value]
    try:
        results = train_from_cache(
            labels, features, encoder=encoder, models_dir=models, name=name, aggregations=aggregations,
            n_folds=folds, folds_by=folds_by.value, deploy=deploy.value, max_tiles=max_tiles,
            max_epochs=max_epochs, patience=patience, lr=lr, weight_decay=weight_decay, head=head,
            calibrate=calibrate,
            high_cutoff=high_cutoff, seed=seed, accelerator=accelerator, overwrite=overwrite,
            progress=not quiet, run_info=to_plain(values))
    except WeakstilError as exc:
        _fail(exc)
    from rich.console import Console

    from weakstil.mil.cohort import metrics_table

    Console().print(metrics_table(results))
