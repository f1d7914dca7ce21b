"""Evaluation plots: prediction vs pathologist scatter, ROC curves at sTIL cut-offs, calibration,
and tile-level prediction vs ground truth.

Figures are built on matplotlib's ``Figure`` with the Agg canvas directly, so no pyplot state
(current figure, backend choice) is touched or leaked, and they work headless. Every PNG is
written to a temporary name in the target folder and renamed into place. sTIL% axes run 0-100.
Each function returns the path written; the PNG is ``FIGSIZE_IN * dpi`` pixels (500 x 500 by
default).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from weakstil.mil.metrics import (
    DEFAULT_CUTOFFS,
    auc_key,
    check_pair,
    regression_metrics,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STIL_LIMITS = (0.0, 100.0)
FIGSIZE_IN = (5.0, 5.0)
DPI = 100
_MANY_POINTS = 5000  # above this, tile_scatter draws a hexbin density instead of markers


def scatter_plot(
    y_true,
    y_pred,
    path: str | Path,
    *,
    title: str = "",
    folds=None,
    dpi: int = DPI,
) -> Path:
    """Predicted vs pathologist sTIL% per slide with the identity line; R² and Pearson r in the
    title; points coloured by CV fold when ``folds`` (one fold index per slide) is given."""
    t, p = check_pair(y_true, y_pred)
    m = regression_metrics(t, p, cutoffs=())
    fig, ax = _figure(dpi)
    _identity(ax)
    if folds is None:
        ax.scatter(t, p, s=18, alpha=0.8, color="C0", edgecolors="none", label="slides")
    else:
        folds = np.asarray(folds).ravel()
        if folds.shape != t.shape:
            raise ValueError(f"folds has {folds.size} values for {t.size} slides")
        for i, k in enumerate(np.unique(folds)):
            sel = folds == k
            ax.scatter(t[sel], p[sel], s=18, alpha=0.8, color=f"C{i % 10}", edgecolors="none",
                       label=f"fold {k}")
    _stil_axes(ax, "pathologist sTIL%", "predicted sTIL%")
    stats = f"R² = {_fmt(m['r2'])}, Pearson r = {_fmt(m['pearson'])}, n = {m['n']}"
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _save_png(fig, path)


def roc_plot(
    y_true,
    y_pred,
    path: str | Path,
    *,
    cutoffs: Iterable[float] = DEFAULT_CUTOFFS,
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """One ROC curve per cut-off (sTIL-high = label ≥ cut-off, scored by the continuous
    prediction) with its AUC in the legend; a cut-off with only one class present is listed as
    'n/a'."""
    from sklearn.metrics import roc_curve

    t, p = check_pair(y_true, y_pred)
    cutoffs = tuple(cutoffs)
    m = regression_metrics(t, p, cutoffs=cutoffs)
    fig, ax = _figure(dpi)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    for i, c in enumerate(cutoffs):
        high = t >= c
        auc = m[auc_key(c)]
        label = f"sTIL ≥ {c:g}%: AUC {_fmt(auc)}"
        if np.isfinite(auc):
            fpr, tpr, _ = roc_curve(high, p)
            ax.plot(fpr, tpr, color=f"C{i % 10}", lw=1.8, label=f"{label} ({high.sum()}/{t.size})")
        else:
            ax.plot([], [], color=f"C{i % 10}", lw=1.8, label=f"{label} (one class only)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate")
    ax.set_aspect("equal")
    ax.set_title(title or "sTIL-high vs sTIL-low", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return _save_png(fig, path)


def calibration_plot(
    y_true,
    y_pred,
    path: str | Path,
    *,
    n_bins: int = 5,
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """Slides binned by prediction into ``n_bins`` equal-count bins; mean prediction (x) against
    mean pathologist sTIL% (y) per bin, with ±1 SD of the labels and each bin's size. A well
    calibrated model lies on the identity line."""
    t, p = check_pair(y_true, y_pred)
    bins = calibration_bins(p, n_bins=n_bins)
    pred_mean, label_mean, label_sd, counts = [], [], [], []
    for b in range(bins.max() + 1):
        sel = bins == b
        pred_mean.append(p[sel].mean())
        label_mean.append(t[sel].mean())
        label_sd.append(t[sel].std(ddof=1) if sel.sum() > 1 else 0.0)
        counts.append(int(sel.sum()))
    fig, ax = _figure(dpi)
    _identity(ax)
    ax.errorbar(pred_mean, label_mean, yerr=label_sd, fmt="o-", color="C0", capsize=3,
                label="mean ± SD per bin")
    for x, y, k in zip(pred_mean, label_mean, counts):
        ax.annotate(f"n={k}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=7)
    _stil_axes(ax, "mean predicted sTIL%", "mean pathologist sTIL%")
    ax.set_title(title or f"calibration ({len(counts)} bins by prediction)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return _save_png(fig, path)


def calibration_bins(pred: np.ndarray, *, n_bins: int) -> np.ndarray:
    """Bin index per slide: equal-count bins by rank of prediction (ties split by order), so no bin
    is empty; fewer bins when there are fewer slides."""
    n_bins = max(1, min(int(n_bins), pred.size))
    order = np.argsort(pred, kind="stable")
    bins = np.empty(pred.size, dtype=np.int64)
    bins[order] = np.arange(pred.size) * n_bins // pred.size
    return bins


def tile_scatter(
    truth,
    pred,
    path: str | Path,
    *,
    title: str = "",
    dpi: int = DPI,
) -> Path:
    """Tile-level predicted sTIL% against the known (e.g. synthetic) ground truth with the identity
    line and Pearson r; a hexbin density when there are many tiles."""
    t, p = check_pair(truth, pred)
    m = regression_metrics(t, p, cutoffs=())
    fig, ax = _figure(dpi)
    if t.size > _MANY_POINTS:
        hb = ax.hexbin(t, p, gridsize=40, extent=(*STIL_LIMITS, *STIL_LIMITS), bins="log",
                       cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="tiles (log)", shrink=0.8)
    else:
        ax.scatter(t, p, s=6, alpha=0.4, color="C0", edgecolors="none", rasterized=True)
    _identity(ax, color="k")
    _stil_axes(ax, "ground-truth tile sTIL%", "predicted tile sTIL%")
    ax.set_axisbelow(True)
    stats = f"Pearson r = {_fmt(m['pearson'])}, MAE = {_fmt(m['mae'], 1)}, {m['n']} tiles"
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize=10)
    return _save_png(fig, path)


# --- helpers ----------------------------------------------------------------------------------
def _figure(dpi: int) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _identity(ax: Axes, *, color: str = "0.5") -> None:
    ax.plot(STIL_LIMITS, STIL_LIMITS, color=color, lw=1, ls="--", label="identity")


def _stil_axes(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set(xlim=STIL_LIMITS, ylim=STIL_LIMITS, xlabel=xlabel, ylabel=ylabel)
    ax.set_aspect("equal")
    ax.grid(True, color="0.92", lw=0.8)


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "n/a"


def _save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as PNG via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        with open(tmp, "xb") as f:  # normal permissions (mkstemp would make it owner-only)
            fig.savefig(f, format="png", dpi=fig.dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
