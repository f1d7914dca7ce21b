"""The full fingerprint decides whether a slide is done (issue 12): a changed --roi, --mpp,
--force-mpp, --mpp-csv, --min-tissue or encoder weights never serves the old tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_MPP, TINY_SIZE, write_tiny_slide
from weakstil.fingerprint import (
    fingerprint_hash,
    identity,
    slide_differences,
    slide_request,
)


@pytest.fixture(scope="module")
def encoder():
    from weakstil.embed.encoders import create_encoder

    return create_encoder("resnet18-random")


def _extract(paths, features, encoder, *, roi_dir=None, min_tissue=0.5, **open_kwargs):
    from weakstil.embed.extract import ExtractOptions, slide_sources
    from weakstil.runs.batch import extract_slides
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    return extract_slides(slide_sources(paths, **open_kwargs), features, encoder=encoder,
                          spec=TileSpec(min_tissue=min_tissue), tissue=TissueParams(),
                          opts=ExtractOptions(progress=False), roi_dir=roi_dir, qc=False)


def _statuses(result):
    return [(o.status, o.reason) for o in result.outcomes]


def _write_roi(folder, slide_id, right_l0):
    folder.mkdir(exist_ok=True)
    w, h = right_l0, TINY_SIZE[1]
    geometry = {"type": "Polygon", "coordinates": [[[0, 0], [w, 0], [w, h], [0, h], [0, 0]]]}
    doc = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": geometry, "properties": {}}]}
    (folder / f"{slide_id}.geojson").write_text(json.dumps(doc))
    return folder


@pytest.fixture
def slide(tmp_path):
    (tmp_path / "slides").mkdir()
    return write_tiny_slide(tmp_path / "slides" / "S1.tif")


def test_a_changed_roi_recomputes_and_the_tiles_lie_inside_it(slide, tmp_path, encoder, caplog):
    features = tmp_path / "features"
    whole = _extract([slide], features, encoder)
    assert _statuses(whole) == [("done", "")]
    n_whole = whole.cache.read("S1").n_tiles
    half = TINY_SIZE[0] // 2
    roi_dir = _write_roi(tmp_path / "roi", "S1", half)
    with caplog.at_level("WARNING", logger="weakstil.embed.extract"):
        again = _extract([slide], features, encoder, roi_dir=roi_dir)
    assert _statuses(again) == [("done", "")]  # not "skipped": the old tiles covered all tissue
    assert sum("extracting again" in r.getMessage() for r in caplog.records) == 1  # said once, not twice
    cached = again.cache.read("S1")
    size = cached.attrs["tile_size_l0"]
    centres_x = cached.coords_l0[:, 0] + size / 2
    assert 0 < cached.n_tiles < n_whole and (centres_x <= half).all()
    assert _statuses(_extract([slide], features, encoder, roi_dir=roi_dir)) == [("skipped", "already_done")]
    _write_roi(roi_dir, "S1", half + 100)  # the same file name, other content
    assert _statuses(_extract([slide], features, encoder, roi_dir=roi_dir)) == [("done", "")]


def test_force_mpp_recomputes_with_tiles_spaced_for_the_new_mpp(slide, tmp_path, encoder):
    features = tmp_path / "features"
    first = _extract([slide], features, encoder)
    assert first.cache.read("S1").attrs["tile_size_l0"] == pytest.approx(224 * 0.5 / TINY_MPP)
    forced = _extract([slide], features, encoder, mpp=0.3, mpp_override=True)
    assert _statuses(forced) == [("done", "")]
    cached = forced.cache.read("S1")
    size = cached.attrs["tile_size_l0"]
    assert size == pytest.approx(224 * 0.5 / 0.3)  # 373 level-0 px
    steps = np.diff(np.unique(cached.coords_l0[:, 0]))
    assert steps.size and np.allclose(steps % size, 0, atol=1.0) | np.allclose(steps % size, size, atol=1.0)
    assert np.isclose(steps.min(), size, atol=1.0)
    assert cached.attrs["slide_mpp"] == pytest.approx(0.3)
    # and back to the slide's own mpp: recomputed again
    assert _statuses(_extract([slide], features, encoder)) == [("done", "")]


def test_an_mpp_csv_value_recomputes(slide, tmp_path, encoder):
    features = tmp_path / "features"
    _extract([slide], features, encoder)
    assert _statuses(_extract([slide], features, encoder, mpp_by_slide={"S1": TINY_MPP})) == [
        ("skipped", "already_done")]  # the same mpp as the slide states: the same tiles
    by_csv = _extract([slide], features, encoder, mpp_by_slide={"S1": 0.3})
    assert _statuses(by_csv) == [("done", "")]
    assert by_csv.cache.read("S1").attrs["slide_mpp"] == pytest.approx(0.3)


def test_a_changed_mpp_for_a_slide_without_one_recomputes(tmp_path, encoder):
    (tmp_path / "slides").mkdir()
    bare = write_tiny_slide(tmp_path / "slides" / "B1.tif", mpp=None)
    features = tmp_path / "features"
    assert _statuses(_extract([bare], features, encoder, mpp=0.25)) == [("done", "")]
    assert _statuses(_extract([bare], features, encoder, mpp=0.25)) == [("skipped", "already_done")]
    assert _statuses(_extract([bare], features, encoder, mpp=0.3)) == [("done", "")]


def test_mpp_without_force_does_not_recompute_a_slide_that_states_its_own(slide, tmp_path, encoder):
    features = tmp_path / "features"
    _extract([slide], features, encoder)
    assert _statuses(_extract([slide], features, encoder, mpp=0.3)) == [("skipped", "already_done")]


def test_a_changed_min_tissue_goes_to_its_own_store(slide, tmp_path, encoder):
    features = tmp_path / "features"
    first = _extract([slide], features, encoder)
    other = _extract([slide], features, encoder, min_tissue=0.9)
    assert _statuses(other) == [("done", "")] and other.cache.path != first.cache.path
    assert other.cache.read("S1").n_tiles <= first.cache.read("S1").n_tiles


def test_other_encoder_weights_go_to_their_own_store(tmp_path, encoder):
    from weakstil.embed.cache import FeatureCache, store_name
    from weakstil.wsi.tiling import TileSpec
    from weakstil.wsi.tissue import TissueParams

    tiling = TileSpec().fingerprint(TissueParams())
    a = dict(encoder.fingerprint(), weights="file:/a.pt", weights_sha256="1" * 64)
    b = dict(a, weights_sha256="2" * 64)
    moved = dict(a, weights="file:/elsewhere/a.pt")  # the same checkpoint moved: the same features
    assert store_name(a, tiling) != store_name(b, tiling)
    assert store_name(a, tiling) == store_name(moved, tiling)
    FeatureCache.open(tmp_path, a, tiling)
    assert FeatureCache.open(tmp_path, b, tiling).path != FeatureCache.open(tmp_path, a, tiling).path


def test_an_old_cache_without_the_slide_part_is_unknown_not_different():
    old = {"slide_mpp": 0.5, "mpp_source": "openslide.mpp"}  # no roi_sha256: made before it was recorded
    no_overrides = slide_request(roi=None, open_kwargs={"mpp": None, "mpp_override": False})

    def never():
        raise AssertionError("the slide needs no opening to decide")

    assert slide_differences(old, no_overrides, resolve_mpp=never) == []
    with_roi = dict(no_overrides, roi_sha256="ab" * 32)
    assert [line.split(":")[0] for line in slide_differences(old, with_roi, resolve_mpp=never)] == ["roi"]
    assert "unknown" in slide_differences(old, with_roi, resolve_mpp=never)[0]
    unknown_mpp = {"roi_sha256": None}
    forced = slide_request(roi=None, open_kwargs={"mpp": 0.3, "mpp_override": True})
    assert slide_differences(unknown_mpp, forced, resolve_mpp=never)[0].startswith("mpp: unknown")


def test_the_hash_is_canonical():
    assert fingerprint_hash({"b": 1.0, "a": [1, 2]}) == fingerprint_hash({"a": (1, 2), "b": 1})
    assert identity({"weights": "file:/x", "weights_sha256": "f"}, {})["encoder"] == {"weights_sha256": "f"}
