"""Draw docs/img/architecture.png: weakstil's floors, their imports, and the data each stage makes.

``python docs/draw_architecture.py`` (matplotlib only; rerun after changing the floors, which
tests/test_architecture.py FLOORS checks in the code).
"""

from __future__ import annotations

from pathlib import Path

# (floor name, modules, what it makes or reads on disk), top floor first
FLOORS = [
    ("cli/  viewer/  demo.py", "one library call per command; create_app(config); the synthetic demo",
     "terminal, browser"),
    ("runs/", "runner (skip / lock / run / record, written once), executors (local, Dask)",
     "runs/<run>.json, locks"),
    ("outputs/", "score, heatmap PNG, overlay TIFF, GeoJSON, tiles.csv, review bundle",
     "results/  scores.csv, slides/<id>/"),
    ("mil/", "model (nn.Module), module (Lightning), fit, cv, train, labels, metrics, plots, cohort",
     "models/<name>/"),
    ("embed/   synth/", "encoders + weights, extract, loader (ring), cache (Zarr);  synthetic cohorts",
     "features/<encoder>-<tiling>.zarr"),
    ("wsi/", "slide + backends, reader (JPEG tiles), writer (pyramidal TIFF), tissue, tiling, check",
     "slides/*.svs|tif|ndpi …"),
    ("errors  config  fs  fingerprint  progress", "ground floor: exceptions, options, atomic writes, "
     "identity of features and models, progress display", ""),
]


def draw(path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig = Figure(figsize=(10, 7.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, 10), ylim=(-0.15, 7.2))
    ax.axis("off")
    height, gap, top = 0.72, 0.26, 6.85
    colours = ["#dbe9f6", "#e4e0f3", "#fde3cf", "#fbe7ee", "#e2f1df", "#eef1d6", "#ececec"]
    for i, ((name, text, disk), colour) in enumerate(zip(FLOORS, colours)):
        y = top - i * (height + gap) - height
        ax.add_patch(FancyBboxPatch((0.3, y), 6.6, height, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=colour, edgecolor="0.35", lw=1))
        ax.text(0.45, y + height - 0.2, name, fontsize=11.5, weight="bold", family="monospace", va="center")
        ax.text(0.45, y + 0.2, text, fontsize=8.3, va="center", color="0.15")
        if disk:
            ax.text(7.35, y + height / 2, disk, fontsize=8.5, va="center", family="monospace", color="#1f4e79")
            ax.add_patch(FancyArrowPatch((6.95, y + height / 2), (7.3, y + height / 2), arrowstyle="-",
                                         color="#1f4e79", lw=0.8, ls=":"))
        if i:
            ax.add_patch(FancyArrowPatch((3.6, y + height + gap - 0.02), (3.6, y + height + 0.02),
                                         arrowstyle="-|>", mutation_scale=12, color="0.25", lw=1.2))
    ax.text(3.75, top - height - gap / 2, "imports point down only", fontsize=8, style="italic",
            va="center", color="0.3")
    ax.text(7.35, top + 0.12, "on disk", fontsize=9, weight="bold", color="#1f4e79")
    ax.text(0.3, 0.0, "a floor may import its own sub-package and the floors below, never up or sideways; "
            "wsi/ embed/ mil/ outputs/ never import runs/", fontsize=8, color="0.3")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


if __name__ == "__main__":
    print(draw(Path(__file__).resolve().parent / "img" / "architecture.png"))
