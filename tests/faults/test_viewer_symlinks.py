"""#13 case 3: links inside the results or slides folder that lead outside are neither served by the
viewer (404) nor written through by the review writers (UnsafeOutputPathError)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from weakstil.errors import UnsafeOutputPathError
from weakstil.outputs.heatmap import write_slide_outputs
from weakstil.wsi.slide import open_slide

SECRET = "root:x:0:0:secret-outside-results\n"


@pytest.fixture
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("outside") / "passwd"
    path.write_text(SECRET)
    return path


def test_a_review_file_linked_out_of_results_is_404(viewer_client, results_root, secret):
    folder = results_root / "results" / "slides" / "tiny"
    (folder / "tiles.geojson").unlink()
    (folder / "tiles.geojson").symlink_to(secret)
    (folder / "heatmap.png").unlink()
    (folder / "heatmap.png").symlink_to("/etc/passwd")
    with viewer_client(results_root) as client:
        for name in ("tiles.geojson", "heatmap.png"):
            response = client.get(f"/api/slides/tiny/files/{name}")
            assert response.status_code == 404 and "secret" not in response.text and "root:" not in response.text
        assert "tiles.geojson" not in client.get("/api/slides/tiny").json()["files"]


def test_tiles_csv_and_a_whole_slide_folder_linked_out_are_not_read(viewer_client, results_root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "other"
    shutil.copytree(results_root / "results" / "slides" / "tiny", outside)
    (results_root / "results" / "slides" / "evil").symlink_to(outside, target_is_directory=True)
    tiles = results_root / "results" / "slides" / "tiny" / "tiles.csv"
    tiles.unlink()
    tiles.symlink_to(outside / "tiles.csv")
    with viewer_client(results_root) as client:
        assert client.get("/api/slides/tiny/tiles.json").status_code == 404
        assert client.get("/api/slides/evil/tiles.json").status_code == 404
        assert client.get("/api/slides/evil/files/tiles.csv").status_code == 404


def test_links_that_stay_inside_results_are_still_served(viewer_client, results_root):
    folder = results_root / "results" / "slides" / "tiny"
    (folder / "copy").mkdir()
    os.replace(folder / "tiles.geojson", folder / "copy" / "tiles.geojson")
    (folder / "tiles.geojson").symlink_to(folder / "copy" / "tiles.geojson")
    with viewer_client(results_root) as client:
        assert client.get("/api/slides/tiny/files/tiles.geojson").status_code == 200


def test_scores_csv_linked_out_is_not_read(viewer_client, results_root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("foreign") / "scores.csv"
    outside.write_text("slide_id,score,n_tiles,status,error\nforeign-patient,99.0,1,ok,\n")
    scores = results_root / "results" / "scores.csv"
    scores.unlink()
    scores.symlink_to(outside)
    with viewer_client(results_root) as client:
        ids = [row["slide_id"] for row in client.get("/api/cohort").json()["slides"]]
        assert "foreign-patient" not in ids and ids == ["tiny"]
        assert client.get("/api/slides/foreign-patient").status_code == 404


def test_a_slide_linked_out_of_the_slides_folder_is_not_served(viewer_client, results_root, tiny_slide):
    (results_root / "slides" / "tiny.svs").unlink()
    (results_root / "slides" / "tiny.svs").symlink_to(tiny_slide)  # the session's copy, outside
    with viewer_client(results_root) as client:
        assert client.get("/api/slides/tiny/thumbnail.jpg").status_code == 404
        assert client.get("/api/slides/tiny/slide.dzi").status_code == 404
        assert "image" not in client.get("/api/slides/tiny").json()


def test_review_writes_refuse_a_folder_linked_out_of_results(results_root, tmp_path_factory):
    outside = tmp_path_factory.mktemp("victim")
    (results_root / "results" / "slides" / "linked").symlink_to(outside, target_is_directory=True)
    coords = np.array([[0, 0], [200, 0]])
    with open_slide(results_root / "slides" / "tiny.svs") as slide, pytest.raises(UnsafeOutputPathError) as info:
        write_slide_outputs(slide, results_root / "results" / "slides" / "linked", coords_l0=coords, size_l0=200.0,
                            prediction=np.array([10.0, 20.0]), attention=np.array([0.5, 0.5]),
                            contribution=np.array([5.0, 10.0]), score=15.0, formats=("csv", "png"))
    assert "outside the results folder" in str(info.value) and "linked" in str(info.value)
    assert isinstance(info.value, PermissionError) and list(outside.iterdir()) == []


def test_heatmap_command_does_not_write_through_a_linked_slide_folder(results_root, tmp_path_factory):
    from weakstil.runs.batch import regenerate

    outside = tmp_path_factory.mktemp("victim2") / "tiny"
    folder = results_root / "results" / "slides" / "tiny"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    before = {p.name: p.stat().st_mtime_ns for p in outside.iterdir()}
    (outcome,) = regenerate(results_root / "results", results_root / "slides", formats=("png", "geojson"))
    assert outcome.status == "failed" and "UnsafeOutputPath" in f"{outcome.reason} {outcome.error}"
    assert {p.name: p.stat().st_mtime_ns for p in outside.iterdir()} == before
