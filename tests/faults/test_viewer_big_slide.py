"""#13 case 4: a large slide without a pyramid opens in the viewer with bounded memory.

Coarse Deep Zoom levels and the thumbnail come from reduced copies built once by reading the slide
in blocks (weakstil/viewer/reduced.py), never from one read of the whole level-0 image. The fast
test checks the block path on a small slide with a small read limit; the slow one opens a 40,000 ×
40,000 single-level TIFF in a subprocess and checks its peak RSS stays under 2 GB.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("starlette")

TILE = 256
MPP = 0.5


def block_rgb(tx: int, ty: int) -> tuple[int, int, int]:
    """The colour of TIFF tile (tx, ty): every tile is flat, so reduced views are easy to check."""
    return (tx * 53) % 256, (ty * 97) % 256, 128


def write_single_level_tiff(path, width: int, height: int, *, compression=None):
    """A tiled, single-level RGB TIFF written tile by tile from a generator (small in memory)."""
    import tifffile

    def tiles():
        for ty in range(-(-height // TILE)):
            for tx in range(-(-width // TILE)):
                yield np.broadcast_to(np.array(block_rgb(tx, ty), np.uint8), (TILE, TILE, 3))

    px_per_cm = 1e4 / MPP
    tifffile.imwrite(path, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression=compression, metadata=None, resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER")
    return path


def make_client(root, cache_dir):
    from starlette.testclient import TestClient

    from weakstil.viewer import ViewerConfig, create_app

    results = root / "results"
    results.mkdir(exist_ok=True)
    (results / "scores.csv").write_text("slide_id,score,n_tiles,status,error\nbig,,,failed,none\n")
    config = ViewerConfig(results_dir=results, slides_dir=root / "slides", check_assets=False, cache_dir=cache_dir)
    return TestClient(create_app(config), base_url="http://127.0.0.1")


def test_coarse_views_come_from_a_reduced_copy_read_in_blocks(tmp_path, monkeypatch):
    from PIL import Image

    from weakstil.viewer import reduced
    from weakstil.viewer.deepzoom import DeepZoomGeometry
    from weakstil.wsi.slide import SlideHandle

    width, height = 3000, 2000
    (tmp_path / "slides").mkdir()
    write_single_level_tiff(tmp_path / "slides" / "big.tif", width, height)
    monkeypatch.setattr(reduced, "MAX_READ_PX", 512)
    reads = []
    original = SlideHandle.read_region

    def recording(self, xy_l0, level, size):
        reads.append(max(size))
        return original(self, xy_l0, level, size)

    monkeypatch.setattr(SlideHandle, "read_region", recording)
    geo = DeepZoomGeometry(width, height)
    cache = tmp_path / "cache"
    with make_client(tmp_path, cache) as client:
        assert client.get("/api/slides/big").json()["image"]["levels"] == 1
        thumb = np.asarray(Image.open(io.BytesIO(client.get("/api/slides/big/thumbnail.jpg").content)))
        for level in range(geo.max_level + 1):
            cols, rows = geo.tile_count(level)
            for col, row in ([(c, r) for c in range(cols) for r in range(rows)] if cols * rows <= 16 else [(1, 1)]):
                response = client.get(f"/api/slides/big/slide_files/{level}/{col}_{row}.jpeg")
                assert response.status_code == 200, (level, col, row)
    assert reads and max(reads) <= 512, max(reads)  # never one read of the whole (or a large) region
    copies = sorted(p.name for p in cache.glob("*.npy"))
    assert copies and not list(cache.glob(".*tmp*"))
    # the thumbnail shows each TIFF tile's colour at its place (320 px wide: 1 thumb px = 9.4 slide px)
    scale = thumb.shape[1] / width
    for tx, ty in [(1, 1), (5, 3), (9, 6)]:
        centre = thumb[int((ty + 0.5) * TILE * scale), int((tx + 0.5) * TILE * scale)].astype(int)
        assert np.abs(centre - block_rgb(tx, ty)).max() <= 12, (tx, ty, centre)

    reads.clear()  # a second viewer (a restart) reuses the copies on disk: no full pass again
    with make_client(tmp_path, cache) as client:
        assert client.get("/api/slides/big/thumbnail.jpg").status_code == 200
        assert client.get("/api/slides/big/slide_files/0/0_0.jpeg").status_code == 200
    assert reads == [] and sorted(p.name for p in cache.glob("*.npy")) == copies


PROBE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from starlette.testclient import TestClient
    from weakstil.viewer import ViewerConfig, create_app
    from weakstil.viewer.deepzoom import DeepZoomGeometry
    root = Path(sys.argv[1])
    app = create_app(ViewerConfig(results_dir=root / "results", slides_dir=root / "slides", check_assets=False,
                                  cache_dir=root / "cache"))
    codes = []
    with TestClient(app, base_url="http://127.0.0.1") as client:
        info = client.get("/api/slides/big").json()["image"]
        codes.append(client.get("/api/slides/big/thumbnail.jpg").status_code)
        geo = DeepZoomGeometry(info["width"], info["height"])
        for level in range(geo.max_level + 1):
            cols, rows = geo.tile_count(level)
            for col, row in {(0, 0), (cols // 2, rows // 2), (cols - 1, rows - 1)}:
                codes.append(client.get(f"/api/slides/big/slide_files/{level}/{col}_{row}.jpeg").status_code)
    print(json.dumps({"codes": codes, "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


@pytest.mark.slow
def test_a_40000_px_single_level_tiff_opens_under_2_gb(tmp_path):
    import json

    (tmp_path / "slides").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "scores.csv").write_text("slide_id,score,n_tiles,status,error\nbig,,,failed,none\n")
    write_single_level_tiff(tmp_path / "slides" / "big.tif", 40_000, 40_000, compression="zlib")
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["codes"]) == {200}, result["codes"]
    assert result["max_rss_mb"] < 2048, result


def test_slides_whose_levels_fit_are_read_directly(tmp_path, tiny_slide):
    """A slide small enough (or with a pyramid) never gets a reduced copy: nothing is built or written."""
    from weakstil.viewer.deepzoom import DeepZoomGeometry
    from weakstil.viewer.reduced import ReducedLevels
    from weakstil.wsi.slide import open_slide

    levels = ReducedLevels(tmp_path / "cache")
    with open_slide(tiny_slide) as slide:
        geo = DeepZoomGeometry(*slide.dimensions)
        for level in range(geo.max_level + 1):
            assert levels.for_downsample(slide, geo.downsample(level), 256) is None
        assert levels.for_downsample(slide, 5.0, 320) is None
    assert levels.builds == 0 and not (tmp_path / "cache").exists()
