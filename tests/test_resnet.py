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
