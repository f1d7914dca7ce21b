"""`weakstil view`: the web app's API, Deep Zoom tiles, heatmap overlays and safety (no browser here;
tests/test_viewer_browser.py drives it in headless Chromium).

The results folder is realistic: synthetic slides (weakstil.synth.lattice) tiled like `weakstil extract`,
tile predictions from the slides' ground truth plus noise, and the review files written by
``weakstil.outputs.heatmap.write_slide_outputs`` exactly as `weakstil score` writes them.
"""

from __future__ import annotations

import csv
import http.client
import io
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakstil.errors import ConfigError, WeakstilError
from weakstil.outputs.colors import colormap_lut, layer_scale, stil_rgb
from weakstil.outputs.heatmap import write_slide_outputs
from weakstil.viewer import ViewerConfig, check_bind, create_app, running_server, serve
from weakstil.viewer.app import OSD_DIR
from weakstil.viewer.deepzoom import DeepZoomGeometry
from weakstil.wsi.slide import open_slide

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

BASE = "http://127.0.0.1"
# slide id -> (synth seed, target sTIL%, mpp, size in µm, label)
SLIDES = {
    "case-a": (3, 45.0, 0.5, (1600.0, 1200.0), 42.0),
    "case-b": (5, 8.0, 0.25, (960.0, 720.0), 11.5),
    "case-c": (7, 25.0, 0.5, (800.0, 640.0), 20.0),  # scored as failed: no review files
}


def build_results(root: Path) -> dict:
    """``root/slides/*.svs`` and ``root/results/`` (scores.csv with a label column, per-slide files).

    Returns {"root", "slides", "results", "tiles": {slide id: dict of arrays}}.
    """
    from weakstil.synth import lattice as synth
    from weakstil.wsi.tiling import TileSpec, plan_tiles

    slides, results = root / "slides", root / "results"
    slides.mkdir(parents=True)
    results.mkdir()
    rows, tiles = [], {}
    for i, (sid, (seed, target, mpp, size_um, label)) in enumerate(SLIDES.items()):
        truth_path = root / f"{sid}.npz"
        synth.write_slide(slides / f"{sid}.svs", synth.SlideParams(seed=seed, stil_target=target, size_um=size_um),
                          mpp, truth_path=truth_path)
        if sid == "case-c":
            rows.append({"slide_id": sid, "score": "", "n_tiles": "", "status": "failed",
                         "error": "NoTissueError: no tile passed the tissue filter", "label": label})
            continue
        with open_slide(slides / f"{sid}.svs") as slide:
            grid = plan_tiles(slide, TileSpec(tile_px=112))
            coords, size = np.asarray(grid.coords_l0, np.int64), float(grid.size_l0)
            truth = synth.tile_truth(truth_path, coords, size, slide.mpp)
            rng = np.random.default_rng(i)
            pred = np.where(np.isfinite(truth["stil"]), truth["stil"], 2.0) + rng.normal(0, 4, len(coords))
            pred = np.clip(pred, 0, 100)
            logits = 3 * truth["stroma_fraction"] + rng.normal(0, 0.3, len(coords))
            attention = np.exp(logits) / np.exp(logits).sum()
            contribution = attention * pred
            score = float(contribution.sum())
            write_slide_outputs(slide, results / "slides" / sid, coords_l0=coords, size_l0=size, prediction=pred,
                                attention=attention, contribution=contribution, score=score)
        tiles[sid] = {"coords": coords, "size": size, "prediction": pred, "attention": attention,
                      "contribution": contribution, "score": score}
        rows.append({"slide_id": sid, "score": f"{score:.4f}", "n_tiles": len(coords), "status": "ok",
                     "error": "", "label": label})
    with (results / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "score", "n_tiles", "status", "error", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return {"root": root, "slides": slides, "results": results, "tiles": tiles}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    return build_results(tmp_path_factory.mktemp("viewer"))


def make_client(results, **options) -> TestClient:
    options.setdefault("check_assets", False)
    app = create_app(ViewerConfig(results_dir=results, **options))
    return TestClient(app, base_url=BASE)


@pytest.fixture(scope="module")
def client(cohort):
    with make_client(cohort["results"], slides_dir=cohort["slides"]) as c:
        yield c


def png(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)))


def centre(xy, size):
    return int(xy[0] + size / 2), int(xy[1] + size / 2)


# --- pages and the cohort -------------------------------------------------------------------------
def test_pages_and_cohort(client, cohort):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/cohort.js" in page.text
    data = client.get("/api/cohort").json()
    assert data["has_label"] is True
    by_id = {r["slide_id"]: r for r in data["slides"]}
    assert list(by_id) == list(SLIDES)
    for sid, info in cohort["tiles"].items():
        row = by_id[sid]
        assert row["status"] == "ok" and row["n_tiles"] == len(info["coords"])
        assert row["score"] == pytest.approx(info["score"], abs=1e-3)
        assert row["label"] == SLIDES[sid][4]
        assert row["has_slide"] and row["has_tiles"]
        assert client.get(row["thumbnail"]).headers["content-type"] == "image/jpeg"
        heat = Image.open(io.BytesIO(client.get(row["heatmap_thumbnail"]).content))
        assert max(heat.size) == 320
    failed = by_id["case-c"]
    assert failed["status"] == "failed" and "NoTissueError" in failed["error"] and failed["score"] is None
    assert failed["heatmap_thumbnail"] is None and failed["thumbnail"]
    assert client.get("/slides/case-a").status_code == 200
    assert client.get("/slides/case-c").status_code == 200
    assert client.get("/favicon.ico").status_code == 200
    assert client.head("/api/cohort").status_code == 200


def test_label_column_is_optional(tmp_path, cohort):
    results = tmp_path / "results"
    results.mkdir()
    lines = (cohort["results"] / "scores.csv").read_text().splitlines()
    results.joinpath("scores.csv").write_text(
        "\n".join(",".join(line.split(",")[:5]) for line in lines) + "\n")
    with make_client(results, slides_dir=cohort["slides"]) as c:
        data = c.get("/api/cohort").json()
    assert data["has_label"] is False
    assert all(r["label"] is None for r in data["slides"])


def _scores_without_labels(cohort, results: Path) -> None:
    results.mkdir(parents=True)
    lines = (cohort["results"] / "scores.csv").read_text().splitlines()
    results.joinpath("scores.csv").write_text("\n".join(",".join(line.split(",")[:5]) for line in lines) + "\n")


def test_labels_csv_beside_the_results_fills_the_label_column_and_the_evaluation(tmp_path, cohort):
    _scores_without_labels(cohort, tmp_path / "results")
    rows = [f"{sid},P{i},{label}" for i, (sid, (*_, label)) in enumerate(SLIDES.items())]
    (tmp_path / "labels.csv").write_text("slide_id,patient_id,stil\n" + "\n".join(rows) + "\n")
    with make_client(tmp_path / "results", slides_dir=cohort["slides"]) as c:
        data = c.get("/api/cohort").json()
    assert data["has_label"] is True and data["labels_file"] == str(tmp_path / "labels.csv")
    by_id = {r["slide_id"]: r for r in data["slides"]}
    for sid, info in cohort["tiles"].items():
        assert by_id[sid]["label"] == SLIDES[sid][4]
        assert by_id[sid]["error_vs_label"] == pytest.approx(by_id[sid]["score"] - SLIDES[sid][4])
    assert by_id["case-c"]["error_vs_label"] is None  # failed: no score
    ev = data["evaluation"]
    scores = [by_id[s]["score"] for s in cohort["tiles"]]
    labels = [SLIDES[s][4] for s in cohort["tiles"]]
    assert ev["n"] == 2 and ev["mae"] == pytest.approx(np.mean(np.abs(np.subtract(scores, labels))))


def test_view_labels_option_is_validated_before_serving(tmp_path, cohort):
    from weakstil.errors import LabelsError

    _scores_without_labels(cohort, tmp_path / "results")
    bad = tmp_path / "elsewhere.csv"
    bad.write_text("slide,score\ncase-a,40\n")
    with pytest.raises(LabelsError):
        make_client(tmp_path / "results", labels=bad)
    (tmp_path / "labels.csv").write_text("slide,score\ncase-a,40\n")  # a broken file found by itself: ignored
    with make_client(tmp_path / "results") as c:
        data = c.get("/api/cohort").json()
    assert data["has_label"] is False and data["evaluation"] is None


def test_scores_csv_is_reread_when_it_changes(tmp_path, cohort):
    import os
    import shutil

    results = tmp_path / "results"
    shutil.copytree(cohort["results"], results)
    with make_client(results, slides_dir=cohort["slides"]) as c:
        assert len(c.get("/api/cohort").json()["slides"]) == 3
        text = (results / "scores.csv").read_text().replace("case-b,", "case-b-renamed,")
        (results / "scores.csv").write_text(text)
        os.utime(results / "scores.csv", ns=(1, 1))
        ids = [r["slide_id"] for r in c.get("/api/cohort").json()["slides"]]
    # case-b's folder is still there, so it is listed once more (as not in scores.csv)
    assert ids == ["case-a", "case-b-renamed", "case-c", "case-b"]


# --- the slide: info, Deep Zoom ---------------------------------------------------------------------
def test_slide_info_and_layers(client, cohort):
    info = client.get("/api/slides/case-a").json()
    with open_slide(cohort["slides"] / "case-a.svs") as slide:
        assert (info["image"]["width"], info["image"]["height"]) == slide.dimensions
        assert info["image"]["mpp"] == pytest.approx(slide.mpp)
    layers = {entry["layer"]: entry for entry in info["layers"]}
    assert list(layers) == ["prediction", "attention", "contribution"]
    pred = layers["prediction"]
    assert (pred["vmin"], pred["vmax"], pred["cmap"], pred["fixed"]) == (0.0, 100.0, "viridis", True)
    lut = colormap_lut("viridis")
    assert pred["colors"][0] == "#%02x%02x%02x" % tuple(lut[0])
    assert pred["colors"][-1] == "#%02x%02x%02x" % tuple(lut[255])
    # attention and contribution: the fixed scales of heatmap.png (× N, log), not stretched per slide
    att = layers["attention"]
    assert (att["vmin"], att["vmax"], att["cmap"], att["log"], att["fixed"]) == (1 / 16, 16.0, "RdYlBu_r", True, True)
    assert {"at": 50.0, "label": "1×"} in att["ticks"]
    assert [t["at"] for t in att["ticks"]] == sorted(t["at"] for t in att["ticks"])
    assert (att["ticks"][0]["at"], att["ticks"][-1]["at"]) == (0.0, 100.0)
    assert layers["contribution"]["ticks"][-1] == {"at": 100.0, "label": "1000"}
    assert set(info["files"]) == {"heatmap.png", "top_tiles.png", "tiles.csv", "tiles.geojson", "heatmap.tif"}
    for url in info["files"].values():
        assert client.get(url).status_code == 200
    failed = client.get("/api/slides/case-c").json()
    assert failed["layers"] == [] and failed["files"] == {} and "image" in failed


def test_tiles_json_matches_tiles_csv(client, cohort):
    data = client.get("/api/slides/case-b/tiles.json").json()
    truth = cohort["tiles"]["case-b"]
    assert data["x"] == truth["coords"][:, 0].tolist() and data["y"] == truth["coords"][:, 1].tolist()
    assert set(data["width"]) == {round(truth["size"])}
    np.testing.assert_allclose(data["prediction"], truth["prediction"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(data["attention"], truth["attention"], rtol=1e-5)
    np.testing.assert_allclose(data["contribution"], truth["contribution"], rtol=1e-5, atol=1e-8)


def test_dzi_and_slide_tiles_match_the_slide(client, cohort):
    sid = "case-b"
    dzi = ET.fromstring(client.get(f"/api/slides/{sid}/slide.dzi").text)
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    size = dzi.find(f"{ns}Size")
    width, height = int(size.get("Width")), int(size.get("Height"))
    tile_size, overlap = int(dzi.get("TileSize")), int(dzi.get("Overlap"))
    geo = DeepZoomGeometry(width, height, tile_size, overlap)
    with open_slide(cohort["slides"] / f"{sid}.svs") as slide:
        assert (width, height) == slide.dimensions
        # full resolution: tile (1, 1) is level-0 pixels from (254 - 1, 254 - 1), with overlap on all sides
        full = geo.max_level
        got = np.asarray(Image.open(io.BytesIO(client.get(f"/api/slides/{sid}/slide_files/{full}/1_1.jpeg").content)))
        assert got.shape == (tile_size + 2, tile_size + 2, 3)
        want = slide.read_region((tile_size - 1, tile_size - 1), 0, (tile_size + 2, tile_size + 2))
        assert np.abs(got.astype(int) - want).mean() < 6  # JPEG re-encoding only
        # a coarse level: the whole slide in one tile, like the thumbnail
        level = full - 5  # ds 32
        lw, lh = geo.level_size(level)
        assert lw <= tile_size and lh <= tile_size
        whole = np.asarray(Image.open(io.BytesIO(client.get(f"/api/slides/{sid}/slide_files/{level}/0_0.jpeg").content)))
        assert whole.shape == (lh, lw, 3)
        thumb = np.asarray(Image.fromarray(slide.get_thumbnail(max(lw, lh))).resize((lw, lh)))
        assert np.abs(whole.astype(int) - thumb).mean() < 12
        # the last column's tile stops at the level's edge
        cols, rows = geo.tile_count(full)
        last = Image.open(io.BytesIO(client.get(f"/api/slides/{sid}/slide_files/{full}/{cols - 1}_0.jpeg").content))
        assert last.size[0] == width - ((cols - 1) * tile_size - overlap)
        for bad in (f"{full + 1}/0_0", f"{full}/{cols}_0", f"{full}/0_{rows}", "-1/0_0"):
            assert client.get(f"/api/slides/{sid}/slide_files/{bad}.jpeg").status_code == 404


def test_tiffslide_backend_serves_tiles(cohort):
    """NOTES: DeepZoomGenerator over TiffSlide fails; our tiler goes through SlideHandle and works."""
    with make_client(cohort["results"], slides_dir=cohort["slides"], backend="tiffslide") as c:
        info = c.get("/api/slides/case-a").json()
        assert info["image"]["backend"] == "tiffslide"
        level = DeepZoomGeometry(info["image"]["width"], info["image"]["height"]).max_level - 2
        response = c.get(f"/api/slides/case-a/slide_files/{level}/0_0.jpeg")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


def test_overlay_tiles_have_each_tiles_colour(client, cohort):
    sid = "case-a"
    truth = cohort["tiles"][sid]
    info = client.get(f"/api/slides/{sid}").json()
    geo = DeepZoomGeometry(info["image"]["width"], info["image"]["height"])
    ns = "{http://schemas.microsoft.com/deepzoom/2008}"
    dzi = ET.fromstring(client.get(f"/api/slides/{sid}/overlay/prediction.dzi").text)
    assert dzi.get("Format") == "png" and dzi.find(f"{ns}Size").get("Width") == str(geo.width)
    colours = stil_rgb(truth["prediction"])
    for level in (geo.max_level, geo.max_level - 3):
        ds = geo.downsample(level)
        for i in (0, len(truth["coords"]) // 2, len(truth["coords"]) - 1):
            cx, cy = centre(truth["coords"][i], truth["size"])
            x_lv, y_lv = cx // ds, cy // ds
            col, row = x_lv // geo.tile_size, y_lv // geo.tile_size
            x0, y0, _, _ = geo.tile_box(level, col, row)
            tile = png(client.get(f"/api/slides/{sid}/overlay/prediction_files/{level}/{col}_{row}.png"))
            assert tile.shape[2] == 4
            assert tuple(tile[y_lv - y0, x_lv - x0]) == (*colours[i], 255), (level, i)
    # far from any tile (the top-left corner of the slide is background): transparent
    tile = png(client.get(f"/api/slides/{sid}/overlay/prediction_files/{geo.max_level}/0_0.png"))
    assert tile[0, 0, 3] == 0
    # attention on its fixed scale (N × attention, log2, 1/16× … 16×): the colour heatmap.png gives it
    top = int(np.argmax(truth["attention"]))
    expected = layer_scale("attention").rgb(truth["attention"], len(truth["attention"]))[top]
    cx, cy = centre(truth["coords"][top], truth["size"])
    level = geo.max_level
    col, row = cx // geo.tile_size, cy // geo.tile_size
    x0, y0, _, _ = geo.tile_box(level, col, row)
    tile = png(client.get(f"/api/slides/{sid}/overlay/attention_files/{level}/{col}_{row}.png"))
    assert tuple(tile[cy - y0, cx - x0, :3]) == tuple(expected)
    assert client.get(f"/api/slides/{sid}/overlay/nonsense.dzi").status_code == 404
    assert client.get(f"/api/slides/{sid}/overlay/nonsense_files/{level}/0_0.png").status_code == 404
    assert client.get("/api/slides/case-c/overlay/prediction.dzi").status_code == 404


# --- without slide files -----------------------------------------------------------------------------
def test_results_without_slides(tmp_path, cohort):
    import shutil

    results = tmp_path / "elsewhere" / "results"
    shutil.copytree(cohort["results"], results)
    with make_client(results) as c:
        data = c.get("/api/cohort").json()
        assert data["slides_dir"] is None
        assert all(not r["has_slide"] and r["thumbnail"] is None for r in data["slides"])
        info = c.get("/api/slides/case-a").json()
        assert "image" not in info and "heatmap.png" in info["files"]
        assert c.get("/api/slides/case-a/slide.dzi").status_code == 404
        assert c.get("/api/slides/case-a/slide_files/5/0_0.jpeg").status_code == 404
        assert c.get("/api/slides/case-a/thumbnail.jpg").status_code == 404
        assert c.get("/slides/case-a").status_code == 200


def test_slides_beside_results_are_found(cohort):
    with make_client(cohort["results"]) as c:  # no slides_dir: results/../slides
        data = c.get("/api/cohort").json()
    assert Path(data["slides_dir"]) == cohort["slides"]
    assert all(r["has_slide"] for r in data["slides"])


def test_bad_folders_are_clear_errors(tmp_path, cohort):
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(ViewerConfig(results_dir=tmp_path / "nope", check_assets=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a results folder"):
        create_app(ViewerConfig(results_dir=tmp_path / "empty", check_assets=False))
    with pytest.raises(FileNotFoundError):
        create_app(ViewerConfig(results_dir=cohort["results"], slides_dir=tmp_path / "no-slides",
                                check_assets=False))
    with pytest.raises(ConfigError, match="unknown viewer option"):
        create_app({"results_dir": cohort["results"], "colour": "red"})


# --- safety --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_loopback_hosts_are_allowed(host):
    check_bind(host, allow_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.org", ""])
def test_other_hosts_are_refused_unless_allowed(host, cohort):
    with pytest.raises(ConfigError, match="refusing|bad host") as err:
        check_bind(host, allow_remote=False)
    assert isinstance(err.value, WeakstilError) and isinstance(err.value, ValueError)
    if host:
        assert "--allow-remote" in str(err.value)
        check_bind(host, allow_remote=True)
        with pytest.raises(ConfigError, match="refusing"):
            create_app(ViewerConfig(results_dir=cohort["results"], host=host, check_assets=False))
        with pytest.raises(ConfigError, match="refusing"):  # before binding anything
            serve(cohort["results"], host=host, port=1)


def test_allow_remote_builds_and_accepts_any_host(cohort):
    with make_client(cohort["results"], host="0.0.0.0", allow_remote=True) as c:
        assert c.get("/api/cohort", headers={"host": "viewer.lab.example:8000"}).status_code == 200


def test_missing_javascript_says_how_to_install_it(tmp_path, cohort):
    with pytest.raises(ConfigError) as err:
        create_app(ViewerConfig(results_dir=cohort["results"], osd_dir=tmp_path / "vendor" / "x"))
    assert "pip install" in str(err.value) and "npm" not in str(err.value).replace("npm registry", "")


def test_openseadragon_is_served_from_the_package(cohort):
    if not (OSD_DIR / "openseadragon.min.js").is_file():
        pytest.skip('OpenSeadragon not in the package: run `pip install -e ".[dev]"` again')
    with make_client(cohort["results"], check_assets=True) as c:
        js = c.get("/vendor/openseadragon/openseadragon.min.js")
        assert js.status_code == 200 and "OpenSeadragon" in js.text[:2000]
        assert c.get("/vendor/openseadragon/images/home_rest.png").status_code == 200
        page = c.get("/slides/case-a").text
    assert "/vendor/openseadragon/openseadragon.min.js" in page and "//cdn" not in page and "https://" not in page


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_no_write_methods(client, method):
    for path in ("/", "/api/cohort", "/api/slides/case-a", "/api/slides/case-a/files/tiles.csv"):
        response = client.request(method, path, content=b"x")
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == "GET, HEAD"


def test_foreign_host_header_is_refused(client):
    """DNS rebinding: a page from another site that resolves its name to 127.0.0.1."""
    assert client.get("/api/cohort", headers={"host": "attacker.example:8000"}).status_code == 400
    assert client.get("/api/cohort", headers={"host": "localhost:8000"}).status_code == 200
    assert client.get("/api/cohort", headers={"host": "[::1]:8000"}).status_code == 200


def test_security_headers(client):
    response = client.get("/")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_unknown_ids_and_file_names_are_404(client):
    for path in ("/slides/nope", "/api/slides/nope", "/api/slides/nope/tiles.json", "/api/slides/nope/slide.dzi",
                 "/api/slides/case-a/files/scores.csv", "/api/slides/case-a/files/config.yaml",
                 "/api/slides/case-c/files/tiles.csv", "/api/slides/case-c/tiles.json", "/static/nope.js",
                 "/api/slides/.hidden", "/api/slides/case-a/slide_files/x/0_0.jpeg"):
        assert client.get(path).status_code == 404, path


TRAVERSALS = [
    "/slides/..", "/slides/../scores.csv", "/slides/%2e%2e", "/slides/%2E%2E%2Fscores.csv",
    "/slides/..%2f..%2fetc%2fpasswd", "/slides/%252e%252e%252fscores.csv",
    "/api/slides/..%2fscores.csv", "/api/slides/%2e%2e/tiles.json", "/api/slides/../results/scores.csv",
    "/api/slides/case-a/files/..%2f..%2fscores.csv", "/api/slides/case-a/files/%2e%2e%2fcase-b%2ftiles.csv",
    "/api/slides/case-a/files/../../scores.csv", "/api/slides/case-a/files/%2Fetc%2Fpasswd",
    "/api/slides/%2Fetc%2Fpasswd", "/api/slides/%2Fetc/tiles.json", "/slides/%2Fetc%2Fpasswd",
    "//etc/passwd", "/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
    "/static//etc/passwd", "/static/%2Fetc%2Fpasswd", "/vendor/openseadragon/../../../package.json",
    "/vendor/openseadragon/%2e%2e/%2e%2e/%2e%2e/package.json", "/static/..\\app.py", "/static/%5c..%5capp.py",
    "/api/slides/case-a%00/tiles.json", "/etc/passwd", "/api/slides/C:%5cwindows",
]


def test_path_traversal_is_404_over_real_http(cohort):
    """Raw requests through uvicorn (a test client would normalise the paths before sending them)."""
    app = create_app(ViewerConfig(results_dir=cohort["results"], slides_dir=cohort["slides"], check_assets=False))
    with running_server(app) as url:
        host, port = url.removeprefix("http://").split(":")
        for path in TRAVERSALS:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == 404, (path, response.status, body[:200])
            assert b"slide_id" not in body and b"root:" not in body and b"import" not in body
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/api/slides/case-a/files/tiles.csv")
        assert conn.getresponse().status == 200  # the same server serves what it should


def test_deepzoom_geometry_matches_openseadragon():
    geo = DeepZoomGeometry(3000, 2000)
    assert geo.max_level == 12 and geo.level_size(12) == (3000, 2000) and geo.level_size(0) == (1, 1)
    assert geo.level_size(11) == (1500, 1000) and geo.level_size(1) == (2, 1)
    assert geo.tile_count(12) == (math.ceil(3000 / 254), math.ceil(2000 / 254))
    assert geo.tile_box(12, 0, 0) == (0, 0, 255, 255)
    assert geo.tile_box(12, 1, 2) == (253, 507, 509, 763)
    assert geo.tile_box(12, 11, 7)[2:] == (3000, 2000)
    assert "Overlap=\"1\" TileSize=\"254\"" in geo.dzi_xml("jpeg")


def test_slides_without_mpp_or_unreadable_still_show(tmp_path):
    """Showing a slide needs no resolution; a damaged slide file is reported, not a crash."""
    from weakstil.wsi.writer import write_aperio_tiff

    slides, results = tmp_path / "slides", tmp_path / "results"
    slides.mkdir()
    results.mkdir()
    rng = np.random.default_rng(0)
    write_aperio_tiff(slides / "nompp.svs", rng.integers(0, 255, (600, 800, 3), dtype=np.uint8), None,
                      min_level_px=128, thumbnail_px=128)
    data = (slides / "nompp.svs").read_bytes()
    (slides / "broken.svs").write_bytes(data[: len(data) // 2])
    (results / "scores.csv").write_text("slide_id,score,n_tiles,status,error\nnompp,,,failed,MissingMppError\n"
                                        "broken,,,failed,TruncatedSlideError\n")
    with make_client(results, slides_dir=slides) as c:
        info = c.get("/api/slides/nompp").json()
        assert info["image"]["mpp"] is None and info["image"]["width"] == 800
        level = DeepZoomGeometry(800, 600).max_level
        assert c.get(f"/api/slides/nompp/slide_files/{level}/0_0.jpeg").status_code == 200
        broken = c.get("/api/slides/broken").json()
        assert "image" not in broken and "copy the slide again" in broken["slide_error"]
        assert c.get("/slides/broken").status_code == 200
        thumb = c.get("/api/slides/broken/thumbnail.jpg")
        assert thumb.status_code == 500 and "copy the slide again" in thumb.text


def test_port_in_use_is_a_clear_error(cohort):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="cannot listen") as err:
            serve(cohort["results"], port=port, check_assets=False)
    assert "--port" in str(err.value)
