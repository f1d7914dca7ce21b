"""What the viewer may serve: only files inside the results and slides folders once links are
resolved (#13 case 3), and damaged results files reported as such, not as a server error (case 11)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from weakstil.confine import is_inside
from weakstil.errors import ResultsFileError
from weakstil.viewer.results import SCORES_CSV, Cohort

log = logging.getLogger(__name__)


class ConfinedCohort(Cohort):
    """The cohort, serving nothing whose path leaves the results folder once links are resolved
    (a link ``results/slides/x/tiles.csv -> /etc/passwd`` is not found, not followed)."""

    def score_rows(self) -> list[dict]:
        path = self.results_dir / SCORES_CSV
        if os.path.lexists(path) and not is_inside(path, self.results_dir):
            log.warning("%s leads outside the results folder: not read", path)
            return []
        return super().score_rows()

    def review_file(self, slide_id: str, name: str) -> Path | None:
        path = super().review_file(slide_id, name)
        if path is not None and not is_inside(path, self.results_dir):
            log.warning("%s leads outside the results folder: not served", path)
            return None
        return path

    def tiles_checked(self, slide_id: str):
        """tiles.csv as arrays (None if absent); ResultsFileError naming the file if it is damaged."""
        try:
            return self.tiles(slide_id)
        except (ValueError, TypeError, KeyError, OSError) as exc:  # pandas parser errors are ValueErrors
            path = self.review_file(slide_id, REVIEW_TILES)
            problem = " ".join(str(exc).replace(str(path), "").split()) or type(exc).__name__
            raise ResultsFileError(f"tiles.csv cannot be read: {problem}", path=path) from exc


REVIEW_TILES = "tiles.csv"


def confine_slides(slide_paths: dict[str, Path], slides_dir: Path | None) -> dict[str, Path]:
    """The slides whose files, links resolved, lie inside ``slides_dir`` (the others are left out)."""
    if slides_dir is None:
        return slide_paths
    kept = {sid: p for sid, p in slide_paths.items() if is_inside(p, slides_dir)}
    for sid in sorted(set(slide_paths) - set(kept)):
        log.warning("slide %s: %s leads outside %s: not served", sid, slide_paths[sid], slides_dir)
    return kept
