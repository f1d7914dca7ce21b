"""Encoder registry, weight sources and checkpoint layouts — offline, CPU, small inputs.

The RetCCL and Ciga checkpoints are rebuilt here in the authors' key layouts from randomly
initialised torchvision ResNets (the authors' models are torchvision-style ResNets), so loading is
checked tensor by tensor and against the torchvision forward pass, without downloading anything.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from weakstil import fingerprint
from weakstil.embed import encoders as enc
from weakstil.embed import weights
from weakstil.embed.encoders import (
    EncoderSpec,
    create_encoder,
    encoders_table,
    get_encoder_spec,
    list_encoders,
    make_preprocess,
    parse_weight_source,
    register_encoder,
)
from weakstil.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    UnknownEncoderError,
    WeightsNotFoundError,
    WeightSourceError,
)

BUILTINS = ("resnet18-random", "retccl", "ciga-simclr")


def _batch(seed: int = 0, n: int = 2, px: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


def _torchvision_resnet(arch: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)(weights=None)
        for m in model.modules():  # non-trivial BatchNorm statistics, as in a trained checkpoint
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
    model.fc = torch.nn.Identity()
    return model.eval()


def _assert_all_loaded(encoder, expected: dict) -> None:
    own = encoder.backbone.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


def _assert_same_features(y, y_ref) -> None:
    """Equal up to float32 rounding (channels_last convolutions sum in another order)."""
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-4 * float(y_ref.abs().max()))


@pytest.fixture
def registry(monkeypatch):
    """Register test encoders without leaking them into other tests."""
    monkeypatch.setattr(enc, "_REGISTRY", dict(enc._REGISTRY))


# --- registry ---------------------------------------------------------------------------------
def test_registry_lists_builtins():
    specs = {s.name: s for s in list_encoders()}
    assert set(BUILTINS) <= set(specs)
    assert specs["resnet18-random"].pretrained is False
    assert "random init" in specs["resnet18-random"].description
    assert (specs["retccl"].arch, specs["retccl"].embed_dim) == ("resnet50", 2048)
    assert "GPL-3.0" in specs["retccl"].licence
    assert (specs["ciga-simclr"].arch, specs["ciga-simclr"].embed_dim) == ("resnet18", 512)
    assert specs["ciga-simclr"].mean == (0.5, 0.5, 0.5)
    assert get_encoder_spec("retccl") is specs["retccl"]


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownEncoderError) as info:
        get_encoder_spec("resnet-18")
    assert isinstance(info.value, LookupError)
    for name in BUILTINS:
        assert name in str(info.value)
    assert "timm:<name>" in str(info.value)


def test_unknown_timm_model_suggests_close_names():
    with pytest.raises(UnknownEncoderError, match="resnet18"):
        get_encoder_spec("timm:resnet_18")


def test_timm_spec_comes_from_the_model():
    spec = get_encoder_spec("timm:vit_small_patch16_224")
    assert (spec.arch, spec.embed_dim, spec.input_px) == ("vit_small_patch16_224", 384, 224)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.interpolation == "bicubic"
    assert spec.slug == "timm-vit_small_patch16_224"


def test_register_rejects_bad_and_duplicate_names(registry):
    spec = EncoderSpec(name="my-enc", arch="resnet18", embed_dim=512, weights="random-init")
    register_encoder(spec)
    assert get_encoder_spec("my-enc") is spec
    with pytest.raises(ValueError, match="already registered"):
        register_encoder(spec)
    with pytest.raises(ValueError, match="invalid encoder name"):
        register_encoder(EncoderSpec(name="timm:x", arch="resnet18", embed_dim=512))


# --- the random encoder -----------------------------------------------------------------------
def test_random_encoder_is_deterministic_per_seed_and_differs_across_seeds():
    rng_before = torch.get_rng_state()
    a, b, c = (create_encoder("resnet18-random", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    x = _batch()
    with torch.inference_mode():
        ya, yb, yc = a(x), b(x), c(x)
    assert ya.shape == (2, 512) and ya.dtype == torch.float32 and torch.isfinite(ya).all()
    assert torch.equal(ya, yb)
    assert not torch.allclose(ya, yc)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint()["weights_sha256"] != c.fingerprint()["weights_sha256"]


def test_encoder_is_frozen_and_fingerprint_is_json_stable():
    e = create_encoder("resnet18-random")
    assert not e.training and not any(p.requires_grad for p in e.parameters())
    assert isinstance(e, enc.Encoder) and e.spec.name == "resnet18-random"
    fp = e.fingerprint()
    assert {"name", "arch", "weights", "weights_sha256", "embed_dim", "input_px", "mean", "std"} <= set(fp)
    assert fp["weights"] == "random-init" and len(fp["weights_sha256"]) == 64
    assert json.loads(json.dumps(fp)) == fp
    e.preprocess(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))
    assert pickle.loads(pickle.dumps(e)).fingerprint() == fp  # e.g. to ship it to a Dask worker


def test_random_encoder_features_are_not_degenerate():
    e = create_encoder("resnet18-random")
    x = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        f = e(e.preprocess(x))
    assert torch.isfinite(f).all()
    assert (f.abs().amax(0) > 0).float().mean() > 0.9  # few dead dimensions
    assert (f.std(0) > 0).float().mean() > 0.9  # and they vary between tiles


def test_random_encoder_takes_no_weights(tmp_path):
    with pytest.raises(WeightSourceError, match="timm:resnet18"):
        create_encoder("resnet18-random", f"file:{tmp_path / 'x.pth'}")


# --- built-in checkpoint layouts --------------------------------------------------------------
def test_retccl_layout_loads_every_backbone_tensor(tmp_path):
    reference = _torchvision_resnet("resnet50", seed=1)
    state = reference.state_dict()  # the authors load it with fc=Identity, strict=True: no fc keys
    path = tmp_path / "best_ckpt.pth"
    torch.save(state, path)

    e = create_encoder("retccl", f"file:{path}")
    _assert_all_loaded(e, state)
    x = _batch()
    with torch.inference_mode():
        y, y_ref = e(x), reference(x)
        y_random = enc._build_model(e.spec, seed=0).eval()(x)
    assert y.shape == (2, 2048)
    _assert_same_features(y, y_ref)
    assert not torch.allclose(y, y_random)
    fp = e.fingerprint()
    assert fp["weights"] == f"file:{path}" and fp["weights_sha256"] == fingerprint.file_sha256(path)


def test_retccl_key_mapper_tolerates_dataparallel_and_heads():
    t = torch.zeros(1)
    state = {"module.conv1.weight": t, "module.layer1.0.bn1.bias": t, "module.fc.weight": t,
             "module.instDis.weight": t, "groupDis.bias": t}
    assert set(weights.retccl_keys(state)) == {"conv1.weight", "layer1.0.bn1.bias"}


def _ciga_checkpoint(reference: torch.nn.Module, **extra) -> dict:
    state = {f"model.resnet.{k}": v for k, v in reference.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    state |= {"model.resnet.fc.1.weight": torch.randn(512, 512, generator=g),  # SimCLR projection head
              "model.resnet.fc.1.bias": torch.zeros(512),
              "model.resnet.fc.3.weight": torch.randn(128, 512, generator=g),
              "model.resnet.fc.3.bias": torch.zeros(128)}
    return {"epoch": 999, "global_step": 123, "pytorch-lightning_version": "0.7.6", "state_dict": state,
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": []}],
            "lr_schedulers": [], **extra}


def test_ciga_layout_loads_every_backbone_tensor(tmp_path):
    reference = _torchvision_resnet("resnet18", seed=2)
    path = tmp_path / "tenpercent_resnet18.ckpt"
    torch.save(_ciga_checkpoint(reference), path)

    e = create_encoder("ciga-simclr", f"file:{path}")
    _assert_all_loaded(e, reference.state_dict())
    x = _batch()
    with torch.inference_mode():
        y, y_ref = e(x), reference(x)
        y_random = enc._build_model(e.spec, seed=0).eval()(x)
    assert y.shape == (2, 512)
    _assert_same_features(y, y_ref)
    assert not torch.allclose(y, y_random)


class _Planted:
    """Pickles as a call to Path.touch: what a hostile checkpoint could run on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy-format"])
def test_lightning_checkpoint_with_foreign_objects_loads_without_running_them(tmp_path, zipfile):
    reference = _torchvision_resnet("resnet18", seed=4)
    marker = tmp_path / "code-ran"
    path = tmp_path / "tenpercent_resnet18.ckpt"
    ckpt = _ciga_checkpoint(reference, hparams=argparse.Namespace(lr=0.1), planted=_Planted(marker))
    torch.save(ckpt, path, _use_new_zipfile_serialization=zipfile)  # torch < 1.6 wrote the legacy format
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # so the inert re-read is what gets exercised

    e = create_encoder("ciga-simclr", f"file:{path}")
    _assert_all_loaded(e, reference.state_dict())
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the stock unpickler does run it: the test can tell
    assert marker.exists()


# --- timm:<name> with file weights ------------------------------------------------------------
def test_timm_model_with_file_weights(tmp_path):
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        trained = timm.create_model("resnet18", num_classes=10).eval()  # the fc head is dropped on load
    state = trained.state_dict()
    path = tmp_path / "w.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # saved from DataParallel

    e = create_encoder("timm:resnet18", f"file:{path}")
    assert (e.spec.embed_dim, e.spec.input_px, e.spec.interpolation) == (512, 224, "bicubic")
    _assert_all_loaded(e, {k: v for k, v in state.items() if not k.startswith("fc.")})
    trained.reset_classifier(0)
    with torch.inference_mode():
        _assert_same_features(e(_batch()), trained(_batch()))


@pytest.mark.parametrize("fmt", ["plain", "state_dict", "model", "safetensors"])
def test_read_checkpoint_formats(tmp_path, fmt):
    state = {"conv1.weight": torch.randn(2, 3), "bn1.num_batches_tracked": torch.tensor(7)}
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state if fmt == "plain" else {fmt: state, "epoch": 3, "note": "x"}, path)
    loaded = weights.read_checkpoint(path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_timm_model_needs_explicit_weights():
    with pytest.raises(WeightSourceError, match="needs weights"):
        create_encoder("timm:resnet18")


# --- weight sources and bad checkpoints -------------------------------------------------------
@pytest.mark.parametrize("text", ["/data/best_ckpt.pth", "best_ckpt.pth", "models/ciga.ckpt", "C:\\w\\x.pt"])
def test_bare_path_is_refused_with_the_right_spelling(text):
    with pytest.raises(WeightSourceError) as info:
        create_encoder("retccl", text)
    assert isinstance(info.value, ValueError)
    assert f"file:{text}" in str(info.value)


@pytest.mark.parametrize("text", ["https://example.org/w.pth", "imagenet", "hf-hub:not-a-repo", "file:"])
def test_other_bad_sources_are_refused(text):
    with pytest.raises(WeightSourceError):
        parse_weight_source(text)


def test_weight_source_spellings():
    assert parse_weight_source("hf-hub:timm/resnet50.a1_in1k").value == "timm/resnet50.a1_in1k"
    assert parse_weight_source("file:///abs/x.pth").value == "/abs/x.pth"
    assert str(parse_weight_source("random-init")) == "random-init"


def test_builtin_without_weights_says_where_to_get_them():
    with pytest.raises(WeightSourceError, match="best_ckpt.pth"):
        create_encoder("retccl")
    with pytest.raises(WeightSourceError, match="file"):
        create_encoder("ciga-simclr", "hf-hub:org/name")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        create_encoder("ciga-simclr", f"file:{tmp_path / 'nope.ckpt'}")
    assert isinstance(info.value, FileNotFoundError) and "nope.ckpt" in str(info.value)
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        create_encoder("ciga-simclr", f"file:{tmp_path}")


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", b"PK\x03\x04broken zip"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError):
        create_encoder("ciga-simclr", f"file:{path}")


def test_checkpoint_of_another_architecture_is_a_mismatch(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_resnet("resnet18", seed=0).state_dict(), path)
    with pytest.raises(CheckpointMismatchError) as info:
        create_encoder("retccl", f"file:{path}")
    text = str(info.value)
    assert "missing" in text and "wrong shape" in text and "layer1.0.conv3.weight" in text


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_partial_or_extra_backbone_keys_are_a_mismatch(tmp_path, change):
    ckpt = _ciga_checkpoint(_torchvision_resnet("resnet18", seed=0))
    state = ckpt["state_dict"]
    if change == "drop":
        del state["model.resnet.layer4.1.conv2.weight"]
    elif change == "extra":
        state["model.resnet.att_branch.0.weight"] = torch.zeros(1)
    else:
        state["model.resnet.bn1.bias"] = torch.zeros(65)
    path = tmp_path / "c.ckpt"
    torch.save(ckpt, path)
    key = {"drop": "layer4.1.conv2.weight", "extra": "att_branch.0.weight", "reshape": "bn1.bias"}[change]
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        create_encoder("ciga-simclr", f"file:{path}")


def test_whole_module_pickle_is_not_a_state_dict(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointMismatchError, match="state_dict"):
        create_encoder("timm:resnet18", f"file:{path}")


# --- preprocessing, listing, import cost ------------------------------------------------------
def test_preprocess_layouts_agree_and_normalise():
    spec = get_encoder_spec("ciga-simclr")
    pre = make_preprocess(spec)
    nhwc = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    x = pre(nhwc)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, pre(nhwc.permute(0, 3, 1, 2).contiguous()))
    torch.testing.assert_close(x, (nhwc.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)
    assert pre(nhwc.numpy()).shape == x.shape  # numpy arrays are accepted too
    with pytest.raises(TypeError):
        pre(nhwc.float())


def test_preprocess_resizes_only_other_sizes():
    spec = get_encoder_spec("resnet18-random")
    big = torch.full((1, 256, 256, 3), 200, dtype=torch.uint8)
    x = make_preprocess(spec)(big)
    assert x.shape == (1, 3, 224, 224)
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], ((200 / 255 - mean) / std).expand(3, 224, 224))
    assert spec.preprocess_params()["input_px"] == 224


def test_encoders_table_shows_every_spec():
    from rich.console import Console

    table = encoders_table(list_encoders())
    assert [c.header for c in table.columns] == ["name", "dim", "input px", "weights", "licence", "pretrained"]
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    for name in BUILTINS:
        assert name in text
    assert "timm:<name>" in text


def test_import_does_not_load_torch_or_timm():
    code = "import sys, weakstil.embed.encoders; assert not {'torch', 'timm', 'rich'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
