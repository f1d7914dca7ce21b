"""Checks every synthetic family's cohort must pass (used by test_synth_cells, _regions, _voronoi)."""

from __future__ import annotations

import csv
from pathlib import Path

from weakstil.synth.truth import load_truth


def label_rows(root: Path) -> list[dict]:
    """labels.csv of a cohort as dicts (slide_id, patient_id, stil)."""
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def check_cohort_files(root: Path, prefix: str, n: int, *, patient_per_slide: bool = True) -> list[dict]:
    """labels.csv lists PREFIX-000 … in order, one slide and one truth file each (and one patient per
    slide where the family draws them so), each label the one its truth file holds, in 0-100; no partial
    files left. Returns the rows."""
    rows = label_rows(root)
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    assert [r["slide_id"] for r in rows] == ids
    assert sorted(p.stem for p in (root / "slides").glob("*.svs")) == ids
    assert sorted(p.stem for p in (root / "truth").glob("*.npz")) == ids
    for r in rows:
        truth = load_truth(root / "truth" / f"{r['slide_id']}.npz")
        assert r["patient_id"] == r["slide_id"] or not patient_per_slide
        assert float(r["stil"]) == float(truth["label"]) and 0 <= float(r["stil"]) <= 100
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.tmp"))
    return rows


def check_readers_agree(paths, mpps) -> list[tuple]:
    """OpenSlide and TiffSlide see every slide alike: the same levels, each slide's mpp, and every
    level's pixels (within 2 of 255) showing tissue. Returns (dimensions, level count) per slide."""
    import numpy as np
    import pytest

    openslide = pytest.importorskip("openslide")
    tiffslide = pytest.importorskip("tiffslide")
    counts = []
    for path, mpp in zip(paths, mpps, strict=True):
        o, t = openslide.OpenSlide(str(path)), tiffslide.TiffSlide(str(path))
        try:
            assert o.level_count == t.level_count
            assert o.level_dimensions == t.level_dimensions
            assert float(o.properties["openslide.mpp-x"]) == pytest.approx(mpp)
            assert float(t.properties["tiffslide.mpp-x"]) == pytest.approx(mpp)
            for level, (w, h) in enumerate(o.level_dimensions):
                a = np.asarray(o.read_region((0, 0), level, (w, h)).convert("RGB"))
                b = np.asarray(t.read_region((0, 0), level, (w, h), as_array=True))[..., :3]
                assert a.shape == (h, w, 3) and np.abs(a.astype(int) - b).max() <= 2
                assert a.std() > 5  # tissue, not blank
            counts.append((o.dimensions, o.level_count))
        finally:
            o.close()
            t.close()
    return counts
