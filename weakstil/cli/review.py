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
    MppCsvOpt,
    MppOpt,
    QuietOpt,
    _fail,
    _open_kwargs,
    _print_outcomes,
    app,
)
from weakstil.errors import WeakstilError


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
    mpp: MppOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Rewrite the per-slide review files (heatmaps, GeoJSON, top tiles) from tiles.csv — no model needed."""
    from weakstil.outputs.bundle import regenerate

    formats = tuple(f.strip() for f in outputs.split(",") if f.strip())
    try:
        outcomes = regenerate(results, slides, backend=backend.value, mpp=mpp, formats=formats, cutoff=cutoff,
                              progress=not quiet)
    except WeakstilError as exc:
        _fail(exc)
    _print_outcomes(outcomes, what="heatmap")
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


@app.command()
def view(
    results: Annotated[Path, typer.Argument(help="A results folder written by `weakstil score`.")] = Path("results"),
    slides: Annotated[Optional[Path], typer.Option(
        "--slides", help="Folder of the slides (default: slides/ next to RESULTS).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Allow a non-loopback --host (anyone who can reach it sees the slides).")] = False,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the cohort page in a browser.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Local web viewer: cohort table, slides in deep zoom with the heatmap overlay. Read-only."""
    from weakstil.viewer import serve

    kwargs = _open_kwargs(backend, mpp, force_mpp, mpp_csv)
    try:
        serve(results, slides, host=host, port=port, allow_remote=allow_remote, backend=kwargs["backend"],
              mpp=kwargs["mpp"], mpp_override=kwargs["mpp_override"], mpp_by_slide=kwargs["mpp_by_slide"],
              open_browser=open_browser)
    except WeakstilError as exc:
        _fail(exc)
