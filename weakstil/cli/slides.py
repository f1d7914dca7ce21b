"""Commands that work on a folder of slides: check, extract, score."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    Backend,
    BackendOpt,
    BatchOpt,
    ConfigOpt,
    DeviceOpt,
    EncoderOpt,
    FeaturesOpt,
    ForceMppOpt,
    LockOpt,
    MinTissueOpt,
    MppCsvOpt,
    MppOpt,
    OverlapOpt,
    QuietOpt,
    ReadWorkersOpt,
    RoiOpt,
    SchedulerOpt,
    StainOpt,
    TileMppOpt,
    TilePxOpt,
    WaitOpt,
    WeightsOpt,
    WorkersOpt,
    _exit_for,
    _fail,
    _file_names,
    _open_kwargs,
    _print_outcomes,
    _save_run_config,
    app,
)
from weakstil.cli import checks
from weakstil.embed.encoders import DEFAULT_ENCODER
from weakstil.errors import ConfigError, WeakstilError

# extraction speed options (docs/performance.md)
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="Encoder arithmetic: auto (fp16 on a GPU, bf16 on a CPU with native bf16: AMX or AVX512-BF16, else fp32), fp32, bf16, fp16.")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile/--no-compile", help="torch.compile the encoder (slower start, faster on big runs).")]
DecodeOpt = Annotated[str, typer.Option(
    "--decode", help="Where JPEG tiles are decoded: auto (the GPU with CUDA and JPEG tiles), cpu, gpu.")]
DevicesOpt = Annotated[Optional[str], typer.Option(
    "--devices", help="One worker per device, e.g. cuda:0,cuda:1 (each sees only its GPU).")]


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
    from weakstil.textout import emit
    from weakstil.wsi.check import check_slides, check_table, write_check_csv
    from weakstil.wsi.slide import find_slides

    try:
        paths = find_slides(slides)
        open_kwargs = _open_kwargs(backend, mpp, force_mpp, mpp_csv)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder", fix="give a file name, e.g. --out check.csv")
        rows = check_slides(paths, qc_dir=qc_dir, **open_kwargs)
        write_check_csv(rows, out)
    except WeakstilError as exc:
        _fail(exc)
    emit(check_table(rows))
    failed = [r for r in rows if r.status != "ok"]
    qc = f"; tissue-mask pictures in {qc_dir}" if qc_dir else ""
    typer.echo(f"check: {len(rows) - len(failed)} ok, {len(failed)} failed — table written to {out}{qc}")
    if failed:
        typer.echo("next: fix what the problem / fix column says (e.g. --mpp, --mpp-csv), or go on: "
                   f"`weakstil extract {slides}` skips slides that fail")
        raise typer.Exit(1)
    typer.echo(checks.next_step(f"weakstil extract {slides} --features features"))


def _extract_options(device, batch_size, read_workers, quiet, precision="auto", compile=False, decode="auto"):
    from weakstil.embed.extract import ExtractOptions, resolve_device, resolve_precision
    from weakstil.embed.gpu_decode import resolve_decode

    # refused before any slide is opened: unknown names, fp16 or GPU decoding without a GPU
    where = resolve_device(device) if precision == "fp16" or decode == "gpu" else "cuda"
    resolve_precision(precision, where)
    resolve_decode(decode, where)
    return ExtractOptions(device=device, batch_size=batch_size, workers=read_workers, progress=not quiet,
                          precision=precision, compile=compile, decode=decode)


def _run_slides(kind: str, sources, make_job_args: dict, workers, scheduler, local, wait: bool = False,
                devices=None):
    """In-process (``local()``), on one Dask worker per device (--devices), or on Dask when
    --workers N>1 or --scheduler is given."""
    if devices:
        from weakstil.runs.executors import run_on_devices

        return run_on_devices(kind, sources, make_job_args, devices.split(","), wait=wait)
    if (workers is None or workers <= 1) and not scheduler:
        return local()
    from weakstil.runs.executors import run_on_dask

    return run_on_dask(kind, sources, make_job_args, workers=workers, scheduler=scheduler, wait=wait)


@app.command()
def extract(
    ctx: typer.Context,
    slides: Annotated[Path, typer.Argument(help="A folder of slides or one slide file.")] = Path("slides"),
    features: FeaturesOpt = Path("features"),
    encoder: EncoderOpt = DEFAULT_ENCODER,
    weights: WeightsOpt = None,
    tile_px: TilePxOpt = 224,
    tile_mpp: TileMppOpt = 0.5,
    overlap: OverlapOpt = 0,
    min_tissue: MinTissueOpt = 0.5,
    stain_norm: StainOpt = "macenko",
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
    wait: WaitOpt = False,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    decode: DecodeOpt = "auto",
    devices: DevicesOpt = None,
) -> None:
    """Tissue → tiles → embeddings → the Zarr feature cache. Resumable: finished slides are skipped."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    try:
        spec = TileSpec(tile_px=tile_px, mpp=tile_mpp, overlap=overlap, min_tissue=min_tissue, stain=stain_norm)
        tissue = TissueParams()
        checks.existing_dir(roi, "--roi", "give the folder of <slide_id>.geojson files exported from QuPath")
        sources = slide_sources(find_slides(slides), **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        checks.writable_dir(features, "--features")
        checks.encoder(encoder, weights)
        opts = _extract_options(device, batch_size, read_workers, quiet, precision, compile, decode)
        enc = create_encoder(encoder, weights)

        def local():
            return extract_slides(sources, features, encoder=enc, spec=spec, tissue=tissue, opts=opts,
                                  roi_dir=roi, lock=lock, wait=wait).outcomes

        job_args = {"features": features, "encoder": encoder, "weights": weights, "spec": spec, "tissue": tissue,
                    "opts": opts, "roi_dir": roi, "lock": lock}
        outcomes = _run_slides("extract", sources, job_args, workers, scheduler, local, wait, devices)
    except WeakstilError as exc:
        _fail(exc)
    from weakstil.embed.extract import open_cache

    cache = open_cache(features, enc, spec, tissue)
    _save_run_config(ctx, cache.path.parent / "runs" / f"{cache.path.stem}.extract.yaml", values)
    n_tiles = sum(int(o.result or 0) for o in outcomes if o.status == "done")
    _print_outcomes(outcomes, what="extract", extra=f"; {n_tiles} new tiles; cache {cache.path}",
                    files=_file_names(sources, slides))
    typer.echo(checks.next_step(f"weakstil train LABELS.csv --features {features} (labels: slide_id,patient_id,stil)",
                                f"with a trained model: weakstil score {slides} --model models/NAME "
                                f"--features {features}"), err=True)
    _exit_for(outcomes)


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
    wait: WaitOpt = False,
    precision: PrecisionOpt = "auto",
    compile: CompileOpt = False,
    decode: DecodeOpt = "auto",
    devices: DevicesOpt = None,
) -> None:
    """Score slides with a trained model: extracts what is missing, writes results/ (scores + heatmaps)."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.embed.extract import slide_sources
    from weakstil.runs.batch import score_slides
    from weakstil.wsi.slide import find_slides

    try:
        formats = checks.formats(outputs, checks.SCORE_FORMATS)
        checks.model_dir(model)
        checks.existing_dir(roi, "--roi", "give the folder of <slide_id>.geojson files exported from QuPath")
        sources = slide_sources(find_slides(slides), **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        checks.writable_dir(out, "--out")
        checks.writable_dir(features, "--features")
        checks.weights_source(weights)
        opts = _extract_options(device, batch_size, read_workers, quiet, precision, compile, decode)
        job_args = {"model": model, "features": features, "out": out, "weights": weights, "opts": opts,
                    "roi_dir": roi, "formats": formats, "lock": lock}

        def local():
            return score_slides(sources, model, features_dir=features, out_dir=out, weights=weights, opts=opts,
                                roi_dir=roi, formats=formats, lock=lock, wait=wait).outcomes

        outcomes = _run_slides("score", sources, job_args, workers, scheduler, local, wait, devices)
    except WeakstilError as exc:
        _fail(exc)
    _save_run_config(ctx, out / "config.yaml", values)
    _print_outcomes(outcomes, what="score", extra=f"; scores in {out / 'scores.csv'}, heatmaps and QuPath "
                    f"files in {out / 'slides'}", files=_file_names(sources, slides))
    typer.echo(checks.next_step(f"weakstil view {out} --slides {slides}"), err=True)
    _exit_for(outcomes)
