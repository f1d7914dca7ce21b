"""Commands for review: heatmap (regenerate a results bundle) and view (the web viewer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    Backend,
    BackendOpt,
    ConfigOpt,
    ForceMppOpt,
    HeatmapMppOpt,
    MppCsvOpt,
    MppOpt,
    QuietOpt,
    _exit_for,
    _fail,
    _open_kwargs,
    _print_outcomes,
    app,
)
from weakstil.cli import checks
from weakstil.errors import WeakstilError

RESULTS_FIX = "give the folder `weakstil score --out` wrote (it holds scores.csv and slides/)"


@app.command()
def heatmap(
    results: Annotated[Path, typer.Argument(help="A results folder written by `weakstil score`.")] = Path("results"),
    slides: Annotated[Optional[Path], typer.Option(
        "--slides", help="Folder of the slides (default: the paths recorded in each score.json).")] = None,
    outputs: Annotated[str, typer.Option(
        help="Files to rewrite, comma-separated from png,tif,geojson,top,csv.")] = "png,tif,geojson,top",
    cutoff: Annotated[Optional[float], typer.Option(
        help="sTIL-high cut-off (%) for the GeoJSON classes (default: the one used when scoring).")] = None,
    backend: BackendOpt = Backend.auto,
    mpp: HeatmapMppOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Rewrite the per-slide review files (heatmaps, GeoJSON, top tiles) from tiles.csv — no model needed."""
    from weakstil.outputs.bundle import REGENERATE_FORMATS
    from weakstil.runs.batch import regenerate

    try:
        formats = checks.formats(outputs, REGENERATE_FORMATS + ("csv",))
        checks.existing_dir(results, "RESULTS", RESULTS_FIX)
        checks.existing_dir(slides, "--slides", "give the folder holding the slides")
        outcomes = regenerate(results, slides, backend=backend.value, mpp=mpp, formats=formats, cutoff=cutoff,
                              progress=not quiet)
    except WeakstilError as exc:
        _fail(exc)
    _print_outcomes(outcomes, what="heatmap", extra=f"; files rewritten in {results / 'slides'}/<slide id>/")
    view = f"weakstil view {results}" + (f" --slides {slides}" if slides else "")
    typer.echo(checks.next_step(view), err=True)
    _exit_for(outcomes)


def _check_port(value: int) -> int:
    """TCP ports are 1-65535: anything else is a usage error (exit 2), not an OverflowError later."""
    if value is not None and not 1 <= value <= 65535:
        raise typer.BadParameter(f"a port is a number from 1 to 65535, not {value}")
    return value


@app.command()
def view(
    results: Annotated[Path, typer.Argument(help="A results folder written by `weakstil score`.")] = Path("results"),
    slides: Annotated[Optional[Path], typer.Option(
        "--slides", help="Folder of the slides (default: slides/ next to RESULTS).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(
        callback=_check_port, help="Port to listen on (1-65535).")] = 8000,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Allow a non-loopback --host (anyone who can reach it sees the slides).")] = False,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", help="CSV of slide_id,patient_id,stil: a label column and model-vs-label figures in the "
                         "cohort table (default: labels.csv in or beside RESULTS, if any).")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the cohort page in a browser.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Local web viewer: cohort table, slides in deep zoom with the heatmap overlay. Read-only."""
    from weakstil.viewer import serve

    try:
        checks.existing_dir(results, "RESULTS", RESULTS_FIX)
        checks.existing_dir(slides, "--slides", "give the folder holding the slides")
        if labels is not None:
            checks.labels_file(labels)
        kwargs = _open_kwargs(backend, mpp, force_mpp, mpp_csv)
        serve(results, slides, host=host, port=port, allow_remote=allow_remote, backend=kwargs["backend"],
              mpp=kwargs["mpp"], mpp_override=kwargs["mpp_override"], mpp_by_slide=kwargs["mpp_by_slide"],
              open_browser=open_browser, labels=labels)
    except WeakstilError as exc:
        _fail(exc)
