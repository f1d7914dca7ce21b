"""outputs/tiles.py: tiles.csv written and read back by its one reader (bundle and viewer share it)."""

from __future__ import annotations

import numpy as np
import pytest

from weakstil.errors import HeatmapInputError
from weakstil.outputs.tiles import TILE_COLUMNS, read_tiles_csv, write_tiles_csv
from weakstil.viewer.results import read_tiles_data

HEADER = ",".join(TILE_COLUMNS) + "\n"


def test_round_trip_keeps_positions_sizes_and_values(tmp_path):
    coords = np.array([[0, 0], [448, 0], [896, 448]])
    pred = np.array([10.0, 55.5, np.nan])
    attention = np.array([0.2, 0.3, 0.5])
    path = write_tiles_csv(tmp_path / "tiles.csv", coords, 448.0, pred, attention=attention)
    table = read_tiles_csv(path)
    assert len(table) == 3 and table.coords_l0.dtype == np.int64
    np.testing.assert_array_equal(table.coords_l0, coords)
    np.testing.assert_array_equal(table.width, [448, 448, 448])
    np.testing.assert_array_equal(table.prediction, pred)
    np.testing.assert_allclose(table.attention, attention)
    assert table.contribution is None  # empty fields: not given
    assert table.stamp[0] == str(path) and table.stamp[1] == path.stat().st_size


@pytest.mark.parametrize(("body", "words"), [
    ("1,2,448\n", "lacks column(s) height, prediction"),
    ("0,0,448,448,abc,,\n", "non-numeric values in column prediction"),
    ("0,,448,448,10,,\n", "without a position or size"),
    ("0,0,0,0,10,,\n", "without a position or size"),
])
def test_damaged_files_are_refused_with_a_reason(tmp_path, body, words):
    path = tmp_path / "tiles.csv"
    path.write_text((HEADER if "448,448" in body or "0,0,0" in body else "x,y,width\n") + body)
    with pytest.raises(HeatmapInputError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
        read_tiles_csv(path)
    assert isinstance(info.value, ValueError) and "weakstil score" in info.value.fix


def test_the_viewer_reads_what_it_can(tmp_path):
    path = tmp_path / "tiles.csv"
    path.write_text(HEADER + "0,0,448,448,abc,,\n448,,448,448,20,,\n896,0,448,448,30,0.5,15\n")
    tiles = read_tiles_data(path)
    np.testing.assert_array_equal(tiles.x, [0, 896])  # the row without y is left out
    np.testing.assert_array_equal(tiles.values["prediction"], [np.nan, 30.0])  # "abc" reads as NaN
    assert tiles.as_json()["attention"] == [None, 0.5]
    with pytest.raises(HeatmapInputError, match="lacks column"):
        (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
        read_tiles_data(tmp_path / "bad.csv")
