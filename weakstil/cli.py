"""The `weakstil` command line: parse → resolve config → call the library → map errors to exit codes.

Exit codes: 0 everything succeeded; 1 some slides failed (the rest were done, see the summary);
2 bad input that stopped the command (the message says how to fix it).
Heavy libraries are imported inside the commands so `weakstil --help` stays fast.
"""

from __future__ import annotations

import sys
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


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write slides/, labels.csv and truth/ into.")],
    n: Annotated[int, typer.Option("--n", help="Number of slides.")] = 40,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")] = 0,
    size_um: Annotated[Optional[float], typer.Option(
        help="Canvas width in µm (height is 4/5 of it; default 2000).")] = None,
    workers: Annotated[int, typer.Option(help="Processes used to render slides.")] = 2,
    prefix: Annotated[str, typer.Option(help="Slide ids are PREFIX-000, PREFIX-001, …")] = "SYN",
    config: ConfigOpt = None,
) -> None:
    """Write a synthetic cohort: Aperio-like pyramidal TIFFs with known sTIL%, labels.csv and truth maps."""
    from weakstil.synth.lattice import synth_cohort

    try:
        kwargs = {"size_um": size_um} if size_um else {}
        root = synth_cohort(out, n=n, seed=seed, workers=workers, prefix=prefix, **kwargs)
    except WeakstilError as exc:
        _fail(exc)
    typer.echo(f"wrote {n} slides to {root / 'slides'} and labels to {root / 'labels.csv'}")


@app.command()
def check(
    slides: Annotated[Path, typer.Argument(help="A folder of slides or one slide file.")] = Path("slides"),
    out: Annotated[Path, typer.Option("--out", help="Where to write the table as CSV.")] = Path("check.csv"),
    qc_dir: Annotated[Optional[Path], typer.Option(help="Write a tissue-mask QC picture per slide here.")] = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Preflight: which slides open, their vendor, mpp, size, levels and tissue; what is wrong with the rest."""
    from rich.console import Console

    from weakstil.wsi.check import check_slides, check_table, write_check_csv
    from weakstil.wsi.slide import find_slides

    try:
        paths = find_slides(slides)
        rows = check_slides(paths, qc_dir=qc_dir, **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        write_check_csv(rows, out)
    except WeakstilError as exc:
        _fail(exc)
    console = Console()
    console.print(check_table(rows))
    failed = [r for r in rows if r.status != "ok"]
    console.print(f"{len(rows) - len(failed)} ok, {len(failed)} failed — table written to {out}")
    if failed:
        raise typer.Exit(1)


@app.command()
def encoders(config: ConfigOpt = None) -> None:
    """List the registered encoders: embedding size, input size, weight source and licence."""
    from rich.console import Console

    from weakstil.embed.encoders import encoders_table, list_encoders

    Console().print(encoders_table(list_encoders()))


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


def _extract_options(device, batch_size, read_workers, quiet):
    from weakstil.embed.extract import ExtractOptions

    return ExtractOptions(device=device, batch_size=batch_size, workers=read_workers, progress=not quiet)


def _run_slides(kind: str, sources, make_job_args: dict, workers, scheduler, local):
    """In-process (``local()``) or on Dask when --workers N>1 or --scheduler is given."""
    if (workers is None or workers <= 1) and not scheduler:
        return local()
    from weakstil.runs.executors import run_on_dask

    return run_on_dask(kind, sources, make_job_args, workers=workers, scheduler=scheduler)


@app.command()
def extract(
    ctx: typer.Context,
    slides: Annotated[Path, typer.Argument(help="A folder of slides or one slide file.")] = Path("slides"),
    features: FeaturesOpt = Path("features"),
    encoder: EncoderOpt = "resnet18-random",
    weights: WeightsOpt = None,
    tile_px: TilePxOpt = 224,
    tile_mpp: TileMppOpt = 0.5,
    overlap: OverlapOpt = 0,
    min_tissue: MinTissueOpt = 0.5,
    roi: RoiOpt = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    read_workers: ReadWorkersOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    lock: LockOpt = True,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Tissue → tiles → embeddings → the Zarr feature cache. Resumable: finished slides are skipped."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import extract_slides, slide_sources
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    try:
        spec = TileSpec(tile_px=tile_px, mpp=tile_mpp, overlap=overlap, min_tissue=min_tissue)
        tissue = TissueParams()
        sources = slide_sources(find_slides(slides), **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        opts = _extract_options(device, batch_size, read_workers, quiet)
        enc = create_encoder(encoder, weights)

        def local():
            return extract_slides(sources, features, encoder=enc, spec=spec, tissue=tissue, opts=opts,
                                  roi_dir=roi, lock=lock).outcomes

        job_args = {"features": features, "encoder": encoder, "weights": weights, "spec": spec, "tissue": tissue,
                    "opts": opts, "roi_dir": roi, "lock": lock}
        outcomes = _run_slides("extract", sources, job_args, workers, scheduler, local)
    except WeakstilError as exc:
        _fail(exc)
    from weakstil.embed.extract import open_cache

    cache = open_cache(features, enc, spec, tissue)
    _save_run_config(ctx, cache.path.parent / "runs" / f"{cache.path.stem}.extract.yaml", values)
    n_tiles = sum(int(o.result or 0) for o in outcomes if o.status == "done")
    _print_outcomes(outcomes, what="extract", extra=f"; {n_tiles} new tiles; cache {cache.path}",
                    files=_file_names(sources, slides))
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


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
        help="How tile predictions become the slide score: attention (ECTIL), mean (WeakSTIL), "
             "or both (two models NAME-attention and NAME-mean).")] = Aggregation.attention,
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds.")] = 5,
    folds_by: Annotated[FoldsBy, typer.Option(
        "--folds-by", help="Keep each patient (or each center) inside one fold.")] = FoldsBy.patient,
    deploy: Annotated[Deploy, typer.Option(
        help="Deployed model: the ensemble of the fold models, or one final fit on all slides.")] = Deploy.ensemble,
    max_tiles: Annotated[int, typer.Option("--max-tiles", help="Random tiles per bag per training step.")] = 512,
    max_epochs: Annotated[int, typer.Option("--max-epochs")] = 60,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation R² before stopping.")] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-2,
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
            max_epochs=max_epochs, patience=patience, lr=lr, weight_decay=weight_decay,
            high_cutoff=high_cutoff, seed=seed, accelerator=accelerator, overwrite=overwrite,
            progress=not quiet, run_info=to_plain(values))
    except WeakstilError as exc:
        _fail(exc)
    from rich.console import Console

    from weakstil.mil.cohort import metrics_table

    Console().print(metrics_table(results))


@app.command()
def score(
    ctx: typer.Context,
    slides: Annotated[Path, typer.Argument(help="A folder of slides or one slide file.")] = Path("slides"),
    model: Annotated[Path, typer.Option("--model", help="A model folder written by `weakstil train`.")] = Path(
        "models/stil"),
    features: FeaturesOpt = Path("features"),
    out: Annotated[Path, typer.Option("--out", help="Results folder.")] = Path("results"),
    weights: WeightsOpt = None,
    roi: RoiOpt = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    read_workers: ReadWorkersOpt = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    lock: LockOpt = True,
    outputs: Annotated[str, typer.Option(
        help="Per-slide files, comma-separated from csv,png,tif,geojson,top.")] = "csv,png,tif,geojson,top",
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Score slides with a trained model: extracts what is missing, writes results/ (scores + heatmaps)."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.embed.extract import slide_sources
    from weakstil.outputs.score import score_slides
    from weakstil.wsi.slide import find_slides

    formats = tuple(f.strip() for f in outputs.split(",") if f.strip())
    try:
        sources = slide_sources(find_slides(slides), **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        opts = _extract_options(device, batch_size, read_workers, quiet)
        job_args = {"model": model, "features": features, "out": out, "weights": weights, "opts": opts,
                    "roi_dir": roi, "formats": formats, "lock": lock}

        def local():
            return score_slides(sources, model, features_dir=features, out_dir=out, weights=weights, opts=opts,
                                roi_dir=roi, formats=formats, lock=lock).outcomes

        outcomes = _run_slides("score", sources, job_args, workers, scheduler, local)
    except WeakstilError as exc:
        _fail(exc)
    _save_run_config(ctx, out / "config.yaml", values)
    _print_outcomes(outcomes, what="score", extra=f"; scores in {out / 'scores.csv'}",
                    files=_file_names(sources, slides))
    if any(o.status == "failed" for o in outcomes):
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working folder for the demo's slides, cache, models, results.")] = Path(
        "demo"),
    n: Annotated[int, typer.Option("--n", help="Training slides (cross-validated).")] = 40,
    n_test: Annotated[int, typer.Option("--n-test", help="Held-out test slides, scored at the end.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic cohort.")] = 0,
    size_um: Annotated[Optional[float], typer.Option(
        help="Slide canvas width in µm (default 2000); smaller is quicker, with fewer tiles.")] = None,
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


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="weakstil")
    except WeakstilError as exc:  # a library error that escaped a command
        _fail(exc)


if __name__ == "__main__":
    sys.exit(main())
