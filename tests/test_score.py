"""Acceptance of the MIL stage (issue 3) on real cached features of a small synthetic cohort.

One module-scoped cohort (20 slides, 600 µm wide, ~14 tiles each) is written, extracted with the
random-init ResNet-18 and trained on once (default training config, 5 patient-grouped folds).
On top of it:

* the shuffled-label control: the same features with permuted labels score R² ≈ 0 or below,
  while the true labels score well;
* `weakstil score` end to end: scores.csv and the per-slide review bundle, a failed slide recorded,
  reruns skip without rewriting anything;
* checkpoints reproduce their scores exactly;
* a model is refused on features from another tiling or encoder, and with other encoder weights.

Unit-level checks live elsewhere: folds never share a patient (test_train, test_labels), metrics agree
with scikit-learn (test_metrics), bad label files give row-numbered errors (test_labels).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from weakstil.cli import app
from weakstil.embed.cache import FeatureCache
from weakstil.errors import CacheMismatchError, ModelMismatchError
from weakstil.outputs.score import SCORE_COLUMNS

N_SLIDES, SEED, SIZE_UM = 20, 0, 600
N_SCORED = 3
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
TILE_FILES = ("tiles.csv", "heatmap.png", "heatmap.tif", "tiles.geojson", "top_tiles.png")


def invoke(*args):
    return CliRunner(env=ENV).invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Cohort → cache → `weakstil train` → models/true (attention MIL, ensemble of 5 fold models)."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.synth.lattice import synth_cohort
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    root = tmp_path_factory.mktemp("mil")
    cohort = synth_cohort(root / "cohort", n=N_SLIDES, seed=SEED, size_um=SIZE_UM, progress=False)
    encoder = create_encoder("resnet18-random")
    extracted = extract_slides(slide_sources(find_slides(cohort / "slides")), root / "features", encoder=encoder,
                               spec=TileSpec(), tissue=TissueParams(), opts=ExtractOptions(progress=False), qc=False)
    assert not extracted.failed, extracted.failed
    result = invoke("train", cohort / "labels.csv", "--features", root / "features", "--models", root / "models",
                    "--name", "true", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    model = root / "models" / "true"
    return {"root": root, "cohort": cohort, "features": root / "features", "cache": extracted.cache,
            "model": model, "metrics": json.loads((model / "metrics.json").read_text()), "encoder": encoder,
            "train_output": result.output}


@pytest.fixture(scope="module")
def slides_to_score(trained, tmp_path_factory) -> Path:
    """Three of the cohort's slides (copied with their mtimes, so their cached features are reused)."""
    folder = tmp_path_factory.mktemp("to_score")
    for path in sorted((trained["cohort"] / "slides").glob("*.svs"))[:N_SCORED]:
        shutil.copy2(path, folder)
    return folder


@pytest.fixture(scope="module")
def scored(trained, slides_to_score, tmp_path_factory):
    """`weakstil score` on the three slides plus a zero-byte one, run twice."""
    folder = tmp_path_factory.mktemp("with_bad")
    for path in slides_to_score.glob("*.svs"):
        shutil.copy2(path, folder)
    (folder / "broken.svs").write_bytes(b"")
    out = tmp_path_factory.mktemp("results")
    args = ["score", folder, "--model", trained["model"], "--features", trained["features"], "--out", out,
            "--quiet"]
    first = invoke(*args)
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "slides").rglob("*") if p.is_file()}
    scores_before = (out / "scores.csv").read_bytes()
    scores_mtime = (out / "scores.csv").stat().st_mtime_ns
    second = invoke(*args)
    return {"out": out, "first": first, "second": second, "stamps": stamps, "scores_before": scores_before,
            "scores_mtime": scores_mtime, "folder": folder}


# --- the shuffled-label control ------------------------------------------------------------------
def test_shuffled_labels_score_r2_near_zero_while_true_labels_score_well(trained, tmp_path):
    from weakstil.mil.cohort import train_from_cache

    labels = pd.read_csv(trained["cohort"] / "labels.csv", dtype={"slide_id": str, "patient_id": str})
    true_r2 = trained["metrics"]["pooled"]["r2"]
    shuffled_r2 = []
    for seed in (1, 2, 3, 4):
        shuffled = labels.assign(stil=np.random.default_rng(seed).permutation(labels["stil"].to_numpy()))
        assert not np.array_equal(shuffled["stil"], labels["stil"])
        path = tmp_path / f"shuffled{seed}.csv"
        shuffled.to_csv(path, index=False)
        (run,) = train_from_cache(path, trained["features"], models_dir=tmp_path / "models", name=f"shuffled{seed}",
                                  progress=False, accelerator="cpu")
        shuffled_r2.append(run.metrics["pooled"]["r2"])
    m = trained["metrics"]
    print(f"\n{m['n_slides']} slides, {m['n_tiles']} tiles, 5-fold CV ({m['cv_seconds']:.1f} s): out-of-fold R² "
          f"true labels {true_r2:.3f} (AUC@30 {m['pooled'].get('auc@30', float('nan')):.2f}); shuffled labels "
          f"{', '.join(f'{r:.3f}' for r in shuffled_r2)}")
    assert true_r2 >= 0.6
    # 20 slides in 4-slide folds: one shuffle's out-of-fold R² spreads by about ±0.2 around a
    # negative mean (six seeds with the probe head: 0.18, 0.00, −0.45, 0.04, 0.01, −0.11); the
    # mean over four shuffles is the control
    assert max(shuffled_r2) <= 0.25
    assert np.mean(shuffled_r2) <= 0.05


def test_train_cli_writes_the_model_directory(trained):
    import yaml

    model = trained["model"]
    for name in ("model.ckpt", "config.yaml", "metrics.json", "cv_predictions.csv", "plots/scatter.png",
                 "plots/roc.png"):
        assert (model / name).is_file(), name
    config = yaml.safe_load((model / "config.yaml").read_text())
    assert config["run"]["name"] == "true" and config["run"]["folds"] == 5  # the resolved options
    assert config["fingerprint"]["encoder"]["name"] == "resnet18-random"
    cv = pd.read_csv(model / "cv_predictions.csv", dtype={"slide_id": str, "patient_id": str})
    assert len(cv) == N_SLIDES and cv.groupby("patient_id")["fold"].nunique().max() == 1
    assert "R² pooled" in trained["train_output"] and "true" in trained["train_output"]


# --- weakstil score end to end -------------------------------------------------------------------
def test_score_writes_scores_and_the_review_bundle(scored, trained, slides_to_score):
    first, out = scored["first"], scored["out"]
    assert first.exit_code == 1, first.output  # the zero-byte slide failed; the others were scored
    assert f"{N_SCORED} done, 0 skipped, 1 failed" in flat(first.output)
    assert "broken.svs" in first.output and "EmptySlideFileError" in first.output

    with open(out / "scores.csv", encoding="utf-8") as f:
        assert f.readline().strip() == ",".join(SCORE_COLUMNS)
    scores = pd.read_csv(out / "scores.csv", dtype={"slide_id": str}, keep_default_na=False)
    ids = sorted(p.stem for p in slides_to_score.glob("*.svs"))
    assert sorted(scores["slide_id"]) == sorted(ids + ["broken"])
    ok = scores[scores["status"] == "ok"].set_index("slide_id")
    assert sorted(ok.index) == ids
    failed = scores[scores["status"] == "failed"].iloc[0]
    assert failed["slide_id"] == "broken" and "EmptySlideFileError" in failed["error"]
    assert failed["score"] == "" and failed["n_tiles"] == ""
    for sid in ids:
        row = ok.loc[sid]
        cached = trained["cache"].read(sid)
        assert 0 <= float(row["score"]) <= 100 and row["error"] == ""
        assert int(row["n_tiles"]) == cached.n_tiles
        folder = out / "slides" / sid
        for name in TILE_FILES:
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, (sid, name)
        tiles = pd.read_csv(folder / "tiles.csv")
        assert list(tiles.columns) == ["x", "y", "width", "height", "prediction", "attention", "contribution"]
        assert len(tiles) == cached.n_tiles
        np.testing.assert_array_equal(tiles[["x", "y"]].to_numpy(), cached.coords_l0)
        assert np.allclose(tiles["width"], cached.attrs["tile_size_l0"])
        assert tiles["prediction"].between(0, 100).all()
        assert tiles["contribution"].sum() == pytest.approx(float(row["score"]), abs=0.02)
    assert not list((out / "slides").glob(".*"))  # no staging folders left behind
    assert (out / "config.yaml").is_file()


def test_score_rerun_skips_and_rewrites_nothing(scored):
    second, out = scored["second"], scored["out"]
    assert second.exit_code == 1, second.output  # the broken slide still fails
    assert f"0 done, {N_SCORED} skipped, 1 failed" in flat(second.output)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "slides").rglob("*") if p.is_file()}
    assert after == scored["stamps"]
    assert (out / "scores.csv").read_bytes() == scored["scores_before"]
    assert (out / "scores.csv").stat().st_mtime_ns == scored["scores_mtime"]


# --- checkpoints reproduce their scores exactly --------------------------------------------------
def test_checkpoint_reproduces_scores_exactly(trained, slides_to_score, scored, tmp_path):
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.model import load_model
    from weakstil.outputs.score import read_score_json
    from weakstil.runs.batch import score_slides
    from weakstil.wsi.slide import find_slides

    sources = slide_sources(find_slides(slides_to_score))
    runs = []
    for name in ("a", "b"):
        result = score_slides(sources, trained["model"], features_dir=trained["features"], out_dir=tmp_path / name,
                              opts=ExtractOptions(progress=False), formats=("csv",))
        assert [o.status for o in result.outcomes] == ["done"] * N_SCORED
        runs.append(tmp_path / name)
    assert (runs[0] / "scores.csv").read_bytes() == (runs[1] / "scores.csv").read_bytes()
    # and the same as the CLI's run (the broken slide aside)
    cli_scores = pd.read_csv(scored["out"] / "scores.csv", dtype={"slide_id": str}).query("status == 'ok'")
    lib_scores = pd.read_csv(runs[0] / "scores.csv", dtype={"slide_id": str})
    assert cli_scores.set_index("slide_id")["score"].to_dict() == lib_scores.set_index("slide_id")["score"].to_dict()

    first, again = load_model(trained["model"]), load_model(trained["model"])
    for source in sources:
        sid = source.slide_id
        assert (runs[0] / "slides" / sid / "tiles.csv").read_bytes() == \
            (runs[1] / "slides" / sid / "tiles.csv").read_bytes()
        features = trained["cache"].read(sid).features
        a, b = first.predict(features), again.predict(features)
        assert a.score == b.score
        for field in ("tile_pred", "attention", "contribution"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        assert read_score_json(runs[0] / "slides" / sid)["score"] == round(a.score, 4)
        tiles = pd.read_csv(runs[0] / "slides" / sid / "tiles.csv")
        np.testing.assert_allclose(tiles["prediction"], a.tile_pred, rtol=1e-5, atol=1e-6)


# --- mismatched model and features are refused ---------------------------------------------------
def _store(features_dir: Path, encoder, spec, tissue) -> Path:
    from weakstil.embed.extract import open_cache

    return open_cache(features_dir, encoder, spec, tissue).path  # an empty store of that identity


def test_features_of_another_tiling_or_encoder_are_refused(trained, slides_to_score, tmp_path):
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.mil.model import check_fingerprint, load_model
    from weakstil.runs.batch import score_slides
    from weakstil.wsi.slide import find_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    other_tiling = _store(tmp_path / "f1", trained["encoder"], TileSpec(tile_px=112, mpp=1.0), TissueParams())
    other_encoder = _store(tmp_path / "f2", create_encoder("resnet18-random", seed=1), TileSpec(), TissueParams())
    for store, needles in ((other_tiling, ("tiling.tile_px", "tiling.mpp")),
                           (other_encoder, ("encoder.weights_sha256",))):
        out = tmp_path / f"results-{store.parent.name}"
        result = invoke("score", slides_to_score, "--model", trained["model"], "--features", store, "--out", out,
                        "--quiet")
        assert result.exit_code == 2, result.output
        text = flat(result.output)
        assert "trained on other features" in text and str(store.name) in text
        for needle in needles:
            assert needle in text
        assert "Traceback" not in result.output
        assert not (out / "scores.csv").exists()

        sources = slide_sources(find_slides(slides_to_score))
        with pytest.raises(ModelMismatchError) as info:
            score_slides(sources, trained["model"], features_dir=store, out_dir=out,
                         opts=ExtractOptions(progress=False))
        assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, CacheMismatchError)
        with pytest.raises(ModelMismatchError):
            check_fingerprint(load_model(trained["model"]), FeatureCache.open_store(store))

    result = invoke("score", slides_to_score, "--model", tmp_path / "no-model", "--features", trained["features"],
                    "--out", tmp_path / "r", "--quiet")
    assert result.exit_code == 2 and "model.ckpt is missing" in flat(result.output), result.output

    model = load_model(trained["model"])
    with pytest.raises(ModelMismatchError, match="expects"):
        model.predict(np.zeros((4, 2048), np.float32))  # e.g. RetCCL's 2048-d features


def test_a_features_folder_gets_the_models_own_cache(trained, slides_to_score, tmp_path):
    """A features *folder* holding a cache of another tiling is fine: the model's own one is made."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.outputs.score import make_scorer
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    other = _store(tmp_path / "features", create_encoder("resnet18-random"), TileSpec(tile_px=112), TissueParams())
    scorer = make_scorer(trained["model"], tmp_path / "features", tmp_path / "results")
    assert scorer.extractor.cache.path != other
    assert scorer.extractor.cache.path.name == trained["cache"].path.name


def _timm_weights(path: Path, seed: int) -> Path:
    import timm
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("resnet18", num_classes=0)
    torch.save(model.state_dict(), path)
    return path


def test_a_model_is_refused_with_other_encoder_weights(tmp_path, tiny_slide):
    """A model trained on `timm:resnet18` + file:A is refused with weights B, and when A is replaced."""
    from weakstil.embed.encoders import create_encoder
    from weakstil.mil.model import MILRegressor, TrainedModel
    from weakstil.outputs.score import make_scorer
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    weights_a = _timm_weights(tmp_path / "a.pth", seed=1)
    weights_b = _timm_weights(tmp_path / "b.pth", seed=2)
    encoder = create_encoder("timm:resnet18", f"file:{weights_a}")
    fingerprint = {"encoder": encoder.fingerprint(), "tiling": TileSpec().fingerprint(TissueParams())}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    TrainedModel([MILRegressor(512)], fingerprint=fingerprint).save(model_dir / "model.ckpt")
    features, out = tmp_path / "features", tmp_path / "results"

    # the right weights, also from another path (same sha256), are accepted
    make_scorer(model_dir, features, out)
    moved = tmp_path / "moved.pth"
    shutil.copy(weights_a, moved)
    make_scorer(model_dir, features, out, weights=f"file:{moved}")

    with pytest.raises(ModelMismatchError, match="is not the one this model was trained on"):
        make_scorer(model_dir, features, out, weights=f"file:{weights_b}")
    result = invoke("score", tiny_slide, "--model", model_dir, "--features", features, "--out", out,
                    "--weights", f"file:{weights_b}", "--quiet")
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "is not the one this model was trained on" in text and "--weights" in text

    shutil.copy(weights_b, weights_a)  # the file the model names now holds other weights
    with pytest.raises(ModelMismatchError, match="is not the one this model was trained on"):
        make_scorer(model_dir, features, out)


def test_a_model_of_an_older_morphometry_is_refused_with_what_to_do(tmp_path):
    """A model trained on `stainmorph.v7` features names the same encoder as today's, but its
    columns meant other things: scoring refuses it, saying which versions and to retrain — not to
    look for other weights."""
    from weakstil.embed.encoders import MORPH_ARCH, create_encoder
    from weakstil.mil.model import MILRegressor, TrainedModel
    from weakstil.outputs.score import make_scorer
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    encoder_fp = create_encoder("resnet18-random+stainmorph").fingerprint()
    old = dict(encoder_fp, arch=encoder_fp["arch"].replace(MORPH_ARCH, "stainmorph.v7"))
    assert old["arch"] != encoder_fp["arch"]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    fingerprint = {"encoder": old, "tiling": TileSpec().fingerprint(TissueParams())}
    TrainedModel([MILRegressor(encoder_fp["embed_dim"])], fingerprint=fingerprint).save(model_dir / "model.ckpt")
    with pytest.raises(ModelMismatchError, match="stainmorph.v7 features; this weakstil computes") as info:
        make_scorer(model_dir, tmp_path / "features", tmp_path / "results")
    assert "retrain" in info.value.fix
