"""Preflight: which slides open, with what resolution and geometry, and what is wrong with the rest.

:func:`check_slides` never raises on a bad slide: each slide gets one :class:`CheckRow`, ``ok`` or
``failed`` with ``reason`` = ``ErrorClass: what is wrong`` and ``fix`` = the advice.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from weakstil.errors import ConfigError, WeakstilError
from weakstil.wsi.slide import (
    open_kwargs_for,
    open_slide,
    read_mpp_csv,
    slide_id_from_path,
)
from weakstil.wsi.tiling import tissue_thumbnail
from weakstil.wsi.tissue import TissueParams, save_mask_qc, tissue_mask

CHECK_COLUMNS = (
    "slide_id", "path", "status", "vendor", "backend", "mpp", "mpp_source", "width", "height", "levels",
    "objective_power", "tissue_fraction", "reason", "fix",
)


@dataclass
class CheckRow:
    """One slide's preflight result (``tissue_fraction``: share of the slide's area that is tissue)."""

    slide_id: str
    path: str
    status: str  # 'ok' | 'failed'
    vendor: str | None = None
    backend: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    objective_power: float | None = None
    tissue_fraction: float | None = None
    reason: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_slides(
    paths: Iterable[str | Path],
    *,
    backend: str = "auto",
    mpp: float | None = None,
    mpp_override: bool = False,
    mpp_csv: str | Path | None = None,
    mpp_by_slide: Mapping[str, float] | None = None,
    tissue: TissueParams = TissueParams(),
    out_csv: str | Path | None = None,
    qc_dir: str | Path | None = None,
) -> list[CheckRow]:
    """One :class:`CheckRow` per slide; never raises on a bad slide.

    Per-slide values from ``mpp_csv`` (or an already read ``mpp_by_slide``) replace what a slide
    states; ``mpp`` is used where a slide states none (everywhere with ``mpp_override``).
    ``qc_dir`` gets ``<slide_id>.png`` tissue-mask pictures; ``out_csv`` the table.
    A bad ``mpp_csv`` (MppCsvError) or ``mpp_override`` without ``mpp`` (ConfigError) raises before
    any slide is read.
    """
    if mpp_override and mpp is None:
        raise ConfigError("mpp_override needs an mpp value", fix="pass --mpp together with the override")
    per_slide = dict(mpp_by_slide or {})
    if mpp_csv is not None:
        per_slide.update(read_mpp_csv(mpp_csv))
    rows = [check_slide(Path(p), backend=backend, mpp=mpp, mpp_override=mpp_override, mpp_by_slide=per_slide,
                        tissue=tissue, qc_dir=qc_dir) for p in paths]
    if out_csv is not None:
        write_check_csv(rows, out_csv)
    return rows


def check_slide(path: Path, *, backend: str = "auto", mpp: float | None = None, mpp_override: bool = False,
                mpp_by_slide: Mapping[str, float] | None = None, tissue: TissueParams = TissueParams(),
                qc_dir: str | Path | None = None) -> CheckRow:
    """Check one slide; never raises on a bad slide (keywords as in :func:`check_slides`)."""
    row = CheckRow(slide_id=slide_id_from_path(path), path=str(path), status="failed")
    from_csv = row.slide_id in (mpp_by_slide or {})
    try:
        kwargs = open_kwargs_for(path, backend=backend, mpp=mpp, mpp_override=mpp_override,
                                 mpp_by_slide=mpp_by_slide)
        with open_slide(path, **kwargs) as slide:
            row.vendor, row.backend, row.mpp = slide.vendor, slide.backend, round(slide.mpp, 6)
            row.mpp_source = "mpp-csv" if from_csv else slide.mpp_source
            row.width, row.height = slide.dimensions
            row.levels, row.objective_power = slide.level_count, slide.objective_power
            thumb, ds_xy = tissue_thumbnail(slide, tissue)
            mask = tissue_mask(thumb, mpp_thumb=slide.mpp * (ds_xy[0] + ds_xy[1]) / 2.0, params=tissue)
            row.tissue_fraction = round(float(mask.mean()), 4)
            if qc_dir is not None:
                save_mask_qc(thumb, mask, Path(qc_dir) / f"{row.slide_id}.png")
        row.status = "ok"
    except WeakstilError as exc:
        row.reason, row.fix = f"{exc.reason}: {exc.problem}", exc.fix
    except Exception as exc:  # a preflight must report every slide, whatever breaks
        row.reason = f"{type(exc).__name__}: {exc}"
        row.fix = "unexpected error; please report it with this message"
    return row


def write_check_csv(rows: Iterable[CheckRow], path: str | Path) -> Path:
    """Write the rows as CSV (to a temporary name, then renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=CHECK_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.as_dict().items()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_table(rows: Iterable[CheckRow]):
    """A rich Table of the rows (failed rows show the reason and the fix)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="slide check")
    for name, justify in (("slide", "left"), ("status", "left"), ("vendor", "left"), ("mpp", "right"),
                          ("source", "left"), ("size (px)", "right"), ("levels", "right"),
                          ("tissue", "right"), ("problem / fix", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        status = "[green]ok[/]" if row.ok else "[bold red]failed[/]"
        size = f"{row.width}×{row.height}" if row.width else ""
        tissue = f"{row.tissue_fraction:.0%}" if row.tissue_fraction is not None else ""
        problem = "" if row.ok else f"{escape(row.reason)}\n[dim]{escape(row.fix)}[/]"
        table.add_row(escape(row.slide_id), status, escape(row.vendor or ""), f"{row.mpp:.4g}" if row.mpp else "",
                      row.mpp_source or "", size, str(row.levels or ""), tissue, problem)
    return table
