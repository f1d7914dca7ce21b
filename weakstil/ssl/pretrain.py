"""``weakstil pretrain``: the Trainer set-up around :class:`weakstil.ssl.module.SSLModule`.

One library call, :func:`pretrain`, does it all: plan the tissue tiles of every slide, stream random
tiles through the H&E augmentations into SimCLR or DINO, checkpoint every N steps (and resume from
the last), show progress with tiles/s, and write the output folder, which *is* an encoder::

    DIR/
      encoder.safetensors   the backbone's weights (timm key layout; loaded without pickle)
      encoder.json          the spec: arch, embed_dim, input_px, mean/std, weights sha256, training
      loss.csv, loss.png    the loss curve (step, loss, tiles/s)
      pretrain.yaml         the resolved options of the run
      checkpoints/          Lightning checkpoints (last.ckpt: what --resume continues from)

Devices: ``devices`` > 1 uses DDP (one process per GPU, SyncBatchNorm, NT-Xent negatives gathered
across GPUs); GPUs train in bf16-mixed by default; on a CPU it is fp32 with the loader in-process
on small machines.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L

from weakstil.errors import ConfigError, ResumeError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"  # written every N steps
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
INTERRUPTED = "interrupted.ckpt"  # written when training stops on an exception or Ctrl-C


@dataclass
class PretrainOptions:
    """How to run: where, how long, how often to checkpoint. ``max_steps`` and/or ``max_minutes``."""

    max_steps: int | None = 1000
    max_minutes: float | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = 1
    precision: str | None = None  # None: bf16-mixed on GPUs, 32-true on the CPU
    workers: int | None = None  # loader processes per device (None: as extraction chooses)
    checkpoint_every: int = 200
    tiles_per_slide: int = 256  # random tiles per slide per round
    resume: bool = False
    progress: bool = True
    callbacks: list = field(default_factory=list)  # extra Lightning callbacks (tests, tools)


def pretrain(sources, out_dir: Path, *, config, spec=None, tissue=None, roi_dir: Path | None = None,
             opts: PretrainOptions | None = None, run_info: dict | None = None) -> dict:
    """Pretrain an encoder on the slides of ``sources`` and write it to ``out_dir``; returns its spec.

    ``sources``: :class:`weakstil.embed.extract.SlideSource` list; ``config``: an
    :class:`weakstil.ssl.module.SSLConfig`; ``spec``/``tissue``: the tiling (TileSpec, TissueParams).
    Raises :class:`ResumeError` when ``opts.resume`` finds no checkpoint, and refuses to start afresh
    over an earlier run's checkpoints (that would throw its steps away).
    """
    from weakstil.ssl.data import plan_pretrain_tiles
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    opts = opts or PretrainOptions()
    spec, tissue = spec or TileSpec(), tissue or TissueParams()
    out_dir = Path(out_dir)
    _check_out_name(out_dir)
    ckpt_path = _resume_checkpoint(out_dir, opts.resume)
    if opts.precision and opts.precision not in PRECISIONS:
        raise ConfigError(f"unknown --precision {opts.precision!r}", fix=f"use one of: {', '.join(PRECISIONS)}")
    if opts.devices < 1:
        raise ConfigError("--devices must be at least 1")
    if not opts.max_steps and not opts.max_minutes:
        raise ConfigError("pretraining needs a budget", fix="give --max-steps N and/or --max-minutes M")
    if config.max_steps is None and opts.max_steps:
        config = replace(config, max_steps=opts.max_steps)
    slides, skipped = plan_pretrain_tiles(sources, spec, tissue, roi_dir=roi_dir)
    n_tiles = sum(len(s.coords_l0) for s in slides)
    log.info("pretrain: %d slides, %d tissue tiles (%d skipped)", len(slides), n_tiles, len(skipped))
    (out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trainer, module, rows = _fit(out_dir, TileData(slides, spec.tile_px, config, opts), config, opts, ckpt_path)
    if not trainer.is_global_zero:
        return {}
    from weakstil.ssl.export import write_encoder_folder

    trained = {"method": config.method, "steps": int(trainer.global_step), "batch_size": config.batch_size,
               "devices": opts.devices, "precision": _precision(opts),
               "seconds": round(time.perf_counter() - started, 1), "resumed": ckpt_path is not None,
               "slides": [s.slide_id for s in slides], "skipped_slides": skipped, "n_tiles": n_tiles,
               "tiling": spec.fingerprint(tissue), "config": _plain(config.as_dict()),
               "final_loss": rows[-1][1] if rows else None}
    spec_doc = write_encoder_folder(out_dir, module.encoder_backbone(), arch=config.arch, trained=trained)
    if run_info is not None:
        from weakstil.config import save_resolved

        save_resolved(run_info, out_dir / "pretrain.yaml")
    return spec_doc


def _fit(out_dir: Path, data, config, opts: PretrainOptions, ckpt_path: Path | None):
    """Train (or continue) → (trainer, module, loss rows); the loss curve is saved even when interrupted."""
    from weakstil.mil.fit import _quiet_lightning
    from weakstil.ssl.callbacks import LossHistory
    from weakstil.ssl.export import save_loss_curve
    from weakstil.ssl.module import SSLModule

    L.seed_everything(config.seed, workers=True, verbose=False)
    module = SSLModule(config, world_size=opts.devices)
    history = LossHistory()
    trainer = None
    try:
        with _quiet_lightning(), warnings.catch_warnings():
            # with an OnExceptionCheckpoint, Lightning turns ckpt_path=None into "last" and says so
            warnings.filterwarnings("ignore", message=r".*(called without a model|no last checkpoint available).*")
            trainer = _trainer(out_dir, opts, [history, *opts.callbacks])
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:  # the curve so far, also after Ctrl-C (Lightning then saves last.ckpt and exits)
        if trainer is None or trainer.is_global_zero:
            save_loss_curve(history.rows, out_dir)
    return trainer, module, history.rows


def _check_out_name(out_dir: Path) -> None:
    """The folder's name becomes the encoder's: it must not shadow a registered encoder."""
    from weakstil.embed.encoder_folders import folder_encoder_name
    from weakstil.embed.encoders import list_encoders

    name = folder_encoder_name(out_dir)
    if name in {s.name for s in list_encoders()}:
        raise ConfigError(f"--out {out_dir}: the folder name {name!r} is a built-in encoder's",
                          fix=f"choose another folder name, e.g. models/encoders/{name}-ssl")


def _resume_checkpoint(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint ``--resume`` continues from: the newer of last.ckpt and interrupted.ckpt."""
    found = [p for p in (out_dir / CHECKPOINTS / LAST, out_dir / CHECKPOINTS / INTERRUPTED) if p.is_file()]
    if resume:
        if not found:
            raise ResumeError(f"nothing to resume: no {CHECKPOINTS}/{LAST} here", path=out_dir)
        return max(found, key=lambda p: p.stat().st_mtime_ns)
    if found:
        raise ConfigError(f"{out_dir} holds the checkpoints of an earlier run", path=out_dir,
                          fix="add --resume to continue it, or choose another --out")
    return None


def _precision(opts: PretrainOptions) -> str:
    if opts.precision:
        return opts.precision
    return "32-true" if _accelerator(opts.device) == "cpu" else "bf16-mixed"


def _accelerator(device: str) -> str:
    from weakstil.embed.extract import resolve_device

    return "cpu" if resolve_device(device) == "cpu" else "gpu"


def _trainer(out_dir: Path, opts: PretrainOptions, callbacks: list):
    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    from weakstil.ssl.callbacks import SSLProgress

    accelerator = _accelerator(opts.device)
    devices: int | list[int] = opts.devices
    if accelerator == "gpu" and opts.device.startswith("cuda:") and opts.devices == 1:
        devices = [int(opts.device.split(":", 1)[1])]
    checkpoint = ModelCheckpoint(dirpath=out_dir / CHECKPOINTS, filename="step-{step:07d}",
                                 every_n_train_steps=max(1, opts.checkpoint_every), save_top_k=0,
                                 save_last=True, auto_insert_metric_name=False)
    multi = isinstance(devices, int) and devices > 1
    return L.Trainer(
        accelerator=accelerator, devices=devices, strategy="ddp" if multi else "auto", sync_batchnorm=multi,
        precision=_precision(opts), max_steps=opts.max_steps or -1,
        max_time={"minutes": opts.max_minutes} if opts.max_minutes else None,
        callbacks=[checkpoint, OnExceptionCheckpoint(out_dir / CHECKPOINTS, filename=Path(INTERRUPTED).stem),
                   SSLProgress(opts.max_steps, enabled=opts.progress), *callbacks],
        logger=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=out_dir, num_sanity_val_steps=0, deterministic=False, use_distributed_sampler=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class TileData(L.LightningDataModule):
    """Builds the tile stream when training starts, once the step it resumes from is known."""

    def __init__(self, slides, tile_px: int, config, opts: PretrainOptions):
        super().__init__()
        self.slides, self.tile_px, self.config, self.opts = slides, tile_px, config, opts

    def train_dataloader(self):
        from weakstil.embed.extract import default_workers, resolve_device
        from weakstil.ssl.data import tile_loader

        device = resolve_device(self.opts.device)
        workers = self.opts.workers
        if workers is None:
            workers = default_workers(device)  # extraction's choice …
            if device != "cpu":  # … shared between the DDP processes of this machine
                workers = max(1, workers // max(1, self.opts.devices))
        return tile_loader(self.slides, tile_px=self.tile_px, batch_size=self.config.batch_size,
                           workers=workers, device=device, seed=self.config.seed,
                           rank=self.trainer.global_rank, start_step=self.trainer.global_step,
                           tiles_per_slide=self.opts.tiles_per_slide)
