"""#13 case 2: a damaged model.ckpt is refused at load (sha256 recorded at training) and weights
that are not finite are refused too, with a ModelCorruptError that names the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakstil.errors import ModelCorruptError, WeakstilError
from weakstil.mil.model import MILRegressor, TrainedModel, load_model

FP = {"encoder": {"name": "resnet18-random"}, "tiling": {"tile_px": 224}}


def save_model(folder, *, nan: bool = False):
    torch.manual_seed(0)
    member = MILRegressor(16, hidden=8)
    if nan:
        with torch.no_grad():
            next(member.parameters()).view(-1)[0] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    TrainedModel([member], fingerprint=FP).save(folder / "model.ckpt")
    return member


def flip_a_weight_byte(ckpt, member):
    """Flip one byte inside a weight tensor's stored bytes (the zip stays readable)."""
    data = bytearray(ckpt.read_bytes())
    weights = next(member.parameters()).detach().numpy().tobytes()
    at = data.find(weights[:64])
    assert at > 0
    data[at + 5] ^= 0x40
    ckpt.write_bytes(bytes(data))


def test_training_records_the_checksum_and_a_clean_model_loads(tmp_path):
    save_model(tmp_path / "m")
    record = (tmp_path / "m" / "model.sha256").read_text().split()
    assert len(record[0]) == 64 and record[1] == "model.ckpt"
    features = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert 0 <= load_model(tmp_path / "m").predict(features).score <= 100


def test_a_flipped_byte_in_model_ckpt_is_refused(tmp_path):
    member = save_model(tmp_path / "m")
    flip_a_weight_byte(tmp_path / "m" / "model.ckpt", member)
    with pytest.raises(ModelCorruptError) as info:
        load_model(tmp_path / "m")
    text = str(info.value)
    assert "model.ckpt" in text and ("checksum" in text or "corrupt" in text)
    assert isinstance(info.value, WeakstilError) and isinstance(info.value, ValueError)


def test_a_nan_weight_is_refused(tmp_path):
    save_model(tmp_path / "m", nan=True)
    with pytest.raises(ModelCorruptError, match="NaN or infinite") as info:
        load_model(tmp_path / "m")
    assert "model.ckpt" in str(info.value) and "corrupt" in str(info.value)


def test_a_model_from_before_checksums_still_loads(tmp_path):
    save_model(tmp_path / "m")
    (tmp_path / "m" / "model.sha256").unlink()
    assert load_model(tmp_path / "m").embed_dim == 16
