"""The `weakstil` app, its shared options and helpers. The commands live beside it by stage.

The command line: parse → resolve config → call the library → map errors to exit codes.

Exit codes: 0 everything succeeded; 1 some slides failed (the rest were done, see the summary);
2 bad input that stopped the command (the message says how to fix it); 3 some slides were left to
another process that holds their lock (none failed; they are named; rerun, or pass --wait).
Heavy libraries are imported inside the commands so `weakstil --help` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.config import defaults_for, load_config_file
from weakstil.errors import WeakstilError

def _flags_show_no_type() -> None:
    """Typer 0.29's rich help prints ``<bool>`` after every flag, as if it took a value; show flags
    bare, as click's plain help does (a flag's type is only shown when it has a metavar)."""
    option = getattr(typer.core, "TyperOption", None)
    original = getattr(option, "display_type_rich", None)
    if original is None or getattr(original, "_weakstil", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else original(self, ctx)

    display_type_rich._weakstil = True
    option.display_type_rich = display_type_rich


_flags_show_no_type()

app = typer.Typer(
    name="weakstil",
    help="Score stromal TIL% in H&E whole-slide images, trained on slide-level labels only.\n\n"
    "Start with `weakstil demo` (offline, CPU, synthetic slides).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        from weakstil import __version__

        typer.echo(f"weakstil {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", help="Print the weakstil version and exit.", is_eager=True,
        callback=_version_callback)] = False) -> None:
    """Score stromal TIL% in H&E whole-slide images, trained on slide-level labels only.

    Start with `weakstil demo` (offline, CPU, synthetic slides).
    """


def _config_callback(ctx: typer.Context, param, value: Optional[Path]):
    """Eager --config: the file's values become this command's defaults (flags still win)."""
    if value is None:
        return value
    known = {p.name for p in ctx.command.params if p.name}
    try:
        values = defaults_for(load_config_file(value), ctx.info_name or "", known, path=value,
                              **_config_scope(ctx))
    except WeakstilError as exc:
        raise typer.BadParameter(str(exc)) from exc
    ctx.default_map = {**(ctx.default_map or {}), **values}
    ctx.meta["config_file"] = str(value)
    return value


def _config_scope(ctx: typer.Context) -> dict:
    """Every command's option names, the command names and this command's boolean options."""
    group = ctx.find_root().command
    commands = getattr(group, "commands", {}) or {ctx.info_name: ctx.command}
    all_options = {p.name for c in commands.values() for p in c.params if p.name}
    booleans = {p.name for p in ctx.command.params
                if getattr(p, "is_bool_flag", False) or getattr(p, "bare_type", None) is bool}
    return {"all_options": all_options, "commands": tuple(commands), "booleans": booleans}


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
HeatmapMppOpt = Annotated[Optional[float], typer.Option(
    "--mpp", help="µm per pixel for slides that do not state it.")]
DeviceOpt = Annotated[str, typer.Option(help="Where the model runs: auto (CUDA if present), cpu, cuda or cuda:N.")]
FeaturesOpt = Annotated[Path, typer.Option("--features", help="Feature cache folder (or one .zarr store).")]


def _fail(exc: WeakstilError) -> None:
    from rich.console import Console

    from rich.text import Text

    # soft_wrap: a long message or path is never cut; the message is plain text, not rich markup
    Console(stderr=True).print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)
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

    try:
        save_resolved({"command": ctx.info_name, "config_file": ctx.meta.get("config_file"), **values}, path)
    except WeakstilError as exc:  # a full disk (DiskFullError): the message, exit 2, no traceback
        _fail(exc)


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

    from weakstil.textout import emit

    shown = [replace(o, key=files.get(o.key, o.key)) if files and o.status == "failed" else o for o in outcomes]
    emit(summarize(shown), stderr=True)
    n = counts(outcomes)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"{what}: {n['done']} done, {n['skipped']} skipped, {n['failed']} failed{extra}", markup=False)


EncoderOpt = Annotated[str, typer.Option(
    help="Encoder name (see `weakstil encoders`), or a folder written by `weakstil pretrain`; append "
         "+stainmorph to add the stain-morphometry features (e.g. resnet18-random+stainmorph).")]
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
StainOpt = Annotated[str, typer.Option(
    "--stain-norm", help="Tile colours before the encoder: macenko (each slide's H&E mapped onto a reference) "
                         "or none. Part of the cache key; a model trained on it scores with it.")]
LockOpt = Annotated[bool, typer.Option("--lock/--no-lock",
                                       help="Per-slide lock files, so several processes can share a folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="Wait for slides another process is working on (locked) instead of leaving them to it (exit 3).")]
EXIT_LEFT_TO_OTHERS = 3


def _exit_for(outcomes) -> None:
    """Exit 1 when a slide failed; 3 when some were left to another process (named); else return."""
    import typer
    from rich.console import Console

    from weakstil.runs.runner import left_to_others

    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)
    left = left_to_others(outcomes)
    if left:
        console = Console(stderr=True)
        console.print(f"[yellow]{len(left)} slide(s) left to another process:[/]", highlight=False)
        for o in left:
            console.print(f"  {o.key}: {o.error}", highlight=False, markup=False)
        console.print("rerun when that process has finished, or pass --wait to wait for it", highlight=False)
        raise typer.Exit(EXIT_LEFT_TO_OTHERS)
