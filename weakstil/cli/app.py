"""The `weakstil` app, its shared options and helpers. The commands live beside it by stage.

The command line: parse → resolve config → call the library → map errors to exit codes.

Exit codes: 0 everything succeeded; 1 some slides failed (the rest were done, see the summary);
2 bad input that stopped the command (the message says how to fix it).
Heavy libraries are imported inside the commands so `weakstil --help` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.config import defaults_for, load_config_file
from weakstil.errors import WeakstilError

app = typer.Typer(
    name="weakstil",
    help="Score stromal TIL% in H&E whole-slide images, trained on slide-level labels only.\n\n"
    "Start with `weakstil demo` (offline, CPU, synthetic slides).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _config_callback(ctx: typer.Context, param, value: Optional[Path]):
    """Eager --config: the file's values become this command's defaults (flags still win)."""
    if value is None:
        return value
    known = {p.name for p in ctx.command.params if p.name}
    try:
        values = defaults_for(load_config_file(value), ctx.info_name or "", known, path=value)
    except WeakstilError as exc:
        raise typer.BadParameter(str(exc)) from exc
    ctx.default_map = {**(ctx.default_map or {}), **values}
    ctx.meta["config_file"] = str(value)
    return value


class Backend(str, Enum):
    auto = "auto"
    openslide = "openslide"
    tiffslide = "tiffslide"


class Aggregation(str, Enum):
    weighted = "weighted"
    attention = "attention"
    mean = "mean"
    both = "both"


class FoldsBy(str, Enum):
    patient = "patient"
    center = "center"


class Deploy(str, Enum):
    ensemble = "ensemble"
    final = "final"


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="YAML file of option values (flags on the command line win).",
    is_eager=True, callback=_config_callback, exists=False)]
BackendOpt = Annotated[Backend, typer.Option(help="Slide reader: OpenSlide, TiffSlide, or auto (OpenSlide first).")]
MppOpt = Annotated[Optional[float], typer.Option(
    "--mpp", help="µm per pixel for slides that do not state it (with --force-mpp: for every slide).")]
ForceMppOpt = Annotated[bool, typer.Option("--force-mpp", help="Use --mpp even where a slide states its own mpp.")]
MppCsvOpt = Annotated[Optional[Path], typer.Option(
    "--mpp-csv", help="CSV of slide_id,mpp; these values override what the slides state.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
FeaturesOpt = Annotated[Path, typer.Option("--features", help="Feature cache folder (or one .zarr store).")]


def _fail(exc: WeakstilError) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def _open_kwargs(backend: Backend, mpp, force_mpp, mpp_csv) -> dict:
    """Keywords for :func:`weakstil.wsi.slide.check_slides` / :func:`weakstil.embed.extract.slide_sources`."""
    from weakstil.wsi.slide import read_mpp_csv

    return {
        "backend": backend.value,
        "mpp": mpp,
        "mpp_override": force_mpp,
        "mpp_by_slide": read_mpp_csv(mpp_csv) if mpp_csv else None,
    }


def _save_run_config(ctx: typer.Context, path: Path, values: dict) -> None:
    """Write the resolved options of this run (defaults < config file < flags) as YAML."""
    from weakstil.config import save_resolved

    save_resolved({"command": ctx.info_name, "config_file": ctx.meta.get("config_file"), **values}, path)


def _file_names(sources, slides: Path) -> dict[str, str]:
    """{slide_id: the file as the user knows it} (relative to a SLIDES folder), for failure reports."""
    names = {}
    for source in sources:
        try:
            names[source.slide_id] = str(Path(source.path).relative_to(slides)) if slides.is_dir() else str(slides)
        except ValueError:
            names[source.slide_id] = str(source.path)
    return names


def _print_outcomes(outcomes, *, what: str, extra: str = "", files: dict | None = None) -> None:
    """The batch summary; with ``files`` ({slide_id: file}) each failure names its file."""
    from dataclasses import replace

    from rich.console import Console

    from weakstil.runs.runner import counts, summarize

    console = Console(stderr=True)
    shown = [replace(o, key=files.get(o.key, o.key)) if files and o.status == "failed" else o for o in outcomes]
    console.print(summarize(shown))
    n = counts(outcomes)
    console.print(f"{what}: {n['done']} done, {n['skipped']} skipped, {n['failed']} failed{extra}")


EncoderOpt = Annotated[str, typer.Option(help="Encoder name (see `weakstil encoders`).")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    help="Weight source: file:/path/to/checkpoint or hf-hub:org/name (default: the encoder's own).")]
BatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Tiles per encoder forward pass (default: 32 on a CPU, 256 on a GPU).")]
ReadWorkersOpt = Annotated[Optional[int], typer.Option(
    "--read-workers", help="Tile-reading processes per slide (default: none on a CPU with ≤ 4 cores, up to 4 on bigger ones, one per core but one (up to 16) with CUDA; 0 = one reader thread).")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Slides in parallel: N>1 starts a local Dask cluster of N processes.")]
SchedulerOpt = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Address of a running Dask scheduler (tcp://host:port) to send slides to.")]
RoiOpt = Annotated[Optional[Path], typer.Option(
    "--roi", help="Folder of QuPath GeoJSON exports named <slide_id>.geojson; tiles are kept inside them.")]
TilePxOpt = Annotated[int, typer.Option("--tile-px", help="Tile edge in pixels.")]
TileMppOpt = Annotated[float, typer.Option("--tile-mpp", help="Tile resolution in µm per pixel.")]
OverlapOpt = Annotated[int, typer.Option("--overlap", help="Pixels shared by neighbouring tiles.")]
MinTissueOpt = Annotated[float, typer.Option("--min-tissue", help="Keep tiles with at least this tissue fraction.")]
LockOpt = Annotated[bool, typer.Option("--lock/--no-lock",
                                       help="Per-slide lock files, so several processes can share a folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
