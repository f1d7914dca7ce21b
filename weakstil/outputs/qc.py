"""QC and out-of-distribution flags on every score (the ``qc`` column of scores.csv).

Pure functions over numbers and arrays. Training calls :func:`build_reference` on its own slides and
writes the result next to the model (``qc_reference.json``); scoring calls :func:`slide_flags` for each
slide against that reference. A slide gets zero or more flags, joined with ``;`` (empty = fine):

* ``low-tissue``: fewer tiles than ``min_tiles`` = max(``MIN_TILES_FLOOR``, ``MIN_TILES_FRACTION`` ×
  the 5th percentile of the training slides' tile counts). Too little tissue to trust an average.
* ``mpp-out-of-range``: the slide's scan resolution lies outside the training slides' range widened
  by ``MPP_TOLERANCE`` (relative). Tiles are resampled to the model's µm/px, but a scan much coarser
  than any in training has lost detail the model relied on.
* ``out-of-distribution``: the slide's mean tile embedding is far from the training cohort. The
  distance is the root-mean-square z-score over embedding dimensions (a Mahalanobis distance with a
  diagonal covariance; each dimension's SD is floored at ``STD_FLOOR`` × the median SD so that a
  near-constant dimension cannot dominate). The threshold is the larger of the ``OOD_PERCENTILE``
  percentile of the training slides' own leave-one-out distances (each slide against the mean and SD
  of the others) × ``OOD_MAX_FACTOR`` and ``OOD_MEDIAN_FACTOR`` × their median: with a few dozen
  training slides the percentile is just their maximum, and new slides of the same kind reach ~1.2×
  it (measured on the synthetic cohorts), so the two rules keep the false alarms below 1 in 10.
  Without stain normalisation, over- or under-staining shifted the mean embedding and was caught
  here (stain optical density ×2.5 gave 3.5× the median distance); with it (the default) the
  tiles look normal to the encoder, and the next flag says so instead.
* ``stain-out-of-range``: the slide's hematoxylin or eosin amount (the 99th percentile of its stain
  estimate, :mod:`weakstil.embed.stain`) lies outside the training slides' range widened ×/÷
  ``STAIN_TOLERANCE``: normalisation made the tiles look usual, but an over- or under-stained or
  faded slide deserves a look (stain optical density ×2.5 gives ~2.3× the training maximum).
  Only for models whose features were stain-normalised.
* ``measurement-out-of-range``: the slide's mean of one of the stain morphometry's readings of
  sTIL% (the lymphocyte share of the estimated stroma, by size and by darkness, strict and loose) or
  of its stroma estimate (:mod:`weakstil.embed.morph`; not the share inside nests, a confounder
  whose narrow range on a standard cohort flagged one of the demo's ten test slides) lies outside the training
  slides' range widened by ``MEASURE_TOLERANCE`` × that range on each side. The model is then
  extrapolating on the very quantity it reads. On a 40-slide cohort of new cells-hard slides scored by
  the 24-slide cells-hard model, it flagged the worst error (a heavily hematoxylin-tinted slide of
  true sTIL 1 %, scored 80: its dark-pixel share 0.46 against 0.01–0.34 in training) and one other;
  leaving each training slide out, 0 or 1 of 24–40 slides fired (docs/cohorts.md). Only for features
  with this morphometry's column layout (``stainmorph.v4``–``v6``; ``+stainmorph`` encoders: the default).
* ``little-stroma``: the slide's estimated stroma (each tile's stroma estimate × the tile's area; the
  estimate tiles.csv and top_tiles.png show, :func:`~weakstil.embed.encoders.stroma_estimate`: the wide
  nest rule's where the features have it) is below ``LITTLE_STROMA_MM2`` (0.125 mm², ten 112-µm tiles'
  worth) — a fixed floor, not learned from training. sTIL% is a share of the stroma; with this little of it, the
  score (and the pathologist's estimate) rests on a few tiles, and the "highest sTIL%" tiles may be
  nests. On the accuracy benchmark's cells-hard cohort (40 slides, eighteenth run) the 10 slides
  below the floor had a mean out-of-fold error of 13.1 sTIL points against 6.7 and 4.5 for those with
  0.125–0.375 and more mm²; on lattice-hard, whose slides keep more stroma, one slide fell below
  (error 0.5). Read under the wide nest rule (session 21; it had read the pale rule's ``stroma_est``),
  the flagged slides' mean absolute error against the rest, out of fold: voronoi-hard 8.6 vs 3.8 (6
  slides), regions-hard 21.3 vs 10.7 (7), cells-hard 9.1 vs 5.7 (16), and on a fresh voronoi-hard
  cohort scored by the voronoi-hard model 14.3 vs 5.0 (9 slides; the pale estimate flagged 2, with
  6.0 vs 7.2). Only for features with the morphometry's column layout (the default encoder).
* ``ensemble-disagreement``: the SD of the fold members' slide scores exceeds ``max_member_sd`` =
  max(``DISAGREE_MIN_SD``, ``DISAGREE_FACTOR`` × the 99th percentile of that SD over the training
  slides). Members agree on slides like their training data and drift apart elsewhere.

A model trained before QC existed has no reference: its scores get the single flag ``no-reference``
(we cannot say the slide is fine, so the column says why it is not checked).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from weakstil.mil.qc_reference import (
    LITTLE_STROMA_MM2,
    embedding_distance,
    member_scores,
    slide_embedding,
    slide_measurements,
    stain_amounts,
    stroma_area_mm2,
)

NO_REFERENCE = "no-reference"
FLAGS = ("low-tissue", "mpp-out-of-range", "out-of-distribution", "stain-out-of-range", "measurement-out-of-range",
         "little-stroma", "ensemble-disagreement", NO_REFERENCE)


def slide_flags(reference: Mapping | None, *, n_tiles: int, mpp: float | None = None,
                embedding: np.ndarray | None = None, scores: np.ndarray | None = None,
                stain: Sequence[float] | None = None, measured: Sequence[float] | None = None,
                stroma_mm2: float | None = None) -> list[str]:
    """The flags of one slide (empty list: nothing unusual). ``scores``: the members' slide scores;
    ``stain``: its (H, E) amounts (:func:`weakstil.mil.qc_reference.stain_amounts`); ``measured``: its
    means of the measured columns, in the reference's order (:func:`~weakstil.mil.qc_reference.slide_measurements`);
    ``stroma_mm2``: its estimated stroma (:func:`~weakstil.mil.qc_reference.stroma_area_mm2`)."""
    if reference is None:
        return [NO_REFERENCE]
    limits = reference["thresholds"]
    flags = []
    if n_tiles < limits["min_tiles"]:
        flags.append(f"low-tissue({n_tiles} tiles < {limits['min_tiles']})")
    lo_hi = limits.get("mpp_range")
    if lo_hi and mpp is not None and not lo_hi[0] <= float(mpp) <= lo_hi[1]:
        flags.append(f"mpp-out-of-range({float(mpp):.3g} not in {lo_hi[0]:.3g}-{lo_hi[1]:.3g})")
    if embedding is not None:
        distance = embedding_distance(embedding, np.asarray(reference["mean"]), np.asarray(reference["std"]))
        if distance > limits["max_distance"]:
            flags.append(f"out-of-distribution(distance {distance:.2f} > {limits['max_distance']:.2f})")
    ranges = limits.get("stain_range")
    if ranges and stain is not None:
        off = [f"{name} {float(v):.2f} not in {lo:.2f}-{hi:.2f}"
               for name, v, (lo, hi) in zip(("H", "E"), stain, ranges) if not lo <= float(v) <= hi]
        if off:
            flags.append(f"stain-out-of-range({', '.join(off)})")
    bounds = limits.get("measured_range")
    if bounds and measured is not None:
        off = [f"{name} {float(v):.2f} not in {lo:.2f}-{hi:.2f}"
               for (name, (lo, hi)), v in zip(bounds.items(), measured) if not lo <= float(v) <= hi]
        if off:
            flags.append(f"measurement-out-of-range({', '.join(off)})")
    if stroma_mm2 is not None and stroma_mm2 < LITTLE_STROMA_MM2:
        flags.append(f"little-stroma({stroma_mm2:.3f} mm² < {LITTLE_STROMA_MM2:g} mm²)")
    if scores is not None and len(scores) > 1 and limits.get("max_member_sd") is not None:
        sd = float(np.std(scores, ddof=1))
        if sd > limits["max_member_sd"]:
            flags.append(f"ensemble-disagreement(SD {sd:.1f} > {limits['max_member_sd']:.1f})")
    return flags


def qc_text(flags: Sequence[str]) -> str:
    """The ``qc`` cell: flags joined with ``;`` (empty when fine)."""
    return ";".join(flags)


def flag_names(text: str) -> list[str]:
    """The flag names in a ``qc`` cell (details in parentheses dropped)."""
    return [part.split("(", 1)[0] for part in str(text or "").split(";") if part]


def check_slide(reference: Mapping | None, model, features: np.ndarray, *, mpp: float | None,
                attrs: Mapping | None = None) -> str:
    """The ``qc`` cell of one scored slide: its features (N, D) and cache ``attrs`` (its stain
    estimate) against the model's reference."""
    if reference is None:
        return qc_text([NO_REFERENCE])
    scores = member_scores(model, features) if len(model.members) > 1 else None
    columns = reference.get("training", {}).get("measured_columns") or {}
    measured = stroma_mm2 = None
    if columns and features.shape[1] >= -min(columns.values()):  # features with the morphometry's layout
        measured = slide_measurements(features, list(columns.values()))
        if "stroma_est" in columns:  # the estimate tiles.csv and top_tiles.png show (the wide nest rule's
            # where the features have it); without the encoder's fingerprint, the reference's column
            from weakstil.embed.encoders import stroma_estimate

            fingerprint = getattr(model, "fingerprint", None) or {}
            stroma = stroma_estimate(features, fingerprint.get("encoder"))  # None without the encoder
            if stroma is None:
                stroma = np.asarray(features, dtype=np.float64)[:, columns["stroma_est"]]
            stroma_mm2 = stroma_area_mm2(stroma, fingerprint.get("tiling"))
    return qc_text(slide_flags(reference, n_tiles=int(features.shape[0]), mpp=mpp,
                               embedding=slide_embedding(features), scores=scores, stain=stain_amounts(attrs),
                               measured=measured, stroma_mm2=stroma_mm2))


