"""plots.py: what each figure draws (data, colours, axes, and the PNG's pixels where the data are),
written atomically, NaN-safe, no pyplot state touched."""

from __future__ import annotations

import sys

import matplotlib.colors
import numpy as np
import pytest
from PIL import Image

from weakstil.mil.metrics import regression_metrics
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
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.size == size
    assert not list(path.parent.glob("*.partial"))  # no temporary file left behind


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, in order (to check what they drew)."""
    from weakstil.mil import plots

    seen = []
    save = plots._save_png

    def keep(fig, path):
        seen.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save_png", keep)
    return seen


def rgb_at(path, fig, x, y) -> np.ndarray:
    """The PNG's colour where the data point (x, y) of the figure's first axes was drawn."""
    ax = fig.axes[0]
    col, row_up = ax.transData.transform((x, y))
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return rgb[round(fig.bbox.height - row_up), round(col)]


def is_blue(rgb) -> bool:  # C0 (#1f77b4) over white, whatever its alpha
    return rgb[2] - rgb[0] > 60 and rgb[2] < 235


def colour_count(path, hex_colour: str, tol: int = 40) -> int:
    want = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - want).max(axis=2) <= tol).sum())


def test_scatter_draws_each_slide_where_its_values_are(tmp_path, figures):
    t, p = np.array([15.0, 45.0, 80.0, 60.0]), np.array([70.0, 50.0, 20.0, 90.0])
    path = scatter_plot(t, p, tmp_path / "plain.png", title="CV")
    assert_png(path)
    (fig,) = figures
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), np.column_stack([t, p]))
    assert ax.get_xlim() == (0.0, 100.0) and ax.get_ylim() == (0.0, 100.0)
    r2 = regression_metrics(t, p, cutoffs=())["r2"]
    assert f"R² = {r2:.2f}" in ax.get_title() and "n = 4" in ax.get_title()
    for x, y in zip(t, p):
        assert is_blue(rgb_at(path, fig, x, y)), (x, y)
    assert not is_blue(rgb_at(path, fig, 85, 60))  # no slide there: background
    assert not is_blue(rgb_at(path, fig, 30, 10))


def test_scatter_by_fold_colours_each_fold(tmp_path, data, figures):
    t, p = data
    folds = np.arange(40) % 5
    assert_png(scatter_plot(t, p, tmp_path / "sub" / "folds.png", title="CV", folds=folds))
    points = [c for c in figures[0].axes[0].collections]
    assert len(points) == 5
    for k, coll in enumerate(points):
        np.testing.assert_allclose(coll.get_offsets(), np.column_stack([t[folds == k], p[folds == k]]))
        assert matplotlib.colors.to_hex(coll.get_facecolor()[0], keep_alpha=False) == matplotlib.colors.to_hex(f"C{k}")
    with pytest.raises(ValueError, match="folds"):
        scatter_plot(t, p, tmp_path / "bad.png", title="CV", folds=[0, 1])
    assert not (tmp_path / "bad.png").exists()


def test_roc_curves_are_sklearns_with_their_auc_and_colour(tmp_path, data, figures):
    from sklearn.metrics import roc_auc_score, roc_curve

    t, p = data
    path = roc_plot(t, p, tmp_path / "roc.png", cutoffs=(10, 30, 50, 95))  # 95: one class
    assert_png(path)
    ax = figures[0].axes[0]
    curves = ax.get_lines()[1:]  # after the chance line
    assert len(curves) == 4
    for i, (c, line) in enumerate(zip((10, 30, 50), curves)):
        fpr, tpr, _ = roc_curve(t >= c, p)
        np.testing.assert_allclose(line.get_xdata(), fpr)
        np.testing.assert_allclose(line.get_ydata(), tpr)
        assert matplotlib.colors.to_hex(line.get_color()) == matplotlib.colors.to_hex(f"C{i}")
        assert f"AUC {roc_auc_score(t >= c, p):.2f}" in line.get_label()
    assert len(curves[3].get_xdata()) == 0 and "one class only" in curves[3].get_label()
    assert ax.get_xlim() == (0.0, 1.0)
    assert colour_count(path, "#1f77b4") > 150  # the first curve is drawn, not only its legend entry


def test_roc_without_two_classes_draws_no_curve(tmp_path, figures):
    low = np.array([1.0, 2, 3, 4, 5])
    path = roc_plot(low, low, tmp_path / "roc_low.png", cutoffs=(10, 30, 50))  # all NaN
    assert_png(path)
    curves = figures[0].axes[0].get_lines()[1:]
    assert all(len(line.get_xdata()) == 0 and "n/a" in line.get_label() for line in curves)
    assert colour_count(path, "#1f77b4") < 100  # only the legend's short sample line


def test_calibration_plot_and_bins(tmp_path, data, figures):
    t, p = data
    assert_png(calibration_plot(t, p, tmp_path / "cal.png", n_bins=5))
    bins = calibration_bins(p, n_bins=5)
    line = figures[0].axes[0].containers[0].lines[0]  # the errorbar's data line
    np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), [p[bins == b].mean() for b in range(5)])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), [t[bins == b].mean() for b in range(5)])
    assert [a.get_text() for a in figures[0].axes[0].texts] == ["n=8"] * 5
    assert_png(calibration_plot(t[:3], p[:3], tmp_path / "cal3.png", n_bins=5))
    assert len(figures[1].axes[0].containers[0].lines[0].get_xdata()) == 3  # fewer slides than bins
    bins = calibration_bins(np.array([5.0, 1, 1, 1, 9, 3]), n_bins=3)
    np.testing.assert_array_equal(np.bincount(bins), [2, 2, 2])
    assert bins[4] == 2 and bins[0] == 2  # highest predictions in the last bin


@pytest.mark.parametrize("n", [300, 8000])
def test_tile_scatter_points_and_density(tmp_path, n, figures):
    rng = np.random.default_rng(n)
    truth = rng.uniform(0, 100, n)
    pred = np.clip(truth + rng.normal(0, 10, n), 0, 100)
    assert_png(tile_scatter(truth, pred, tmp_path / "tiles.png", title="demo"))
    drawn = figures[0].axes[0].collections[0]
    if n <= 5000:
        np.testing.assert_allclose(drawn.get_offsets(), np.column_stack([truth, pred]))
    else:  # a hexbin: its cells count every tile
        assert drawn.get_array().sum() == n
    assert f"{n} tiles" in figures[0].axes[0].get_title()


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
