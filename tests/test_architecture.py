"""The package's shape, checked from its source (AST, no imports) and, for the heavy libraries, in
fresh interpreters: module size, one-way imports between the stages, no lightning when scoring.

The stages and their floors (docs/architecture.md draws them): a module may import its own
sub-package and anything on a lower floor, never a floor above or another unit on its own floor.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "weakstil"
MAX_LINES = 600

FLOORS = {
    # ground floor: imports nothing of weakstil but the ground floor (errors ← config, fs, …)
    "weakstil": 0, "errors": 0, "config": 0, "fs": 0, "fingerprint": 0, "progress": 0,
    "textout": 0, "confine": 0,  # tables for terminals and logs; paths that must stay inside a root
    "wsi": 1,  # slides, tiles, tissue, pyramidal TIFF: geometry and pixels, no model
    "embed": 2, "synth": 2,  # tiles → features; synthetic slides (written with wsi.writer)
    "mil": 3,  # features → a model
    "ssl": 4,  # self-supervised encoder pretraining (tiles from wsi, encoders from embed, Lightning set-up from mil)
    "outputs": 4,  # model + features → scores and review files
    "runs": 5,  # batches of the above: skip / lock / run / record, executors
    "demo": 6, "viewer": 6,  # the faces over the library
    "cli": 7, "__main__": 8,
}
# Known exceptions, each with its reason: (importing unit, imported unit) → why. Keep it short.
EXCEPTIONS: dict[tuple[str, str], str] = {}
LOWER_STAGES = ("wsi", "embed", "mil", "outputs")


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = modules()


def unit(module: str) -> str:
    """The floor unit of a module: its sub-package or ground-floor module (``weakstil`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "weakstil"


def imported(path: Path) -> set[str]:
    """Every weakstil module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from weakstil.outputs import heatmap` imports a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m == "weakstil" or m.startswith("weakstil.")}


def edges() -> list[tuple[str, str, str, str]]:
    """(importing unit, imported unit, importing module, imported module) across units."""
    out = []
    for name, path in MODULES.items():
        for target in imported(path):
            if unit(target) != unit(name):
                out.append((unit(name), unit(target), name, target))
    return sorted(out)


def test_every_unit_has_a_floor():
    assert {unit(m) for m in MODULES} <= set(FLOORS), sorted({unit(m) for m in MODULES} - set(FLOORS))


def test_no_module_is_over_600_lines():
    long = {name: n for name, path in MODULES.items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these (limit {MAX_LINES} lines): {long}"


def wrong_way(src_floor: int, dst_floor: int) -> bool:
    """Up, or sideways to another unit of the same floor (the ground floor's modules may share)."""
    return dst_floor > src_floor or (dst_floor == src_floor > 0)


def test_wrong_way():
    assert wrong_way(FLOORS["embed"], FLOORS["runs"]) and wrong_way(FLOORS["embed"], FLOORS["synth"])
    assert wrong_way(FLOORS["errors"], FLOORS["wsi"])
    assert not wrong_way(FLOORS["outputs"], FLOORS["mil"]) and not wrong_way(FLOORS["config"], FLOORS["errors"])


def test_imports_point_down_only():
    wrong = [f"{module} imports {target} (floor {FLOORS[src]} → {FLOORS[dst]})"
             for src, dst, module, target in edges()
             if wrong_way(FLOORS[src], FLOORS[dst]) and (src, dst) not in EXCEPTIONS
             and not (src in LOWER_STAGES and dst == "runs")]  # that one: the next test
    assert not wrong, "\n".join(wrong)


def test_lower_stages_never_import_runs():
    wrong = [f"{module} imports {target}" for src, dst, module, target in edges()
             if src in LOWER_STAGES and dst == "runs"]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_a_wrong_import(tmp_path, monkeypatch):
    """The AST walk finds lazy imports and `from package import module` forms."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from weakstil.runs import runner\n    import weakstil.mil.fit\n"
                    "from weakstil import progress, __version__\n")
    assert imported(path) == {"weakstil.runs.runner", "weakstil.mil.fit", "weakstil.progress", "weakstil"}


def run_fresh(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_scoring_never_imports_lightning(tmp_path):
    """Import the scoring and output modules, save, load and run a model: no lightning loaded."""
    run_fresh(f"""
import sys
import numpy as np
import torch
import weakstil.outputs.score, weakstil.outputs.heatmap, weakstil.outputs.bundle
from weakstil.mil.model import MILRegressor, TrainedModel, load_model
torch.manual_seed(0)
TrainedModel([MILRegressor(16), MILRegressor(16)], fingerprint={{}}).save({str(tmp_path / "model.ckpt")!r})
model = load_model({str(tmp_path)!r})
pred = model.predict(np.random.default_rng(0).normal(size=(30, 16)).astype(np.float16))
assert 0 <= pred.score <= 100 and pred.tile_pred.shape == (30,), pred
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
assert not heavy, heavy[:5]
""")


def test_help_imports_no_heavy_library():
    """`weakstil --help` (and a command's help) stays fast: torch, lightning, zarr, timm load later."""
    run_fresh("""
import sys
from typer.testing import CliRunner
from weakstil.cli import app
for args in (["--help"], ["score", "--help"], ["train", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "lightning", "zarr", "timm"})
assert not heavy, heavy
""")
