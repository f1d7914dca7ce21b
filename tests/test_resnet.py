"""The plain-torch built-in ResNets equal timm's: same keys, same random weights, same output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from weakstil.embed import resnet


@pytest.mark.parametrize(("arch", "kwargs", "seed"), [
    ("resnet18", {"zero_init_last": False}, 0),  # resnet18-random
    ("resnet18", {}, 5),
    ("resnet50", {}, 1),  # retccl's backbone
])
def test_same_weights_and_output_as_timm(arch, kwargs, seed):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    ours = resnet.create_resnet(arch, **kwargs).eval()
    torch.manual_seed(seed)
    theirs = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert ours.num_features == theirs.num_features
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))


def test_only_known_archs_and_keywords_are_built_here():
    assert resnet.builds("resnet18", {"zero_init_last": False})
    assert not resnet.builds("resnet18", {"drop_path_rate": 0.1})
    assert not resnet.builds("vit_small_patch16_224", {})
    with pytest.raises(ValueError, match="no built-in ResNet"):
        resnet.ResNet("resnet9")


def test_builtin_encoder_does_not_import_timm():
    code = ("import sys; from weakstil.embed.encoders import create_encoder; e = create_encoder('resnet18-random'); "
            "print(e.weights_sha256); print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]"
    from weakstil.embed.encoders import create_encoder

    assert out[0] == create_encoder("resnet18-random").weights_sha256


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_batchnorm_gives_the_same_features(arch):
    """fold_batchnorm: every BatchNorm gone into its convolution, the output unchanged to float
    rounding — with BatchNorm statistics and affines that are not the identity (a trained model)."""
    torch.manual_seed(0)
    model = resnet.create_resnet(arch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        folded = resnet.fold_batchnorm(model)
        out = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not torch.equal(out, torch.zeros_like(out))


def test_fold_batchnorm_refuses_a_model_in_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        resnet.fold_batchnorm(resnet.create_resnet("resnet18").train())


def test_embedder_folds_a_copy_and_leaves_the_callers_encoder_alone():
    import numpy as np

    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import TileEmbedder

    encoder = create_encoder("resnet18-random+stainmorph")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
    embedder = TileEmbedder(encoder, "cpu", precision="fp32")
    assert n_bn == 20 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in embedder._forward.modules())
    tiles = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    with torch.inference_mode():
        direct = encoder(encoder.preprocess(tiles)).numpy()
    feats = embedder(tiles).astype(np.float32)
    assert np.allclose(feats, direct, rtol=2e-3, atol=2e-3)
