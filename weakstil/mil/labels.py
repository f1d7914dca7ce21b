"""Slide labels (``slide_id,patient_id,stil[,center]``) and patient-grouped cross-validation folds.

``read_labels`` checks the whole file and reports every bad row in one :class:`LabelsError`, each
problem with its 1-based CSV line number (the header is line 1). ``make_folds`` assigns each row
to a fold with scikit-learn's ``StratifiedGroupKFold``: grouped by patient (or by center),
stratified on binned sTIL% so every fold sees low and high scores. sTIL% is on 0-100 throughout.

pandas and scikit-learn are imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from weakstil.errors import LabelsError, LabelsNotFoundError, TooFewGroupsError

if TYPE_CHECKING:
    import pandas as pd

REQUIRED_COLUMNS = ("slide_id", "patient_id", "stil")
OPTIONAL_COLUMNS = ("center", "cohort")
# names other tools use for the same columns (lower case): suggested, never taken silently
COLUMN_ALIASES = {
    "slide_id": ("slide", "slide_name", "filename", "image", "image_id", "wsi", "id"),
    "patient_id": ("patient", "case_id", "case", "case_submitter_id", "subject", "subject_id"),
    "stil": ("stils", "til", "tils", "stil%", "stils%", "til%", "score", "label", "target"),
}
STIL_RANGE = (0.0, 100.0)


class LabelsWarning(UserWarning):
    """Something in the labels is suspicious but usable (unlabelled cached slides, 0-1 scale)."""


@dataclass
class LabelTable:
    """Validated labels: ``df`` has columns slide_id, patient_id (str), stil (float, 0-100) and,
    when the file has one, center (str, missing values as NaN); one row per slide, in file order.

    ``unlabelled`` lists the slide ids in the feature cache that have no label (sorted).
    """

    df: pd.DataFrame
    unlabelled: list[str] = field(default_factory=list)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.df)

    @property
    def slide_ids(self) -> list[str]:
        return self.df["slide_id"].tolist()

    @property
    def stil(self) -> np.ndarray:
        return self.df["stil"].to_numpy(dtype=np.float64)

    @property
    def has_center(self) -> bool:
        return "center" in self.df.columns


# --- reading ----------------------------------------------------------------------------------
def read_labels(path: str | Path, *, cached_ids: Iterable[str] | None = None) -> LabelTable:
    """Read and validate a labels CSV; raise one :class:`LabelsError` listing every problem.

    Extra columns are ignored, whitespace around names and values is stripped, a UTF-8 byte-order
    mark is accepted, and ``;`` or tab separated files (spreadsheet exports) are recognised from
    the header. Rows whose cells are all empty are skipped. With ``cached_ids`` (the slide ids in
    the feature cache), labelled slides missing from the cache are errors, and cached slides without
    a label are returned in ``table.unlabelled`` with a :class:`LabelsWarning`.
    """
    path = Path(path)
    text = _read_text(path)
    header_line, header, records = _split_records(text, path)
    problems: list[tuple[int, str]] = []
    columns = _column_index(header, header_line, problems)

    rows = _check_rows(records, len(header), columns, problems)
    cache = None if cached_ids is None else set(cached_ids)
    if cache is not None:
        _check_in_cache(rows, cache, problems)
    if not rows and not problems:
        problems.append((header_line, "no labelled rows under the header"))
    if problems:
        raise _labels_error(problems, path)

    table = LabelTable(df=_to_frame(rows, has_center="center" in columns), path=path)
    if "cohort" in columns:  # several cohorts in one file (see weakstil.mil.cohort)
        table.df["cohort"] = [r.cohort for r in rows]
    _warn_if_fractions(table.stil, path)
    if cache is not None:
        table.unlabelled = sorted(cache - set(table.slide_ids))
        if table.unlabelled:
            shown = ", ".join(table.unlabelled[:5]) + (", ..." if len(table.unlabelled) > 5 else "")
            warnings.warn(
                LabelsWarning(
                    f"{path}: {len(table.unlabelled)} cached slide(s) have no label and are left "
                    f"out of training: {shown}"
                ),
                stacklevel=2,
            )
    return table


def _read_text(path: Path) -> str:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LabelsNotFoundError(f"labels file {what}", path=path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise LabelsError(
            f"line {line}: the file is not UTF-8 text",
            fix="save it as 'CSV UTF-8' (in Excel: Save As > CSV UTF-8 (Comma delimited))",
            path=path,
        ) from exc


def _split_records(text: str, path: Path) -> tuple[int, list[str], list[tuple[int, list[str]]]]:
    """Header line number, header cells and (line number, cells) of each non-empty record."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = ","
    if "," not in first:
        delimiter = ";" if ";" in first else "\t" if "\t" in first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records: list[tuple[int, list[str]]] = []
    prev_line = 0
    try:
        for cells in reader:
            start_line, prev_line = prev_line + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                records.append((start_line, [cell.strip() for cell in cells]))
    except csv.Error as exc:
        raise LabelsError(f"line {reader.line_num}: cannot parse CSV ({exc})", path=path,
                          fix="look for an unclosed quote (\") or a stray NUL byte on that line; save the "
                              "file again as plain CSV") from exc
    if not records:
        raise LabelsError("the file is empty", path=path,
                          fix="write a header slide_id,patient_id,stil and one row per slide (sTIL% 0-100)")
    header_line, header = records[0]
    return header_line, [name.lstrip("\ufeff").strip().lower() for name in header], records[1:]


def _column_index(header: list[str], line: int, problems: list[tuple[int, str]]) -> dict[str, int]:
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
        if name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            if name in columns:
                problems.append((line, f"column '{name}' appears twice in the header"))
            else:
                columns[name] = i
    missing = [name for name in REQUIRED_COLUMNS if name not in columns]
    if missing:
        found = ", ".join(repr(name) for name in header)
        hints = [f"rename '{alias}' to {name}" for name in missing for alias in header
                 if alias in COLUMN_ALIASES.get(name, ())]
        if "patient_id" in missing and not any("patient_id" in h for h in hints):
            hints.append("one slide per patient? copy slide_id into a patient_id column (slides of one "
                         "patient must share it: folds keep a patient's slides together)")
        problems.append(
            (line, f"missing required column(s) {', '.join(missing)} (the header has {found})"
                   + "".join(f"; {h}" for h in hints))
        )
    return columns


@dataclass
class _Row:
    line: int
    slide_id: str
    patient_id: str
    stil: float
    center: str | None
    cohort: str | None = None


def _check_rows(
    records: list[tuple[int, list[str]]],
    n_header: int,
    columns: dict[str, int],
    problems: list[tuple[int, str]],
) -> list[_Row]:
    """Check each record; return all rows (bad ones too, for the cache and duplicate checks)."""
    rows: list[_Row] = []
    first_line: dict[str, int] = {}
    for line, cells in records:
        if len(cells) > n_header:
            problems.append(
                (line, f"{len(cells)} fields but the header has {n_header} "
                       "(a comma inside a value? quote it, and use a decimal point)")
            )

        def cell(name: str) -> str:
            i = columns.get(name)
            return cells[i] if i is not None and i < len(cells) else ""

        for name in REQUIRED_COLUMNS:
            if name in columns and not cell(name):
                problems.append((line, f"empty {name}"))
        stil = _parse_stil(cell("stil"), line, problems) if "stil" in columns else math.nan
        slide_id = cell("slide_id")
        if slide_id and "slide_id" in columns:
            if slide_id in first_line:
                problems.append(
                    (line, f"duplicate slide_id '{slide_id}' (also on line {first_line[slide_id]})")
                )
            else:
                first_line[slide_id] = line
        center = cell("center") or None
        rows.append(_Row(line, slide_id, cell("patient_id"), stil, center, cell("cohort") or None))
    return rows


def _parse_stil(value: str, line: int, problems: list[tuple[int, str]]) -> float:
    if not value:
        return math.nan  # reported as empty
    number = value[:-1].strip() if value.endswith("%") else value
    try:
        stil = float(number)
    except ValueError:
        hint = " (use a decimal point)" if "," in number else ""
        problems.append((line, f"stil '{value}' is not a number{hint}"))
        return math.nan
    if not math.isfinite(stil):
        problems.append((line, f"stil '{value}' is not a finite number"))
        return math.nan
    lo, hi = STIL_RANGE
    if not lo <= stil <= hi:
        problems.append((line, f"stil {value} is outside {lo:g}-{hi:g} (sTIL% is a percentage)"))
    return stil


def _check_in_cache(rows: list[_Row], cache: set[str], problems: list[tuple[int, str]]) -> None:
    lower = {sid.lower(): sid for sid in cache}
    for row in rows:
        if not row.slide_id or row.slide_id in cache:
            continue
        message = f"slide '{row.slide_id}' is not in the feature cache"
        stem = Path(row.slide_id).stem
        if stem != row.slide_id and stem in cache:
            message += f" (did you mean '{stem}'? slide ids are file names without the extension)"
        elif f"{row.slide_id}.ome" in cache:  # S1.ome.tif: the stem keeps ".ome"
            message += (f" (did you mean '{row.slide_id}.ome'? an OME-TIFF's slide id is its file name "
                        "without the last extension)")
        elif row.slide_id.lower() in lower:
            message += f" (did you mean '{lower[row.slide_id.lower()]}'? ids are case-sensitive)"
        else:
            message += " (run `weakstil extract` on it, or remove the row)"
        problems.append((row.line, message))


def _labels_error(problems: list[tuple[int, str]], path: Path) -> LabelsError:
    problems = sorted(problems, key=lambda p: p[0])
    lines = "\n".join(f"  line {line}: {text}" for line, text in problems)
    n_lines = len({line for line, _ in problems})
    error = LabelsError(f"{len(problems)} problem(s) on {n_lines} line(s):\n{lines}", path=path)
    error.problems = problems  # (line, message) pairs, for callers that want them
    return error


def _to_frame(rows: list[_Row], *, has_center: bool) -> pd.DataFrame:
    import pandas as pd

    data: dict[str, object] = {
        "slide_id": [r.slide_id for r in rows],
        "patient_id": [r.patient_id for r in rows],
        "stil": np.array([r.stil for r in rows], dtype=np.float64),
    }
    if has_center:
        data["center"] = [r.center for r in rows]
    return pd.DataFrame(data)


def _warn_if_fractions(stil: np.ndarray, path: Path) -> None:
    if len(stil) >= 5 and stil.max() <= 1.0 and stil.max() > 0:
        warnings.warn(
            LabelsWarning(
                f"{path}: every stil value is at most 1; sTIL% is on 0-100 "
                "(multiply fractions by 100 if these are fractions)"
            ),
            stacklevel=3,
        )


# --- folds ------------------------------------------------------------------------------------
def make_folds(
    table: LabelTable | pd.DataFrame,
    *,
    n_folds: int = 5,
    by: str = "patient",
    seed: int = 0,
    n_bins: int = 4,
) -> np.ndarray:
    """Fold index (0..n_folds-1, int64) for every row, in row order.

    Rows are grouped by patient (``by="patient"``) or center (``by="center"``), so a group never
    spans two folds, and stratified on sTIL% cut at its quantiles into ``n_bins`` bins; a bin with
    fewer than ``n_folds`` groups is merged into its smaller neighbour (see :func:`stil_bins`).
    """
    df = table.df if isinstance(table, LabelTable) else table
    check_trainable(df, path=getattr(table, "path", None))
    if n_folds < 2:
        raise TooFewGroupsError(f"n_folds={n_folds}; cross-validation needs at least 2 folds",
                                fix="use --folds 2 or more (5 is usual)")
    groups = _fold_groups(df, by)
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        noun = "patients" if by == "patient" else "centers"
        raise TooFewGroupsError(
            f"only {n_groups} {noun} in the labels, fewer than the {n_folds} folds asked for",
            fix=f"use --folds {n_groups} (or fewer), or add {noun}",
        )
    y = df["stil"].to_numpy(dtype=np.float64)
    folds = np.full(len(df), -1, dtype=np.int64)
    for k, (_, test) in enumerate(_stratified_group_splits(y, groups, n_folds, seed, n_bins)):
        folds[test] = k
    empty = sorted(set(range(n_folds)) - set(folds.tolist()))
    if empty:  # StratifiedGroupKFold can in principle leave a fold empty with very uneven groups
        raise TooFewGroupsError(
            f"fold(s) {empty} got no slides ({n_groups} groups for {n_folds} folds)",
            fix="use fewer folds (--folds N), or another --seed",
        )
    return folds


def check_trainable(df: pd.DataFrame, *, path: str | Path | None = None) -> None:
    """Refuse labels a regressor cannot learn from: fewer than two distinct sTIL% values.

    All slides labelled the same (or a single slide) would train a model that predicts a constant,
    with no error and meaningless metrics; this is a :class:`LabelsError` before any training.
    """
    y = df["stil"].to_numpy(dtype=np.float64)
    distinct = np.unique(y[np.isfinite(y)])
    if len(distinct) >= 2:
        return
    what = f"every slide has sTIL% {distinct[0]:g}" if len(distinct) else "no slide has an sTIL% value"
    raise LabelsError(
        f"{what} ({len(y)} slide(s)): a regressor needs at least two different sTIL% values to learn from",
        path=path,
        fix="label slides that cover the sTIL% range (a useful model needs many distinct values); check that "
            "the stil column holds the slides' sTIL% and not a constant",
    )


def inner_split(
    train_idx: np.ndarray,
    df: LabelTable | pd.DataFrame,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    n_bins: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Split the rows ``train_idx`` of ``df`` into (train, validation) row indices, grouped by
    patient and stratified on sTIL%, for early stopping. About ``val_fraction`` of the patients go
    to validation (one fold of ``round(1/val_fraction)``).
    """
    df = df.df if isinstance(df, LabelTable) else df
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train_idx = np.asarray(train_idx, dtype=np.int64)
    groups = _fold_groups(df, "patient")[train_idx]
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise TooFewGroupsError(
            f"a training fold has {n_groups} patient(s); holding patients out for validation (which picks "
            "the epoch to keep) needs at least 2 in every training fold",
            fix="add patients to the labels (3 or more; far more for a useful model); with --folds-by center, "
                "make sure the other centers of each fold hold at least 2 patients, or use --folds-by patient",
        )
    n_splits = min(max(2, round(1.0 / val_fraction)), n_groups)
    y = df["stil"].to_numpy(dtype=np.float64)[train_idx]
    train, val = next(iter(_stratified_group_splits(y, groups, n_splits, seed, n_bins)))
    return np.sort(train_idx[train]), np.sort(train_idx[val])


def stil_bins(y: np.ndarray, groups: np.ndarray, *, n_bins: int, min_groups: int) -> np.ndarray:
    """Bin index per row: sTIL% cut at its ``n_bins`` quantiles, bins closed on the right so that a
    value equal to a cut-point goes to the lower bin (with many 0% slides the zeros form their own
    bin; repeated cut-points collapse). Then the bin with the fewest distinct groups is merged into
    its smaller neighbour until every bin holds at least ``min_groups`` groups or one bin is left,
    so scikit-learn never sees a class too small to spread over the folds.
    """
    y = np.asarray(y, dtype=np.float64)
    if n_bins <= 1 or len(y) == 0:
        return np.zeros(len(y), dtype=np.int64)
    edges = np.unique(np.quantile(y, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    _, bins = np.unique(np.searchsorted(edges, y, side="left"), return_inverse=True)
    members = [set(groups[bins == b].tolist()) for b in range(bins.max() + 1)]
    while len(members) > 1:
        counts = [len(m) for m in members]
        k = int(np.argmin(counts))
        if counts[k] >= min_groups:
            break
        if k == 0:
            into = 1
        elif k == len(members) - 1:
            into = k - 1
        else:
            into = k - 1 if counts[k - 1] <= counts[k + 1] else k + 1
        members[into] = members[into] | members[k]
        del members[k]
        bins[bins == k] = into
        bins[bins > k] -= 1
    return bins.astype(np.int64)


def _stratified_group_splits(y, groups, n_splits: int, seed: int, n_bins: int):
    from sklearn.model_selection import StratifiedGroupKFold

    strata = stil_bins(y, groups, n_bins=n_bins, min_groups=n_splits)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return splitter.split(np.zeros(len(y)), strata, groups)


def _fold_groups(df: pd.DataFrame, by: str) -> np.ndarray:
    if by == "patient":
        return df["patient_id"].to_numpy(dtype=object)
    if by != "center":
        raise ValueError(f"by must be 'patient' or 'center', got {by!r}")
    if "center" not in df.columns:
        raise LabelsError(
            "the labels have no 'center' column, so folds cannot be grouped by center",
            fix="add a center column to the labels CSV, or group the folds by patient",
        )
    center = df["center"]
    blank = df.loc[center.isna(), "slide_id"].tolist()
    if blank:
        raise LabelsError(f"{len(blank)} slide(s) have no center: {', '.join(blank[:10])}",
                          fix="fill in the center column for every row, or group folds by patient")
    centers_of: dict[str, set[str]] = defaultdict(set)
    for patient, c in zip(df["patient_id"], center):
        centers_of[patient].add(c)
    split = {p: sorted(cs) for p, cs in centers_of.items() if len(cs) > 1}
    if split:
        shown = "; ".join(f"{p}: {', '.join(cs)}" for p, cs in list(split.items())[:10])
        raise LabelsError(
            f"{len(split)} patient(s) appear under more than one center ({shown}), so a patient "
            "could land in two folds",
            fix="give each patient one center, or group the folds by patient",
        )
    return center.to_numpy(dtype=object)
