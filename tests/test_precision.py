"""Encoder arithmetic options (--precision, --compile): what auto picks, what is refused, and that
bf16 features stay those of fp32 (cosine), as the CPU path computes them."""

from __future__ import annotations

import numpy as np
import pytest

from weakstil.embed import extract
from weakstil.embed.extract import TileEmbedder, resolve_precision
from weakstil.errors import ConfigError, WeakstilError


@pytest.mark.parametrize("flags,device,want", [
    ({"amx_bf16", "avx512_bf16"}, "cpu", "bf16"),  # AMX: bf16 matrix units
    ({"avx512_bf16", "avx512f"}, "cpu", "bf16"),  # AVX512-BF16 dot products (Zen 4, Cooper Lake)
    ({"avx512f", "avx2"}, "cpu", "fp32"),  # bf16 would be emulated: slower
    (set(), "cpu", "fp32"),
    (set(), "cuda", "fp16"),
    (set(), "cuda:1", "fp16"),
])
def test_auto_precision_follows_the_hardware(monkeypatch, flags, device, want):
    monkeypatch.setattr(extract, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", device) == want


def test_explicit_precisions_and_refusals():
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ConfigError, match="needs a GPU") as info:
        resolve_precision("fp16", "cpu")
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeakstilError) and info.value.fix
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")


def test_bf16_features_point_where_fp32_features_do():
    import torch

    from weakstil.embed.encoders import create_encoder

    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8))
    encoder = create_encoder("resnet18-random")
    fp32 = TileEmbedder(encoder, "cpu", precision="fp32")(tiles).astype(np.float64)
    embedder = TileEmbedder(encoder, "cpu", precision="bf16")
    assert embedder.precision == "bf16"
    bf16 = embedder(tiles).astype(np.float64)
    assert bf16.shape == fp32.shape == (4, encoder.spec.embed_dim)
    assert not np.array_equal(bf16, fp32)  # bf16 arithmetic did run
    cos = np.sum(fp32 * bf16, 1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.999
