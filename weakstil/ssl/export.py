"""Writing the pretrain output folder: the encoder (safetensors + encoder.json) and the loss curve.

Each file is written to a temporary name in the folder and renamed into place
(:func:`weakstil.fs.atomic_path`); ``encoder.json`` goes last, so a folder with an ``encoder.json``
always has the weights it describes.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

from weakstil.embed.encoder_folders import (
    FORMAT,
    FORMAT_VERSION,
    SPEC_FILE,
    WEIGHTS_FILE,
    folder_encoder_name,
)
from weakstil.fs import atomic_path


def write_encoder_folder(out_dir: Path, backbone, *, arch: str, trained: dict) -> dict:
    """Write ``encoder.safetensors`` and ``encoder.json`` for ``backbone`` (a timm model of ``arch``,
    an :data:`weakstil.ssl.module.ARCHS` key) into ``out_dir``; returns the spec document."""
    from safetensors.torch import save_file

    from weakstil import __version__
    from weakstil.fingerprint import file_sha256
    from weakstil.ssl.module import ARCHS, IMAGENET_MEAN, IMAGENET_STD

    timm_name, kwargs, input_px = ARCHS[arch]
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
             for k, v in backbone.state_dict().items()}
    out_dir = Path(out_dir)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "arch": timm_name})
        digest = file_sha256(tmp)
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": folder_encoder_name(out_dir), "arch": timm_name, "model_kwargs": dict(kwargs),
        "embed_dim": int(backbone.num_features), "input_px": int(input_px),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "interpolation": "bilinear",
        "weights_file": WEIGHTS_FILE, "weights_sha256": digest,
        "licence": "yours: trained on your own slides",
        "trained": {**trained, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "weakstil_version": __version__},
    }
    with atomic_path(out_dir / SPEC_FILE) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return doc


def save_loss_curve(rows: list, out_dir: Path) -> None:
    """``loss.csv`` (step, loss, tiles_per_s) and ``loss.png`` (loss per step, with a running mean)."""
    if not rows:
        return
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "loss.csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "tiles_per_s"])
        writer.writerows([int(s), f"{loss:.6g}", f"{rate:.4g}"] for s, loss, rate in rows)
    with atomic_path(out_dir / "loss.png") as tmp:
        _loss_figure(rows).savefig(tmp, format="png", dpi=100)


def _loss_figure(rows: list):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([r[0] for r in rows])
    loss = np.array([r[1] for r in rows], dtype=float)
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss per step")
    k = max(1, len(loss) // 20)
    if k > 1:
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=2, label=f"running mean ({k} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("self-supervised pretraining")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
