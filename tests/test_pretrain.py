"""`weakstil pretrain` (issue 16): augmentations, the tile stream, SimCLR/DINO runs, resume, and the
output folder as an encoder (`--encoder DIR` in extract, train and score; corrupted weights refused).

Runs are tiny (2 slides, 2-3 steps, 4 tiles per step, 32-px views) so the default suite stays fast;
the whole chain on a labelled synthetic cohort (pretrain → extract → train → score) is marked slow.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.embed.encoders import MORPH_DIM
from weakstil.errors import (
    CheckpointReadError,
    ConfigError,
    UnknownEncoderError,
    WeakstilError,
)

ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
TINY = ["--max-steps", 3, "--batch-size", 4, "--view-px", 32, "--checkpoint-every", 2, "--device", "cpu",
        "--quiet"]


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def loss_steps(folder: Path) -> list[int]:
    with open(folder / "loss.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def tiny_run(slides: Path, out: Path, *, max_steps: int = 3, resume: bool = False, callbacks=(), **config):
    """The library call behind `weakstil pretrain`, tiny."""
    from weakstil.embed.extract import slide_sources
    from weakstil.ssl.module import SSLConfig
    from weakstil.ssl.pretrain import PretrainOptions, pretrain
    from weakstil.wsi.slide import find_slides

    cfg = SSLConfig(**{"batch_size": 4, "view_px": 32, "warmup_steps": 1, **config})
    opts = PretrainOptions(max_steps=max_steps, device="cpu", checkpoint_every=2, resume=resume, progress=False,
                           callbacks=list(callbacks))
    return pretrain(slide_sources(find_slides(slides)), out, config=cfg, opts=opts)


@pytest.fixture(scope="module")
def encoder_dir(slide_folder, tmp_path_factory) -> Path:
    """`weakstil pretrain` on the two conftest slides: 3 SimCLR steps of 4 tiles."""
    out = tmp_path_factory.mktemp("pretrain") / "my-simclr"
    result = invoke("pretrain", slide_folder, "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert "--encoder" in result.output
    return out


# --- augmentations ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(8))
def test_dihedral_moves_pixels_exactly(k):
    from weakstil.ssl.augment import dihedral

    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    out = dihedral(x, torch.tensor([k, 0]))
    want = np.rot90(x[0].numpy(), k % 4, axes=(1, 2))
    want = want[:, :, ::-1] if k >= 4 else want
    assert torch.equal(out[0], torch.from_numpy(want.copy()))
    assert torch.equal(out[1], x[1])  # each image gets its own symmetry


def test_the_eight_symmetries_are_distinct():
    from weakstil.ssl.augment import dihedral

    x = torch.rand(1, 1, 6, 6).expand(8, 1, 6, 6).contiguous()
    out = dihedral(x, torch.arange(8)).reshape(8, -1)
    assert len({tuple(row.tolist()) for row in out}) == 8


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_views_keep_shape_dtype_and_are_normalised(method):
    from weakstil.ssl.augment import TileAugment, dino_view_specs, simclr_view_specs

    views = simclr_view_specs(64) if method == "simclr" else dino_view_specs(64, n_local=3)
    aug = TileAugment(views, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), generator=torch.Generator().manual_seed(0))
    tiles = torch.randint(0, 256, (5, 96, 96, 3), dtype=torch.uint8)
    out = aug(tiles)
    sizes = [64, 64] if method == "simclr" else [64, 64, 27, 27, 27]
    assert [v.shape for v in out] == [(5, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out)
    assert all(v.min() >= (0 - 0.5) / 0.25 - 1e-4 and v.max() <= (1 - 0.5) / 0.25 + 1e-4 for v in out)
    assert not torch.equal(out[0], out[1])  # two different views of each tile
    with pytest.raises(ValueError, match="uint8"):
        aug(tiles.float())


def test_hed_jitter_is_identity_at_rest_and_linear_in_optical_density():
    from weakstil.ssl.augment import RGB_FROM_HED, hed_jitter

    rgb = torch.rand(2, 3, 4, 4) * 0.9 + 0.05
    same = hed_jitter(rgb, torch.ones(2, 3), torch.zeros(2, 3))
    assert torch.allclose(same, rgb, atol=1e-5)
    # a pixel of pure hematoxylin: doubling the H amount doubles its optical density
    od = torch.tensor(RGB_FROM_HED[0] * 0.3, dtype=torch.float32)
    pixel = torch.exp(-od).view(1, 3, 1, 1)
    out = hed_jitter(pixel, torch.tensor([[2.0, 1.0, 1.0]]), torch.zeros(1, 3))
    assert torch.allclose(-torch.log(out.view(3)), 2 * od, atol=1e-4)
    assert (out < pixel).all()  # more stain is darker in every channel


def test_blur_keeps_flat_images_and_smooths_others():
    from weakstil.ssl.augment import gaussian_blur

    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 1.0])), flat, atol=1e-6)
    noise = torch.rand(2, 3, 16, 16)
    blurred = gaussian_blur(noise, torch.tensor([1.0, 1.0]))
    assert blurred.shape == noise.shape and blurred.std() < noise.std() * 0.7


# --- the tile stream ------------------------------------------------------------------------------
@pytest.mark.parametrize("stain", ["none", "macenko"])
def test_stream_reads_tissue_tiles_from_every_slide(slide_folder, stain):
    """Tiles as the region path reads them; with stain normalisation (the default), those tiles
    rendered with the reference stains from the slide's own estimate, as extraction does."""
    from weakstil.embed.extract import slide_sources
    from weakstil.embed.stain import normalize_tiles
    from weakstil.ssl.data import plan_pretrain_tiles, tile_loader
    from weakstil.wsi.reader import Block, read_block_region
    from weakstil.wsi.slide import find_slides, open_slide
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    slides, skipped = plan_pretrain_tiles(slide_sources(find_slides(slide_folder)), TileSpec(stain=stain),
                                          TissueParams())
    assert len(slides) == 2 and not skipped and all(len(s.coords_l0) > 0 for s in slides)
    assert all((s.stain is None) == (stain == "none") for s in slides)
    loader = tile_loader(slides, tile_px=224, batch_size=3, workers=0, device="cpu")
    batches = [b for _, b in zip(range(3), loader)]
    assert all(b.shape == (3, 224, 224, 3) and b.dtype == torch.uint8 for b in batches)
    stream = loader.dataset
    first_round = next(stream.rounds(np.random.default_rng(0)))
    assert set(first_round[:, 0]) == {0, 1}  # every slide contributes to every round
    pairs = first_round[:4]
    tiles = stream.read(pairs)
    for tile, (s, t) in zip(tiles, pairs):  # the fast path gives the region path's pixels
        with open_slide(slides[s].path) as slide:
            edge = int(np.ceil(slides[s].size_l0))
            xy = slides[s].coords_l0[t]
            block = Block(np.array([0]), (int(xy[0]), int(xy[1])), (edge, edge))
            ref = read_block_region(slide, block, xy[None], size_l0=slides[s].size_l0, tile_px=224)[0]
        if slides[s].stain is not None:
            ref = normalize_tiles(torch.from_numpy(ref[None]), slides[s].stain)[0].numpy()
        assert np.abs(tile.astype(float) - ref).mean() < 3.0


def test_slides_without_tissue_are_skipped_and_none_at_all_is_an_error(tmp_path, slide_folder):
    from weakstil.embed.extract import slide_sources
    from weakstil.ssl.data import NoPretrainTilesError, plan_pretrain_tiles
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams
    from weakstil.wsi.writer import write_aperio_tiff

    blank = write_aperio_tiff(tmp_path / "blank.svs", np.full((1200, 1500, 3), 245, np.uint8), 0.25,
                              min_level_px=256, thumbnail_px=256)
    sources = slide_sources(find_slides(slide_folder) + [blank])
    slides, skipped = plan_pretrain_tiles(sources, TileSpec(), TissueParams())
    assert len(slides) == 2 and list(skipped) == ["blank"] and "tissue" in skipped["blank"]
    with pytest.raises(NoPretrainTilesError) as err:
        plan_pretrain_tiles(slide_sources([blank]), TileSpec(), TissueParams())
    assert isinstance(err.value, WeakstilError) and isinstance(err.value, ValueError) and err.value.fix


# --- the output folder is an encoder ---------------------------------------------------------------
def test_pretrain_writes_an_encoder_folder(encoder_dir, slide_folder):
    from weakstil.fingerprint import file_sha256

    doc = json.loads((encoder_dir / "encoder.json").read_text())
    assert doc["name"] == "my-simclr" and doc["arch"] == "resnet18" and doc["embed_dim"] == 512
    assert doc["input_px"] == 224 and len(doc["mean"]) == 3 and len(doc["std"]) == 3
    assert doc["weights_sha256"] == file_sha256(encoder_dir / "encoder.safetensors")
    trained = doc["trained"]
    assert trained["method"] == "simclr" and trained["steps"] == 3 and sorted(trained["slides"]) == ["a", "b"]
    assert trained["date"] and trained["tiling"]["tile_px"] == 224
    assert loss_steps(encoder_dir) == [1, 2, 3]
    assert (encoder_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (encoder_dir / "pretrain.yaml").is_file() and (encoder_dir / "checkpoints" / "last.ckpt").is_file()
    # a second run into the same folder would throw the first away: refused, --resume suggested
    again = invoke("pretrain", slide_folder, "--out", encoder_dir, *TINY)
    assert again.exit_code == 2 and "--resume" in again.output


def test_extract_with_encoder_dir_fingerprints_the_pretrained_weights(encoder_dir, slide_folder, tmp_path):
    from weakstil.embed.cache import FeatureCache
    from weakstil.embed.encoders import create_encoder

    result = invoke("extract", slide_folder, "--features", tmp_path / "f", "--encoder", encoder_dir, "--quiet",
                    "--device", "cpu", "--stain-norm", "none")  # tiles as read: compared with a direct forward
    assert result.exit_code == 0, result.output
    cache = FeatureCache.find(tmp_path / "f")
    doc = json.loads((encoder_dir / "encoder.json").read_text())
    assert cache.encoder_fp["name"] == "my-simclr" and cache.encoder_fp["weights_sha256"] == doc["weights_sha256"]
    assert cache.path.name.startswith("my-simclr-")
    feats = np.asarray(cache.read("a").features, dtype=np.float32)
    assert feats.shape[1] == 512 and np.isfinite(feats).all()
    # the same weights as the folder (not a fresh random init): features match a direct forward
    enc = create_encoder(str(encoder_dir))
    from weakstil.embed.extract import TileEmbedder

    coords = np.asarray(cache.read("a").coords_l0)
    from weakstil.ssl.data import read_tiles_at
    from weakstil.wsi.slide import open_slide

    with open_slide(slide_folder / "a.svs") as slide:
        tiles = read_tiles_at(slide, coords[:2], size_l0=224 * 0.5 / slide.mpp, tile_px=224)
    direct = TileEmbedder(enc, "cpu")(torch.from_numpy(tiles)).astype(np.float32)
    assert np.allclose(direct, feats[:2], atol=0.05)
    random = np.asarray(create_encoder("resnet18-random").forward(enc.preprocess(tiles[:1])))
    assert not np.allclose(random, direct[:1], atol=0.05)


def test_encoder_folder_is_found_by_name_under_models_encoders(encoder_dir, tmp_path, monkeypatch):
    from weakstil.embed.encoders import create_encoder, get_encoder_spec

    monkeypatch.chdir(tmp_path)
    shutil.copytree(encoder_dir, tmp_path / "models" / "encoders" / "my-simclr",
                    ignore=shutil.ignore_patterns("checkpoints"))
    assert get_encoder_spec("my-simclr").arch == "resnet18"
    assert create_encoder("my-simclr").weights_sha256 == json.loads((encoder_dir / "encoder.json").read_text())[
        "weights_sha256"]
    pair = create_encoder("my-simclr+stainmorph")  # a pretrained folder with the morphometry beside it
    assert pair.spec.embed_dim == 512 + MORPH_DIM and pair.weights_sha256 == create_encoder("my-simclr").weights_sha256
    assert get_encoder_spec(f"{encoder_dir}+stainmorph").embed_dim == 512 + MORPH_DIM  # by path too
    listed = invoke("encoders")
    assert listed.exit_code == 0 and "my-simclr" in listed.output and "resnet18-random" in listed.output
    with pytest.raises(UnknownEncoderError) as err:
        create_encoder("my-simclr2")
    assert "my-simclr" in str(err.value) and "resnet18-random" in str(err.value)
    with pytest.raises(UnknownEncoderError, match="no encoder.json"):
        create_encoder(str(tmp_path / "models"))


def test_corrupted_or_damaged_encoder_folders_are_refused(encoder_dir, tmp_path):
    from weakstil.embed.encoder_folders import CorruptWeightsError, EncoderFolderError
    from weakstil.embed.encoders import create_encoder

    bad = tmp_path / "bad"
    shutil.copytree(encoder_dir, bad, ignore=shutil.ignore_patterns("checkpoints"))
    data = bytearray((bad / "encoder.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    (bad / "encoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptWeightsError) as err:
        create_encoder(str(bad))
    assert isinstance(err.value, CheckpointReadError) and isinstance(err.value, ValueError) and err.value.fix
    (bad / "encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        create_encoder(str(bad))
    (bad / "encoder.json").write_text('{"format": "weakstil-encoder", "name": "bad"')
    with pytest.raises(EncoderFolderError):
        create_encoder(str(bad))


# --- resume -------------------------------------------------------------------------------------
def test_resume_after_a_crash_continues_the_step_counter(slide_folder, tmp_path):
    from lightning.pytorch.callbacks import Callback

    from weakstil.ssl.pretrain import ResumeError

    class CrashAt(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise RuntimeError("simulated crash")

    class Record(Callback):
        def __init__(self):
            self.first_step, self.steps_run = None, 0

        def on_train_start(self, trainer, *args):
            self.first_step = trainer.global_step

        def on_train_batch_end(self, trainer, *args):
            self.steps_run += 1

    out = tmp_path / "run"
    with pytest.raises(ResumeError):
        tiny_run(slide_folder, out, resume=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_run(slide_folder, out, max_steps=5, callbacks=[CrashAt()])
    assert not (out / "encoder.json").exists()  # no encoder from an unfinished run
    assert loss_steps(out) == [1, 2, 3]  # the curve so far is kept
    with pytest.raises(ConfigError, match="--resume"):
        tiny_run(slide_folder, out, max_steps=5)
    record = Record()
    doc = tiny_run(slide_folder, out, max_steps=5, resume=True, callbacks=[record])
    assert record.first_step == 3 and record.steps_run == 2  # continued, not restarted
    assert doc["trained"]["steps"] == 5 and doc["trained"]["resumed"] is True
    assert loss_steps(out) == [1, 2, 3, 4, 5]


# --- DINO and ViT ---------------------------------------------------------------------------------
@pytest.mark.slow  # a ViT-S student and teacher: ~10 s on a quiet 2-core machine, minutes when shared
def test_dino_with_a_vit_gives_a_384_d_encoder(slide_folder, tmp_path):
    from weakstil.embed.encoders import create_encoder

    doc = tiny_run(slide_folder, tmp_path / "dino-vit", max_steps=2, method="dino", arch="vit_small", n_local=2,
                   dino_out_dim=64)
    assert doc["arch"] == "vit_small_patch16_224" and doc["embed_dim"] == 384 and doc["trained"]["method"] == "dino"
    enc = create_encoder(str(tmp_path / "dino-vit"))
    out = enc(enc.preprocess(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)))
    assert out.shape == (2, 384) and torch.isfinite(out).all()


def test_bad_options_are_typed_errors(slide_folder, tmp_path):
    from weakstil.ssl.module import SSLConfig

    for kwargs in ({"method": "byol"}, {"arch": "resnet50"}, {"batch_size": 1}):
        with pytest.raises(ConfigError):
            SSLConfig(**kwargs)
    result = invoke("pretrain", slide_folder, "--out", tmp_path / "x", "--precision", "8-bit", *TINY)
    assert result.exit_code == 2 and "precision" in result.output
    result = invoke("pretrain", slide_folder, "--out", tmp_path / "resnet18-random", *TINY)
    assert result.exit_code == 2 and "built-in encoder" in " ".join(result.output.split())


# --- the whole chain on a labelled cohort ------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_extract_train_score_end_to_end(tmp_path):
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.model import load_model
    from weakstil.runs.batch import score_slides
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides

    cohort = synth_cohort(tmp_path / "cohort", n=8, seed=3, size_um=500, workers=1, progress=False)
    enc_dir = tmp_path / "models" / "encoders" / "cohort-ssl"
    assert invoke("pretrain", cohort / "slides", "--out", enc_dir, *TINY).exit_code == 0
    features = tmp_path / "features"
    result = invoke("extract", cohort / "slides", "--features", features, "--encoder", enc_dir, "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("train", cohort / "labels.csv", "--features", features, "--models", tmp_path / "models",
                    "--name", "m", "--folds", 2, "--max-epochs", 2, "--patience", 2, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "models" / "m")
    sha = json.loads((enc_dir / "encoder.json").read_text())["weights_sha256"]
    assert model.fingerprint["encoder"]["name"] == "cohort-ssl" and model.fingerprint["encoder"]["weights_sha256"] == sha
    sources = slide_sources(find_slides(cohort / "slides"))[:1]
    scored = score_slides(sources, tmp_path / "models" / "m", features_dir=features, out_dir=tmp_path / "results",
                          opts=ExtractOptions(progress=False), formats=("csv",))
    assert not scored.failed


def test_pretraining_starts_from_the_random_init_baseline():
    """Step 0 of `--arch resnet18` is `resnet18-random`: the benchmark's gain is the SSL steps' alone."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.ssl.module import build_backbone

    ours, theirs = build_backbone("resnet18", seed=0).state_dict(), create_encoder("resnet18-random").backbone.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
