"""Getting started: demo, synth (a synthetic cohort), encoders (what can embed tiles)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    ConfigOpt,
    DeviceOpt,
    QuietOpt,
    _fail,
    app,
)
from weakstil.cli import checks
from weakstil.errors import WeakstilError


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write slides/, labels.csv and truth/ into.")],
    n: Annotated[int, typer.Option("--n", help="Number of slides.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")] = 0,
    size_um: Annotated[Optional[float], typer.Option(
        help="Canvas width in µm (height is 4/5 of it; default 2000).")] = None,
    workers: Annotated[int, typer.Option(help="Processes used to render slides.")] = 2,
    prefix: Annotated[Optional[str], typer.Option(
        help="Slide ids are PREFIX-000, PREFIX-001, … (default: SYN for lattice, CEL for cells, REG for regions, "
             "VOR for voronoi).")] = None,
    family: Annotated[str, typer.Option(
        help="Generator: lattice (the original), cells (cell-level, independent), regions (per-pixel "
             "regions from smooth fields, cell bodies rasterised; held-out) or voronoi (noise-field layout, "
             "Voronoi tumour cells, lymphocytes on a jittered lattice; held-out); see docs/synthetic.md.")
    ] = "lattice",
    setting: Annotated[str, typer.Option(
        help="standard; hard (tumour 10-85 %, intratumoral lymphocytes, 2x stain variation); "
             "dark-nuclei (cells only: hyperchromatic tumour nuclei, as dark as lymphocytes).")
    ] = "standard",
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic cohort: Aperio-like pyramidal TIFFs with known sTIL%, labels.csv and truth maps."""
    from weakstil.synth import write_cohort

    try:
        root = write_cohort(out, family=family, n=n, seed=seed, setting=setting, workers=workers,
                            prefix=prefix, size_um=size_um)
    except WeakstilError as exc:
        _fail(exc)
    typer.echo(f"synth: wrote {n} slides to {root / 'slides'} and their labels to {root / 'labels.csv'}")
    typer.echo(checks.next_step(f"weakstil check {root / 'slides'}, then weakstil extract {root / 'slides'}"))


@app.command()
def encoders(config: ConfigOpt = None) -> None:
    """List the registered encoders (and the `weakstil pretrain` folders in models/encoders/)."""
    from weakstil.embed.encoder_folders import list_encoder_folders
    from weakstil.embed.encoders import encoders_table, list_encoders
    from weakstil.textout import emit

    specs = list_encoders()
    folders = [f.spec for f in list_encoder_folders()]
    emit(encoders_table(specs + folders))
    typer.echo(f"encoders: {len(specs)} registered, {len(folders)} pretrained folder(s) in models/encoders/ "
               "(plus any timm model as timm:<name>, and any of them +stainmorph)")
    typer.echo(checks.next_step("weakstil extract SLIDES --encoder NAME|DIR [--weights file:/path/to/checkpoint]"))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working folder for the demo's slides, cache, models, results.")] = Path(
        "demo"),
    n: Annotated[int, typer.Option("--n", help="Training slides (cross-validated).")] = 40,
    n_test: Annotated[int, typer.Option("--n-test", help="Held-out test slides, scored at the end.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic cohort.")] = 0,
    size_um: Annotated[Optional[float], typer.Option(
        help="Slide canvas width in µm (default 1600; height 0.8 ×); smaller is quicker, with fewer tiles.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """The whole pipeline on a synthetic cohort, offline: synth → extract → train (CV) → score → metrics."""
    from weakstil.demo import run_demo

    try:
        run_demo(out, n=n, n_test=n_test, seed=seed, device=device, progress=not quiet, size_um=size_um)
    except WeakstilError as exc:
        _fail(exc)
