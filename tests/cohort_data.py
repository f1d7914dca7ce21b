"""One small two-cohort world shared by test_cohorts, test_evaluate and test_qc (built once per session).

Cohort A (12 slides, prefix A) trains the base model; cohort B (10 slides, prefix B, another seed)
is the "new hospital". Both come from the same synthetic generator and are extracted with the
random-init ResNet-18 into one feature cache. ``odd/`` holds a strongly over-stained slide (stain
optical density x2.5) and a near-empty slide (two tiles of tissue on white).

Built under pytest's session base folder, so every test module that calls :func:`world` reuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from weakstil.cli import app

SIZE_UM = 500
TRAIN = ["--device", "cpu", "--quiet", "--folds", "3", "--max-epochs", "6", "--patience", "3"]


def invoke(*args):
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"}).invoke(app, [str(a) for a in args])


@dataclass
class World:
    root: Path
    a: Path  # cohort folders (slides/, labels.csv)
    b: Path
    odd: Path  # over-stained + near-empty slides
    features: Path
    models: Path
    base: Path  # the model trained on A


def write_odd_slides(folder: Path) -> Path:
    """``DARK.svs`` (stain OD x2.5) and ``EMPTY.svs`` (a 2-tile patch of tissue on white)."""
    from weakstil.synth.lattice import SlideParams, make_scene, render_scene
    from weakstil.wsi.writer import write_aperio_tiff

    folder.mkdir(parents=True, exist_ok=True)
    scene = make_scene(SlideParams(111, 30.0, (600.0, 480.0)))
    light, od_h, od_e = scene.stain
    scene.stain = np.stack([light, od_h * 2.5, od_e * 2.5])
    write_aperio_tiff(folder / "DARK.svs", render_scene(scene, 0.5), 0.5)
    rgb = render_scene(make_scene(SlideParams(112, 30.0, (600.0, 480.0))), 0.5)
    empty = np.full_like(rgb, 245)
    empty[300:560, 300:780] = rgb[300:560, 300:780]
    write_aperio_tiff(folder / "EMPTY.svs", empty, 0.5)
    return folder


def world(tmp_path_factory) -> World:
    root = tmp_path_factory.getbasetemp() / "cohort-world"
    w = World(root, root / "A", root / "B", root / "odd", root / "features", root / "models",
              root / "models" / "base")
    if (root / "done.json").is_file():
        return w
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    synth_cohort(w.a, n=12, seed=0, size_um=SIZE_UM, progress=False, prefix="A")
    synth_cohort(w.b, n=10, seed=1, size_um=SIZE_UM, progress=False, prefix="B")
    paths = find_slides(w.a / "slides") + find_slides(w.b / "slides")
    extracted = extract_slides(slide_sources(paths), w.features, encoder=create_encoder("resnet18-random"),
                               spec=TileSpec(), tissue=TissueParams(), opts=ExtractOptions(progress=False), qc=False)
    assert not extracted.failed, extracted.failed
    write_odd_slides(w.odd)
    result = invoke("train", w.a / "labels.csv", "--features", w.features, "--models", w.models, "--name", "base",
                    *TRAIN)
    assert result.exit_code == 0, result.output
    (root / "done.json").write_text(json.dumps({"ok": True}))
    return w
