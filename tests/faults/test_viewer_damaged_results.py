"""#13 case 11: a damaged tiles.csv gives the slide API a 4xx JSON answer naming the file and the
problem (never HTTP 500), and the slide page shows that message."""

from __future__ import annotations

from pathlib import Path

import pytest

from weakstil.viewer.app import STATIC_DIR

GARBAGE = {
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00garbage\x00" * 20,
    "wrong columns": b"a,b\n1,2\n",
    "ragged rows": b"x,y,width,height,prediction\n0,0,200,200,5\n1,2,3,4,5,6,7,8,9\n\"unclosed,1\n",
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_tiles_csv_is_a_json_4xx_naming_the_file(viewer_client, results_root, kind):
    tiles = results_root / "results" / "slides" / "tiny" / "tiles.csv"
    tiles.write_bytes(GARBAGE[kind])
    with viewer_client(results_root) as client:
        for url in ("/api/slides/tiny", "/api/slides/tiny/tiles.json", "/api/slides/tiny/overlay/prediction.dzi",
                    "/api/slides/tiny/heatmap-thumbnail.jpg"):
            response = client.get(url)
            assert 400 <= response.status_code < 500, (url, response.status_code, response.text)
            body = response.json()
            assert Path(body["file"]) == tiles and "tiles.csv cannot be read" in body["error"]
            assert body["problem"] and body["fix"] and str(tiles) in body["error"]
        assert client.get("/slides/tiny").status_code == 200  # the page itself loads and shows the message
        assert client.get("/api/cohort").status_code == 200


def test_the_slide_page_shows_the_api_error_text():
    script = (STATIC_DIR / "slide.js").read_text()
    assert "throw new Error(await apiErrorText(response))" in script
    helper = script[script.index("async function apiErrorText"):]
    assert "response.json()" in helper and "body.error" in helper
