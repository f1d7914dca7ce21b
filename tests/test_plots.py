"""plots.py: PNGs written atomically at the expected size, NaN-safe, no pyplot state touched."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from weakstil.mil.plots import (
    calibration_bins,
    calibration_plot,
    roc_plot,
    scatter_plot,
    tile_scatter,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 90, 40)
    return t, np.clip(t + rng.normal(0, 12, 40), 0, 100)


def assert_png(path, size=(500, 500)):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.size == size
    assert not list(path.parent.glob("*.partial"))  # no temporary file left behind


def test_scatter_plain_and_by_fold(tmp_path, data):
    t, p = data
    assert_png(scatter_plot(t, p, tmp_path / "plain.png", title="CV"))
    folds = np.arange(40) % 5
    assert_png(scatter_plot(t, p, tmp_path / "sub" / "folds.png", title="CV", folds=folds))
    with pytest.raises(ValueError, match="folds"):
        scatter_plot(t, p, tmp_path / "bad.png", title="CV", folds=[0, 1])
    assert not (tmp_path / "bad.png").exists()


def test_roc_with_nan_auc(tmp_path, data):
    t, p = data
    assert_png(roc_plot(t, p, tmp_path / "roc.png", cutoffs=(10, 30, 50, 95)))  # 95: one class
    low = np.array([1.0, 2, 3, 4, 5])
    assert_png(roc_plot(low, low, tmp_path / "roc_low.png", cutoffs=(10, 30, 50)))  # all NaN


def test_calibration_plot_and_bins(tmp_path, data):
    t, p = data
    assert_png(calibration_plot(t, p, tmp_path / "cal.png", n_bins=5))
    assert_png(calibration_plot(t[:3], p[:3], tmp_path / "cal3.png", n_bins=5))
    bins = calibration_bins(np.array([5.0, 1, 1, 1, 9, 3]), n_bins=3)
    np.testing.assert_array_equal(np.bincount(bins), [2, 2, 2])
    assert bins[4] == 2 and bins[0] == 2  # highest predictions in the last bin


@pytest.mark.parametrize("n", [300, 8000])
def test_tile_scatter_points_and_density(tmp_path, n):
    rng = np.random.default_rng(n)
    truth = rng.uniform(0, 100, n)
    assert_png(tile_scatter(truth, np.clip(truth + rng.normal(0, 10, n), 0, 100),
                            tmp_path / "tiles.png", title="demo"))


def test_overwrite_and_dpi(tmp_path, data):
    t, p = data
    path = tmp_path / "scatter.png"
    path.write_bytes(b"old")
    assert_png(scatter_plot(t, p, path, title="x"))
    assert_png(scatter_plot(t, p, path, title="x", dpi=60), size=(300, 300))


def test_no_pyplot_state_leaks(tmp_path, data):
    t, p = data
    plt = sys.modules.get("matplotlib.pyplot")
    before = plt.get_fignums() if plt else None
    scatter_plot(t, p, tmp_path / "a.png", title="x")
    roc_plot(t, p, tmp_path / "b.png")
    if plt is None:
        assert "matplotlib.pyplot" not in sys.modules
    else:
        assert plt.get_fignums() == before
