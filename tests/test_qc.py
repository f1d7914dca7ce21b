"""QC / out-of-distribution flags (outputs/qc.py): the statistics, the rules, and on real scores."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cohort_data import invoke, world

from weakstil.mil import qc_reference
from weakstil.outputs import qc


def test_loo_distances_equal_the_brute_force_computation():
    x = np.random.default_rng(0).normal(size=(7, 5))
    loo = qc_reference.loo_distances(x)
    for i in range(7):
        others = np.delete(x, i, axis=0)
        assert loo[i] == pytest.approx(qc_reference.embedding_distance(x[i], others.mean(0), others.std(0, ddof=1)), rel=1e-9)
    with pytest.raises(ValueError):
        qc_reference.loo_distances(x[:2])


MEASURED = {"lymph_per_stroma": -2, "stroma_est": -1}  # name: column offset from the end


def _reference(seed=0, stains=True, measured=True):
    rng = np.random.default_rng(seed)
    amounts = np.c_[rng.uniform(1.8, 2.4, 30), rng.uniform(0.9, 1.3, 30)].tolist() if stains else None
    shares = np.c_[np.linspace(0.02, 0.34, 30), np.linspace(0.2, 0.8, 30)] if measured else None
    return qc_reference.build_reference(rng.normal(size=(30, 16)), rng.integers(80, 120, 30), [0.25] * 15 + [0.5] * 15,
                                        member_sd=rng.uniform(0, 4, 30), stains=amounts, measured=shares,
                                        measured_columns=MEASURED if measured else None)


def test_thresholds_follow_the_documented_rules():
    ref = _reference()
    t = ref["thresholds"]
    assert t["min_tiles"] == max(qc_reference.MIN_TILES_FLOOR, int(np.ceil(0.25 * ref["training"]["n_tiles_p05"])))
    assert t["mpp_range"] == pytest.approx([0.225, 0.55])
    assert t["max_distance"] >= 2 * ref["loo_distance"]["median"] - 1e-12
    assert t["max_distance"] >= 1.25 * ref["loo_distance"]["max"] - 1e-12
    lo, hi = ref["training"]["stain_amounts"]["min"], ref["training"]["stain_amounts"]["max"]
    np.testing.assert_allclose(t["stain_range"], [[lo[0] / 1.5, hi[0] * 1.5], [lo[1] / 1.5, hi[1] * 1.5]])
    assert _reference(stains=False)["thresholds"]["stain_range"] is None  # features made without normalisation
    assert t["max_member_sd"] == pytest.approx(max(10.0, 1.5 * ref["training"]["member_sd_p99"]))
    # each measurement's training range, widened by a quarter of it on each side
    assert list(t["measured_range"]) == list(MEASURED)
    np.testing.assert_allclose(t["measured_range"]["lymph_per_stroma"], [0.02 - 0.08, 0.34 + 0.08])
    np.testing.assert_allclose(t["measured_range"]["stroma_est"], [0.2 - 0.15, 0.8 + 0.15])
    assert _reference(measured=False)["thresholds"]["measured_range"] is None  # an encoder without the morphometry
    assert set(ref["rules"]) == set(qc.FLAGS) - {qc.NO_REFERENCE}


def test_each_rule_flags_and_a_typical_slide_is_clean():
    ref = _reference()
    mean = np.asarray(ref["mean"])
    clean = qc.slide_flags(ref, n_tiles=100, mpp=0.25, embedding=mean, scores=np.array([30.0, 31, 29]),
                           stain=[2.0, 1.1], measured=[0.40, 0.5])  # within the widened range
    assert clean == []
    flags = qc.slide_flags(ref, n_tiles=2, mpp=1.0, embedding=mean + 10 * np.asarray(ref["std"]),
                           scores=np.array([5.0, 60, 30]), stain=[2.0 * 2.5, 1.1],  # over-stained hematoxylin
                           measured=[0.46, 0.5])  # a dark-pixel share beyond any training slide's
    assert qc.flag_names(qc.qc_text(flags)) == ["low-tissue", "mpp-out-of-range", "out-of-distribution",
                                                 "stain-out-of-range", "measurement-out-of-range",
                                                 "ensemble-disagreement"]
    assert "lymph_per_stroma 0.46 not in -0.06-0.42" in qc.qc_text(flags) and "stroma_est" not in qc.qc_text(flags)
    assert "H 5.00 not in" in qc.qc_text(flags) and "E " not in qc.qc_text(flags)
    faded = qc.slide_flags(ref, n_tiles=100, stain=[2.0, 0.3])  # eosin washed out
    assert qc.flag_names(qc.qc_text(faded)) == ["stain-out-of-range"]
    assert qc.slide_flags(ref, n_tiles=100, stain=None) == []  # a slide extracted without normalisation
    assert qc.slide_flags(None, n_tiles=100) == [qc.NO_REFERENCE]


def test_reference_round_trips_and_a_model_without_one_scores_as_no_reference(tmp_path):
    ref = _reference()
    qc_reference.save_reference(ref, tmp_path / qc_reference.REFERENCE_FILE)
    assert qc_reference.load_reference(tmp_path) == json.loads(json.dumps(ref))
    assert qc_reference.load_reference(tmp_path / "older-model") is None
    assert qc.check_slide(None, model=None, features=np.zeros((3, 4)), mpp=0.5) == "no-reference"


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """`weakstil score` on the over-stained and near-empty slides plus two of cohort B; `evaluate` on B."""
    import shutil

    w = world(tmp_path_factory)
    slides = tmp_path_factory.mktemp("qc_slides")
    for path in list(w.odd.glob("*.svs")) + sorted((w.b / "slides").glob("*.svs"))[:2]:
        shutil.copy2(path, slides)
    out = tmp_path_factory.mktemp("qc_results")
    result = invoke("score", slides, "--model", w.base, "--features", w.features, "--out", out, "--device", "cpu",
                    "--outputs", "csv", "--quiet")
    assert result.exit_code == 0, result.output
    evaluation = tmp_path_factory.mktemp("qc_eval")
    result = invoke("evaluate", w.b / "labels.csv", "--model", w.base, "--features", w.features, "--out", evaluation,
                    "--quiet")
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv", dtype={"slide_id": str}, keep_default_na=False).set_index("slide_id")
    pred = pd.read_csv(evaluation / "predictions.csv", dtype={"slide_id": str}, keep_default_na=False)
    return scores, pred, out


@pytest.mark.slow
def test_slides_like_training_are_rarely_flagged(scored):
    _, pred, _ = scored
    assert len(pred) == 10
    assert (pred["qc"] != "").sum() <= 1, pred[["slide_id", "qc"]]


@pytest.mark.slow
def test_over_stained_and_near_empty_slides_are_flagged(scored):
    """Stain normalisation (the default) makes the over-stained slide look usual to the encoder;
    its stain estimate still says how far it is from training."""
    scores, _, _ = scored
    assert "stain-out-of-range" in qc.flag_names(scores.loc["DARK", "qc"])
    assert "low-tissue" in qc.flag_names(scores.loc["EMPTY", "qc"])
    assert (scores["status"] == "ok").all()


@pytest.mark.slow
def test_viewer_shows_the_flags_and_the_model_card(scored):
    from starlette.testclient import TestClient

    from weakstil.viewer.app import create_app

    scores, _, out = scored
    with TestClient(create_app({"results_dir": out, "check_assets": False}), base_url="http://127.0.0.1") as client:
        rows = {r["slide_id"]: r for r in client.get("/api/cohort").json()["slides"]}
        assert rows["DARK"]["qc"] == scores.loc["DARK", "qc"] and rows["DARK"]["qc"]
        card = client.get("/api/model-card").json()
        assert card["card"]["name"] == "base" and card["markdown"].startswith("# Model card: base")
        assert "model-card" in client.get("/").text


def test_check_slide_reads_the_measurements_from_the_last_columns():
    class _Model:
        members = (object(),)  # one member: no disagreement check

    ref = _reference()
    features = np.tile(np.asarray(ref["mean"]), (50, 1))  # the measurements are the last of the 16 columns
    features[:, -2:] = [0.2, 0.5]
    assert qc.check_slide(ref, _Model(), features, mpp=0.25) == ""
    features[:, -2] = 0.6  # the lymphocyte share of the stroma far beyond training: the model extrapolates
    assert qc.flag_names(qc.check_slide(ref, _Model(), features, mpp=0.25)) == ["measurement-out-of-range"]


def test_the_checked_measurements_are_the_stroma_readings_and_the_stroma_estimate():
    from weakstil.embed.encoders import MORPH_ARCH
    from weakstil.embed.morph import NAMES
    from weakstil.mil.qc_reference import measured_columns

    columns = measured_columns({"arch": f"resnet18+{MORPH_ARCH}"})
    assert columns == {"lymph_per_stroma_sized": -5, "lymph_per_stroma": -4, "lymph_per_stroma_loose": -3,
                       "stroma_est": -1}
    assert all(NAMES[offset] == name for name, offset in columns.items())
    assert "lymph_per_nest" not in columns  # a confounder, narrow on standard cohorts: not a reason to look
    assert measured_columns({"arch": "resnet18"}) == {} and measured_columns(None) == {}  # no morphometry
    assert _reference()["training"]["measured_columns"] == MEASURED


def test_a_slide_with_little_stroma_is_flagged_whatever_the_training_range():
    """sTIL% is a share of the stroma: a slide whose tiles hold under 0.125 mm² of estimated stroma
    (ten 112-µm tiles' worth) is flagged, from the tiles' stroma estimate and the model's tiling."""
    class _Model:
        members = (object(),)
        fingerprint = {"tiling": {"tile_px": 224, "mpp": 0.5, "overlap": 0}}

    ref = _reference()
    features = np.tile(np.asarray(ref["mean"]), (50, 1))
    features[:, -2:] = [0.2, 0.5]  # 50 tiles half stroma: 25 tiles' worth, 0.31 mm²
    assert qc.check_slide(ref, _Model(), features, mpp=0.25) == ""
    assert qc_reference.stroma_area_mm2(features[:, -1], _Model.fingerprint["tiling"]) == pytest.approx(25 * 0.112 ** 2)
    features[:, -1] = 0.1  # 5 tiles' worth of stroma, inside the (widened) training range of the mean
    text = qc.check_slide(ref, _Model(), features, mpp=0.25)
    assert qc.flag_names(text) == ["little-stroma"] and "0.063 mm²" in text
    assert qc.slide_flags(ref, n_tiles=50, stroma_mm2=None) == []  # no morphometry, no tiling: not checked

    class _NoTiling(_Model):
        fingerprint = {}

    assert qc.check_slide(ref, _NoTiling(), features, mpp=0.25) == ""


def test_little_stroma_reads_the_estimate_tiles_csv_shows():
    """With the encoder in the model's fingerprint, the floor is checked on the stroma estimate that
    tiles.csv and top_tiles.png show (the wide nest rule's, where the features have it), not on the
    reference's column: tumour sheets the pale rule reads as stroma do not hide a slide with little."""
    from weakstil.embed.encoders import MEASURED_DIM, MORPH_ARCH, get_encoder_spec, stroma_estimate

    arch = get_encoder_spec("resnet18-random+stainmorph").arch
    assert arch.endswith(MORPH_ARCH)

    class _Model:
        members = (object(),)
        fingerprint = {"encoder": {"arch": arch}, "tiling": {"tile_px": 224, "mpp": 0.5, "overlap": 0}}

    ref = _reference()
    features = np.tile(np.asarray(ref["mean"]), (50, 1))
    features[:, -2:] = [0.2, 0.5]  # the pale rule: half of every tile is stroma (0.31 mm²)
    features[:, -1 - MEASURED_DIM] = 0.1  # the wide rule: a tenth (0.063 mm²)
    assert np.allclose(stroma_estimate(features, _Model.fingerprint["encoder"]), 0.1)
    text = qc.check_slide(ref, _Model(), features, mpp=0.25)
    assert qc.flag_names(text) == ["little-stroma"] and "0.063 mm²" in text
    features[:, -1 - MEASURED_DIM] = 0.5
    assert qc.check_slide(ref, _Model(), features, mpp=0.25) == ""
