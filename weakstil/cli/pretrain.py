"""The command that trains an encoder: pretrain (self-supervised, on the user's own slides)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from weakstil.cli.app import (
    Backend,
    BackendOpt,
    ConfigOpt,
    DeviceOpt,
    ForceMppOpt,
    MinTissueOpt,
    MppCsvOpt,
    MppOpt,
    QuietOpt,
    ReadWorkersOpt,
    RoiOpt,
    StainOpt,
    TileMppOpt,
    TilePxOpt,
    _fail,
    _open_kwargs,
    app,
)
from weakstil.errors import WeakstilError


class Method(str, Enum):
    simclr = "simclr"
    dino = "dino"


class Arch(str, Enum):
    resnet18 = "resnet18"
    vit_small = "vit_small"


@app.command()
def pretrain(
    ctx: typer.Context,
    slides: Annotated[Path, typer.Argument(help="A folder of slides or one slide file (no labels needed).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder; it becomes an encoder: use it as "
                                      "--encoder OUT (put it in models/encoders/ to list it by name).")],
    method: Annotated[Method, typer.Option(help="SimCLR (contrastive) or DINO (self-distillation).")] = Method.simclr,
    arch: Annotated[Arch, typer.Option(help="Backbone.")] = Arch.resnet18,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Training steps (default 1000 "
                                                     "unless --max-minutes is given).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop after this many "
                                                         "minutes (the whole run, resumes included).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tiles per step and device.")] = 64,
    view_px: Annotated[int, typer.Option("--view-px", help="Size of the augmented views (smaller is faster; "
                                         "112 is a good CPU choice).")] = 224,
    lr: Annotated[Optional[float], typer.Option(help="Peak AdamW learning rate (default: scaled to the batch).")] = None,
    devices: Annotated[int, typer.Option("--devices", help="GPUs to train on (DDP when more than 1).")] = 1,
    precision: Annotated[Optional[str], typer.Option(help="Lightning precision (default: bf16-mixed on GPUs, "
                                                     "32-true on the CPU).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")] = 200,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    tile_px: TilePxOpt = 224,
    tile_mpp: TileMppOpt = 0.5,
    min_tissue: MinTissueOpt = 0.5,
    stain_norm: StainOpt = "macenko",
    roi: RoiOpt = None,
    backend: BackendOpt = Backend.auto,
    mpp: MppOpt = None,
    force_mpp: ForceMppOpt = False,
    mpp_csv: MppCsvOpt = None,
    device: DeviceOpt = "auto",
    read_workers: ReadWorkersOpt = None,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Self-supervised pretraining of a tile encoder on your own slides (SimCLR or DINO, H&E augmentations)."""
    values = dict(locals())  # the options only: taken before the imports below add names
    values.pop("ctx")
    from weakstil.embed.extract import slide_sources
    from weakstil.fs import plain_json
    from weakstil.ssl.module import SSLConfig
    from weakstil.ssl.pretrain import PretrainOptions
    from weakstil.ssl.pretrain import pretrain as run_pretrain
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec

    values.update(command="pretrain", config_file=ctx.meta.get("config_file"))
    try:
        sources = slide_sources(find_slides(slides), **_open_kwargs(backend, mpp, force_mpp, mpp_csv))
        cfg = SSLConfig(method=method.value, arch=arch.value, batch_size=batch_size, view_px=view_px, lr=lr,
                        seed=seed)
        opts = PretrainOptions(max_steps=max_steps if max_steps or max_minutes else 1000, max_minutes=max_minutes,
                               device=device, devices=devices, precision=precision, workers=read_workers,
                               checkpoint_every=checkpoint_every, resume=resume, progress=not quiet)
        doc = run_pretrain(sources, out, config=cfg, spec=TileSpec(tile_px=tile_px, mpp=tile_mpp, min_tissue=min_tissue,
                                                                       stain=stain_norm),
                           roi_dir=roi, opts=opts, run_info=plain_json(values))
    except WeakstilError as exc:
        _fail(exc)
    if doc:
        trained = doc["trained"]
        typer.echo(f"encoder {doc['name']!r} ({doc['arch']}, {doc['embed_dim']}-d) written to {out}: "
                   f"{trained['method']}, {trained['steps']} steps on {len(trained['slides'])} slides; "
                   f"use it with --encoder {out}")
