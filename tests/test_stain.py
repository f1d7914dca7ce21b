"""Per-slide Macenko stain normalisation (weakstil.embed.stain) and its place in the cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weakstil.embed.stain import REF_HE, REF_MAX_C, IO, estimate_stain, normalize_tiles
from weakstil.errors import ConfigError
from weakstil.wsi.tiling import TileSpec
from weakstil.wsi.tissue import TissueParams


def unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def render(conc: np.ndarray, he: np.ndarray) -> np.ndarray:
    """uint8 RGB of (…, 2) H/E concentrations with stain vectors ``he`` (3, 2)."""
    return np.clip(IO * np.exp(-(conc @ unit(he).T)), 0, 255).round().astype(np.uint8)


PALETTE_A = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])  # Ruifrok-like
PALETTE_B = np.array([[0.45, 0.15], [0.80, 0.90], [0.40, 0.40]])  # bluer H, greyer E


def concentrations(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.gamma(2.0, 0.4, (n, 2))


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(unit(u[:, None])[:, 0] @ unit(v[:, None])[:, 0], -1, 1))))


def test_estimate_recovers_the_stain_vectors_hematoxylin_first():
    est = estimate_stain(render(concentrations(40_000), PALETTE_A))
    assert est is not None and est.he.shape == (3, 2) and est.max_c.shape == (2,)
    assert angle_deg(est.he[:, 0], PALETTE_A[:, 0]) < 8  # H first
    assert angle_deg(est.he[:, 1], PALETTE_A[:, 1]) < 8
    assert np.all(est.he > 0)


def test_blank_or_empty_pixels_give_no_estimate():
    assert estimate_stain(np.full((10_000, 3), 250, np.uint8)) is None
    assert estimate_stain(np.zeros((0, 3), np.uint8)) is None


def test_normalised_tiles_carry_the_reference_stains():
    rgb = render(concentrations(4 * 64 * 64), PALETTE_B).reshape(4, 64, 64, 3)
    out = normalize_tiles(torch.from_numpy(rgb), estimate_stain(rgb))
    assert out.dtype == torch.uint8 and out.shape == rgb.shape
    again = estimate_stain(out.numpy())
    for k in range(2):
        assert angle_deg(again.he[:, k], REF_HE[:, k]) < 5
    np.testing.assert_allclose(again.max_c, REF_MAX_C, rtol=0.15)


def test_two_palettes_of_the_same_tissue_meet_after_normalisation():
    """The same concentrations rendered with two stain palettes and two stain amounts: far apart
    as they are, close after each is normalised with its own estimate."""
    conc = concentrations(4 * 64 * 64, seed=1)
    a = render(conc, PALETTE_A).reshape(4, 64, 64, 3)
    b = render(conc * np.array([1.4, 0.7]), PALETTE_B).reshape(4, 64, 64, 3)
    na = normalize_tiles(torch.from_numpy(a), estimate_stain(a)).numpy().astype(float)
    nb = normalize_tiles(torch.from_numpy(b), estimate_stain(b)).numpy().astype(float)
    before = np.abs(a.astype(float) - b).mean()
    after = np.abs(na - nb).mean()
    assert before > 15 and after < before / 3, (before, after)


def test_the_stain_setting_is_part_of_the_tiling_key_only_when_on():
    tissue = TissueParams()
    assert "stain" not in TileSpec(stain="none").fingerprint(tissue)  # caches made before the option keep their key
    assert TileSpec().stain == "macenko"  # the default
    assert TileSpec(stain="macenko").fingerprint(tissue)["stain"] == "macenko"
    with pytest.raises(ConfigError, match="stain"):
        TileSpec(stain="reinhard-ish")


def test_a_model_fingerprint_gives_the_stain_setting_back():
    from weakstil.outputs.score import tiling_from_fingerprint

    tissue = TissueParams()
    for stain in ("none", "macenko"):
        spec, _ = tiling_from_fingerprint(TileSpec(stain=stain).fingerprint(tissue))
        assert spec.stain == stain


def test_extract_with_macenko_records_the_estimate_and_keeps_its_own_cache(tmp_path, tiny_slide):
    from weakstil.embed.encoders import create_encoder
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides

    encoder = create_encoder("resnet18-random")
    caches = {}
    for stain in ("none", "macenko"):
        result = extract_slides(slide_sources([tiny_slide]), tmp_path / "features", encoder=encoder,
                                spec=TileSpec(stain=stain), tissue=TissueParams(),
                                opts=ExtractOptions(device="cpu", progress=False), qc=False)
        assert [o.status for o in result.outcomes] == ["done"], result.outcomes
        caches[stain] = result.cache
    assert caches["none"].path != caches["macenko"].path  # side by side, never mixed
    plain = caches["none"].read(tiny_slide.stem)
    normed = caches["macenko"].read(tiny_slide.stem)
    assert "stain" not in plain.attrs
    info = normed.attrs["stain"]
    assert info["method"] == "macenko" and np.array(info["he"]).shape == (3, 2) and info["n_pixels"] > 500
    np.testing.assert_array_equal(plain.coords_l0, normed.coords_l0)  # the same tiles …
    assert not np.allclose(plain.features, normed.features)  # … shown in other colours


def test_extract_refuses_an_unknown_stain_method_before_any_slide(tmp_path, tiny_slide):
    from typer.testing import CliRunner

    from weakstil.cli import app

    result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(
        app, ["extract", str(tiny_slide), "--features", str(tmp_path / "f"), "--stain-norm", "vahadane"])
    assert result.exit_code == 2, result.output
    assert "stain must be 'none' or 'macenko'" in result.output and "--stain-norm" in result.output
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").rglob("zarr.json"))


def test_two_caches_told_apart_by_their_stain_setting(tmp_path):
    """Upgrading users end with a cache as scanned and a normalised one side by side: the
    ambiguity error names which is which."""
    from weakstil.embed.cache import FeatureCache
    from weakstil.embed.encoders import create_encoder
    from weakstil.errors import AmbiguousCacheError

    fp = create_encoder("resnet18-random").fingerprint()
    for stain in ("none", "macenko"):
        FeatureCache.open(tmp_path, fp, TileSpec(stain=stain).fingerprint(TissueParams()))
    with pytest.raises(AmbiguousCacheError) as info:
        FeatureCache.find(tmp_path)
    assert "stain=none" in str(info.value) and "stain=macenko" in str(info.value)


def test_pen_ink_is_left_out_of_the_estimate_and_a_fold_is_bounded():
    """A dark stroke (ink: far darker than any nucleus) over a fifth of the tiles must not move the
    estimate; a fold (tissue lying double: both stains × 1.9) over a tenth moves it less than it
    moves the plain estimate. The plain estimate on the same pixels does move (the test can fail)."""
    from weakstil.embed.stain import artefact_free_pixels

    conc = 0.5 * concentrations(40 * 32 * 32, seed=3).reshape(40, 32, 32, 2)  # nuclei up to OD ~3
    clean = render(conc, PALETTE_A)
    want = estimate_stain(artefact_free_pixels(clean))
    inked = clean.copy()
    inked[:8, 8:20] = (25, 28, 30)  # a black pen stroke across 8 tiles
    got, plain = estimate_stain(artefact_free_pixels(inked)), estimate_stain(inked.reshape(-1, 3))
    np.testing.assert_allclose(got.max_c, want.max_c, rtol=0.05)
    assert max(angle_deg(got.he[:, k], want.he[:, k]) for k in range(2)) < 2
    assert max(angle_deg(plain.he[:, k], want.he[:, k]) for k in range(2)) > 5  # the ink pulls the plain one
    folded = clean.copy()
    folded[8:12] = render(conc[8:12] * 1.9, PALETTE_A)
    got, plain = estimate_stain(artefact_free_pixels(folded)), estimate_stain(folded.reshape(-1, 3))
    assert np.all(np.abs(got.max_c / want.max_c - 1) < np.abs(plain.max_c / want.max_c - 1))
    # a slide without artefacts keeps (nearly) every stained pixel: its estimate is the plain one
    stained = ((-np.log((clean.reshape(-1, 3).astype(float) + 1) / IO)) > 0.15).all(1).sum()
    assert len(artefact_free_pixels(clean)) > 0.99 * stained


def test_green_ink_no_darker_than_nuclei_is_left_out_by_its_hue():
    """A green marker stroke is not darker than nuclei, so the darkness rule keeps it; over a few per
    cent of the pixels it tilts the plain estimate's hematoxylin toward the ink. Its hue (green, no
    H&E stain) leaves it out, with its blurred edge."""
    from scipy import ndimage

    from weakstil.embed.stain import artefact_free_pixels

    conc = 0.5 * concentrations(40 * 32 * 32, seed=5).reshape(40, 32, 32, 2)
    clean = render(conc, PALETTE_A)
    want = estimate_stain(artefact_free_pixels(clean))
    ink = np.zeros((40, 32, 32))
    ink[:10, 10:16] = 1.0  # a stroke 6 px wide across 10 tiles (a few per cent of the pixels)
    ink = ndimage.gaussian_filter(ink, (0, 1.0, 1.0))  # blurred edge: ink mixed with tissue
    od = conc @ unit(PALETTE_A).T + ink[..., None] * 1.2 * unit(np.array([[0.85], [0.25], [0.65]]))[:, 0]
    inked = np.clip(IO * np.exp(-od), 0, 255).round().astype(np.uint8)
    darkness_only = estimate_stain(inked[(-np.log((inked.astype(float) + 1) / IO)).sum(-1) < 9])
    got = estimate_stain(artefact_free_pixels(inked))
    assert angle_deg(darkness_only.he[:, 0], want.he[:, 0]) > 5  # the ink pulls an estimate that keeps it
    assert max(angle_deg(got.he[:, k], want.he[:, k]) for k in range(2)) < 2
    np.testing.assert_allclose(got.max_c, want.max_c, rtol=0.05)


def test_the_stain_estimate_version_is_part_of_the_tiling_key():
    from weakstil.wsi.tiling import STAIN_VERSION

    assert TileSpec(stain="macenko").fingerprint(TissueParams())["stain_version"] == STAIN_VERSION >= 3
    assert "stain_version" not in TileSpec(stain="none").fingerprint(TissueParams())


def test_an_estimate_comes_back_from_the_attrs_it_wrote():
    """The cache keeps each slide's estimate (``as_attrs``); ``from_attrs`` reads it back to render
    the tiles as extraction did, and says None for a slide whose tiles were not normalised."""
    from weakstil.embed.stain import REF_HE, StainEstimate

    estimate = StainEstimate(REF_HE / np.linalg.norm(REF_HE, axis=0), np.array([1.5, 0.9]), 12345)
    back = StainEstimate.from_attrs(estimate.as_attrs())
    assert np.allclose(back.he, estimate.he, atol=1e-5) and np.allclose(back.max_c, estimate.max_c)
    assert back.n_pixels == 12345
    assert StainEstimate.from_attrs({"method": "macenko", "skipped": "too few stained pixels"}) is None
    assert StainEstimate.from_attrs(None) is None
