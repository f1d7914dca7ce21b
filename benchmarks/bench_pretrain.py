"""Pretrain case: does ``weakstil pretrain`` give the MIL regressor better features than random init?

Settings (``…_SETTINGS``, comma-separated; default the issue's two, the hard setting of each family):

* **lattice-hard**, **cells-hard** — ``weakstil synth --family lattice|cells --setting hard`` cohorts
  (tumour fraction 10–85 %, intratumoral lymphocytes, twice the stain variation; see
  docs/synthetic.md);
* **plain** — the lattice cohort as ``weakstil synth`` writes it;
* **stain** — the plain slides, each re-stained: its hematoxylin and eosin amounts scaled by
  U(0.65, 1.35) and shifted by U(±0.08) optical density, per slide, as between labs and scanners
  (:func:`weakstil.ssl.augment.hed_jitter`). Labels are unchanged.

For each setting: pretrain (SimCLR, ResNet-18; the budget below) on the cohort's own slides, extract
the same tiles with the pretrained encoder and with ``resnet18-random`` (the offline baseline), and
cross-validate the same MIL regressor (:func:`weakstil.mil.train.cross_validate`, default config)
on both with the same folds and seeds (``CV_SEEDS``): OOF R² vs the synthetic truth (the slide's true
sTIL%, not its possibly noisy label), mean over seeds, with the linear probe (slide-mean features,
ridge; :mod:`weakstil.mil.probe`) on the same folds beside each. Reported: R² of each, the gain
(pretrained − random), pretraining steps, minutes and tiles/s. ``…_STEPS`` fixes the budget in
steps instead of minutes, so that a run on a busy machine trains as much as a quiet one would.

Sizes: ``full`` 40 slides, ≤ 15 min of pretraining per setting (the issue's CPU budget) with the
CLI's default recipe (224-px views, strong stain jitter); ``quick``
24 slides, 3 min; ``smoke`` 6 tiny slides, 3 steps. ``WEAKSTIL_BENCH_PRETRAIN_MINUTES``,
``…_STEPS``, ``…_METHOD``, ``…_BATCH``, ``…_VIEW_PX``, ``…_HED_SCALE``, ``…_HED_SHIFT`` and ``…_STAIN``
(the tiles' stain normalisation, default the TileSpec's: macenko) override the budget and recipe (to measure
what would reach the goal); ``…_SETTINGS`` (e.g. ``stain``) runs one setting only; ``…_REUSE=1`` keeps an encoder an earlier
(interrupted) run finished for a setting instead of pretraining it again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import Row, bench_dir

CV_SEEDS = (0, 1, 2)
GOAL = 0.05  # R² over random init (issue 16)
TOLERANCE = 0.02  # never worse than random init by more than this


@dataclass(frozen=True)
class Size:
    n: int
    size_um: float
    minutes: float | None
    steps: int | None
    batch: int
    view_px: int
    cv_epochs: int | None


SIZES = {
    "full": Size(40, 1600.0, 15.0, None, 64, 224, None),  # 224-px views: `weakstil pretrain`'s default
    "quick": Size(24, 1200.0, 3.0, None, 48, 112, None),
    "smoke": Size(6, 400.0, None, 3, 8, 64, 2),
}


def _env(name: str, cast, default):
    value = os.environ.get(f"WEAKSTIL_BENCH_PRETRAIN_{name}")
    return cast(value) if value else default


def tiling():
    """The tiling of pretraining and extraction: the default TileSpec, its stain normalisation from
    ``WEAKSTIL_BENCH_PRETRAIN_STAIN`` (macenko | none) when set."""
    from weakstil.wsi.tiling import TileSpec

    return TileSpec(stain=_env("STAIN", str, TileSpec().stain))


def stain_shifted(src: Path, dst: Path, *, seed: int = 0) -> Path:
    """Copy cohort ``src`` to ``dst`` with every slide re-stained by its own random HED change."""
    import tifffile
    import torch

    from weakstil.ssl.augment import hed_jitter
    from weakstil.wsi.slide import open_slide
    from weakstil.wsi.writer import write_aperio_tiff

    (dst / "slides").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "labels.csv", dst / "labels.csv")
    rng = np.random.default_rng(seed)
    for path in sorted((src / "slides").glob("*.svs")):
        scale = np.r_[rng.uniform(0.65, 1.35, 2), 1.0]
        shift = np.r_[rng.uniform(-0.08, 0.08, 2), 0.0]
        out = dst / "slides" / path.name
        if out.exists():
            continue
        with open_slide(path) as slide:
            mpp = slide.mpp
        rgb = torch.from_numpy(tifffile.imread(path, key=0)).permute(2, 0, 1)[None].float() / 255
        rgb = hed_jitter(rgb, torch.tensor(scale[None], dtype=torch.float32),
                         torch.tensor(shift[None], dtype=torch.float32))
        level0 = (rgb[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        write_aperio_tiff(out, level0, mpp)
    return dst


SETTINGS = ("lattice-hard", "cells-hard")


def cohort(size: Size, setting: str) -> Path:
    """The cohort of ``setting`` (written once; later runs reuse it)."""
    from weakstil.synth import write_cohort

    root = bench_dir() / f"pretrain-n{size.n}-{size.size_um:g}um"
    if setting in ("plain", "stain"):
        plain = write_cohort(root / "plain", family="lattice", n=size.n, seed=7, size_um=size.size_um,
                             progress=False)
        return plain if setting == "plain" else stain_shifted(plain, root / "stain")
    family, _, kind = setting.partition("-")
    return write_cohort(root / setting, family=family, n=size.n, seed=7, setting=kind or "standard",
                        size_um=size.size_um, progress=False)


def cohort_truth(cohort: Path, slide_ids) -> np.ndarray:
    """True slide sTIL% (``truth/<id>.npz``) in ``slide_ids`` order; the labels where none is kept."""
    from weakstil.synth.truth import load_truth

    return np.array([float(load_truth(cohort / "truth" / f"{sid}.npz")["stil"])
                     if (cohort / "truth" / f"{sid}.npz").exists() else np.nan for sid in slide_ids])


def features_r2(cohort: Path, encoder, work: Path, cv_epochs: int | None) -> dict:
    """Extract ``cohort`` with ``encoder`` → OOF R² of the default MIL CV, per seed and mean."""
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.cv import cross_validate
    from weakstil.mil.fit import TrainConfig, load_bags
    from weakstil.mil.labels import read_labels
    from weakstil.runs.batch import extract_slides
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tissue import TissueParams

    sources = slide_sources(find_slides(cohort / "slides"))
    result = extract_slides(sources, work, encoder=encoder, spec=tiling(), tissue=TissueParams(),
                            opts=ExtractOptions(progress=False), qc=False, lock=False)
    failed = {o.key: o.reason for o in result.failed}  # e.g. a faded slide without detectable tissue
    if len(failed) > len(sources) // 4:
        raise RuntimeError(f"extraction failed on {len(failed)} slides: {result.failed[0].error}")
    from sklearn.metrics import r2_score

    from weakstil.mil.probe import probe_oof, slide_means

    table = read_labels(cohort / "labels.csv", cached_ids=result.cache.complete_ids())
    bags = load_bags(result.cache, table.slide_ids)
    epochs = {"max_epochs": cv_epochs, "patience": cv_epochs} if cv_epochs else {}
    r2, probe, vs_labels = [], [], []
    for seed in CV_SEEDS:
        cv = cross_validate(bags, table, TrainConfig(seed=seed, seeds=1, n_boot=50, accelerator="cpu", **epochs),
                            progress=False)
        truth = cohort_truth(cohort, cv.slide_ids)
        truth = np.where(np.isnan(truth), cv.labels, truth)
        r2.append(float(r2_score(truth, cv.predictions)))
        vs_labels.append(float(cv.pooled["r2"]))
        oof, _ = probe_oof(slide_means(bags, cv.slide_ids), cv.labels, cv.folds)
        probe.append(float(r2_score(truth, oof)))
    return {"r2": float(np.mean(r2)), "r2_seeds": r2, "r2_vs_labels": float(np.mean(vs_labels)), "failed": failed,
            "probe_r2": float(np.mean(probe)), "probe_r2_seeds": probe, "n_slides": len(table.slide_ids),
            "n_tiles": int(sum(len(b) for b in bags.values()))}


def pretrain_on(cohort: Path, out: Path, size: Size, device: str) -> dict:
    from weakstil.embed.extract import slide_sources
    from weakstil.ssl.module import SSLConfig
    from weakstil.ssl.pretrain import PretrainOptions, pretrain
    from weakstil.wsi.slide import find_slides

    minutes, steps = _env("MINUTES", float, size.minutes), _env("STEPS", int, size.steps)
    view_px = _env("VIEW_PX", int, size.view_px)
    # crops of about native magnification at view_px (a 112-px view of a 224-px tile: ~1/4 of its area)
    scale = (0.15, 0.4) if view_px <= 128 else (0.4, 1.0)
    from dataclasses import replace

    from weakstil.ssl.augment import AugmentParams

    base = AugmentParams()
    augment = replace(base, hed_scale=_env("HED_SCALE", float, base.hed_scale),
                      hed_shift=_env("HED_SHIFT", float, base.hed_shift))
    config = SSLConfig(method=_env("METHOD", str, "simclr"), batch_size=_env("BATCH", int, size.batch),
                       view_px=view_px, crop_scale=scale, warmup_steps=min(50, (steps or 1000) // 5),
                       dino_out_dim=1024, augment=augment)
    if os.environ.get("WEAKSTIL_BENCH_PRETRAIN_REUSE") and (out / "encoder.json").exists():
        doc = json.loads((out / "encoder.json").read_text())  # an interrupted run's finished encoder
        rows = (out / "loss.csv").read_text().splitlines()[1:]
        trained = doc["trained"]
        return {"steps": trained["steps"], "seconds": trained.get("seconds", float("nan")),
                "tiles_per_s": float(np.median([float(r.split(",")[2]) for r in rows])) if rows else 0.0,
                "method": trained.get("method", config.method), "batch": config.batch_size,
                "view_px": config.view_px, "final_loss": trained.get("final_loss"), "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    doc = pretrain(slide_sources(find_slides(cohort / "slides")), out, config=config, spec=tiling(),
                   opts=PretrainOptions(max_steps=steps, max_minutes=minutes, device=device,
                                        checkpoint_every=10**6, progress=False))
    seconds = time.perf_counter() - t0
    rates = [float(line.split(",")[2]) for line in (out / "loss.csv").read_text().splitlines()[2:]]
    return {"steps": doc["trained"]["steps"], "seconds": seconds, "tiles_per_s": float(np.median(rates)) if rates else 0.0,
            "method": config.method, "batch": config.batch_size, "view_px": config.view_px,
            "hed": [config.augment.hed_scale, config.augment.hed_shift], "final_loss": doc["trained"]["final_loss"]}


def run(mode, device: str = "cpu") -> list[Row]:
    from weakstil.embed.encoders import create_encoder

    size = SIZES[mode.name]
    settings = tuple(_env("SETTINGS", lambda v: tuple(v.split(",")), SETTINGS))
    work = bench_dir() / f"pretrain-work-{mode.name}{os.environ.get('WEAKSTIL_BENCH_PRETRAIN_TAG', '')}"
    rows = []
    for setting in settings:
        path = cohort(size, setting)
        if not os.environ.get("WEAKSTIL_BENCH_PRETRAIN_REUSE"):
            shutil.rmtree(work / setting, ignore_errors=True)
        info = pretrain_on(path, work / setting / "encoder", size, device)
        random = features_r2(path, create_encoder("resnet18-random"), work / setting / "f-random", size.cv_epochs)
        ssl = features_r2(path, create_encoder(str(work / setting / "encoder")), work / setting / "f-ssl",
                          size.cv_epochs)
        gain = ssl["r2"] - random["r2"]
        recipe = f"{info['method']}, {info['steps']} steps × {info['batch']}, {info['view_px']} px views"
        extra = {"random": random, "pretrained": ssl, "pretrain": info, "n_slides": size.n}
        rows += [
            Row("pretrain", f"OOF R² vs truth, random init ({setting})", random["r2"], "R²",
                reference="linear probe, same features and folds", ref_value=random["probe_r2"],
                note=f"{random['n_slides']} slides", extra=extra),
            Row("pretrain", f"OOF R² vs truth, pretrained ({setting})", ssl["r2"], "R²", reference="random init",
                ref_value=random["r2"], note=f"{recipe}; linear probe on these features {ssl['probe_r2']:.3f}",
                target=f"≥ random − {TOLERANCE}", met=gain >= -TOLERANCE),
            Row("pretrain", f"R² gain over random init ({setting})", gain, "R²", target=f"≥ +{GOAL}",
                met=gain >= GOAL, note=f"mean of {len(CV_SEEDS)} CV seeds"),
            Row("pretrain", f"pretraining ({setting})", info["seconds"] / 60, "min", note=recipe),
            Row("pretrain", f"pretraining rate ({setting})", info["tiles_per_s"], "tiles/s",
                note=f"{device}; each tile → 2 views"),
        ]
    return rows


# --- control: what adapting BatchNorm statistics alone gives ------------------------------------------
def bn_recalibrated(cohort_path: Path, out: Path, *, tiles: int = 4096, batch: int = 64) -> dict:
    """``resnet18-random`` with its BatchNorm running statistics re-estimated on ``tiles`` random
    tissue tiles of the cohort (no gradient step), written as an encoder folder: what a pretrained
    encoder's gain would be if it came only from normalising activations to the cohort's colours."""
    import torch

    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import slide_sources
    from weakstil.ssl.data import plan_pretrain_tiles, tile_loader
    from weakstil.ssl.export import write_encoder_folder
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tissue import TissueParams

    encoder = create_encoder("resnet18-random")
    backbone = encoder.backbone
    slides, _ = plan_pretrain_tiles(slide_sources(find_slides(cohort_path / "slides")), tiling(), TissueParams())
    loader = tile_loader(slides, tile_px=tiling().tile_px, batch_size=batch, workers=0, device="cpu", seed=0)
    for m in backbone.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over every batch
    backbone.train()
    seen = 0
    with torch.no_grad():
        for batch_tiles in loader:
            backbone(encoder.preprocess(batch_tiles))
            seen += len(batch_tiles)
            if seen >= tiles:
                break
    backbone.eval()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    write_encoder_folder(out, backbone, arch="resnet18",
                         trained={"method": "batchnorm-recalibration", "tiles": seen, "steps": 0})
    return {"tiles": seen}


def bn_control(settings: tuple[str, ...], mode: str = "full") -> dict:
    """The BatchNorm-only control on the cohorts of a finished ``--only pretrain`` run (same sizes)."""
    from weakstil.embed.encoders import create_encoder

    size = SIZES[mode]
    work = bench_dir() / f"pretrain-work-{mode}"
    out = {}
    for setting in settings:
        path = cohort(size, setting)
        info = bn_recalibrated(path, work / setting / "encoder-bn")
        r2 = features_r2(path, create_encoder(str(work / setting / "encoder-bn")), work / setting / "f-bn",
                         size.cv_epochs)
        out[setting] = {**r2, **info}
        print(json.dumps({setting: out[setting]}), flush=True)
    return out


if __name__ == "__main__":  # python -m benchmarks.bench_pretrain bn-control [SETTING ...]
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "bn-control":
        sys.exit("usage: python -m benchmarks.bench_pretrain bn-control [SETTING ...] (after --only pretrain)")
    result = bn_control(tuple(sys.argv[2:]) or SETTINGS, os.environ.get("WEAKSTIL_BENCH_PRETRAIN_MODE", "full"))
    print(json.dumps(result, indent=1))
