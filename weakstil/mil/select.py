"""Which feature columns the MIL reads, chosen on the user's cohort (``TrainConfig.columns="auto"``, ``--columns``).

A ``+stainmorph`` encoder gives each tile a network's embedding (512 numbers for ResNet-18) and the
stain morphometry (:mod:`weakstil.embed.morph`), whose last five numbers measure sTIL% itself from
the pixels: the share of the estimated stroma that is lymphocyte read by size and darkness (nuclei
wider than a lymphocyte are tumour, however dark), the same by darkness alone (strict and loose nest
rules), the share inside tumour nests, and the stroma estimate. On a small cohort with crowded nests
and varying stains the MIL can drown those in the hundreds that describe texture; on another cohort
the network's texture carries what the fixed measurements miss; and which lymphocyte reading holds
depends on how the tumour nuclei and the lymphocyte aggregates look. So training cross-validates
three candidates on the same folds (five with ``stainmorph.v7`` and later),

* ``all``: every feature column;
* ``measured``: only the five measurements (the last :data:`~weakstil.embed.encoders.MEASURED_DIM`
  columns);
* ``measured-dark``: the four that read lymphocytes by darkness alone (the last
  :data:`~weakstil.embed.encoders.DARK_MEASURED_DIM`; where lymphocytes pile into sheets the
  size-aware share misses them and only adds noise),
* ``measured-wide``, ``measured-dark-wide`` (:data:`WIDE`; v7 and v8 features): the same two with tumour
  nests marked by the wide band of nuclei (pale or moderately dense chromatin, H 0.15–1.2): the five
  columns just before the last five (``skip``). Where tumour nuclei are darker than vesicular, the
  pale rule reads their nests as stroma; where lymphocyte crowds blur, the wide rule reads them as
  nests (docs/accuracy.md, twenty-second run),

and deploys **every** candidate whose out-of-fold R² vs the labels is within one standard error of
the best's (:func:`plausible`), their models averaged: the cohort cannot tell those apart, and their
average matched or beat picking one of them on all seven benchmark cohorts (docs/accuracy.md,
twenty-fourth run: lattice-hard 0.89 → 0.92, regions-hard 0.38 → 0.41, the others equal or up to
+0.02). A fold
holds ``TrainConfig.seeds`` models in all (each set's share of the seeds, rounded up), so one set
alone keeps three seeds and three or more sets one each. Measured
on two synthetic families and a third setting with hyperchromatic tumour nuclei (docs/accuracy.md,
eighth and tenth runs). The measurements alone were chosen over all the morphometry features: those
win some cohorts' CV too, but a model on them extrapolates wildly on another generator's slides
(cells → lattice R² −0.70: the tumour-nucleus counts it leans on differ five-fold between
renderers), while ratios in 0–1 stay in range.

When the candidates are cross-validated, the ``all`` candidate's probe start weights the measurements
ten times (:data:`MEASURED_EMPHASIS`, ``TrainConfig.measured_emphasis``; resolved here because it
too depends on what the features hold).

Choosing on the same out-of-fold predictions that are reported flatters the winner a little, so
``metrics.json`` (``columns``) also carries the **cross-fitted** estimate: each fold scored by the
candidates chosen on the other folds' predictions only, as the blend and the calibration do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from weakstil.errors import ConfigError
from weakstil.mil import COLUMN_RULE, PRACTICAL_R2
from weakstil.mil.cv import CVResult, combine, cross_validate
from weakstil.mil.fit import TrainConfig, column_members, seeds_per_set

CANDIDATES = ("all", "measured", "measured-dark")
WIDE = ("measured-wide", "measured-dark-wide")  # beside CANDIDATES when the features have the wide block (v7 and later)
MEASURED_EMPHASIS = 10.0  # TrainConfig.measured_emphasis when the features end with the morphometry


def has_morphometry(fingerprint: Mapping | None, dim: int | None = None) -> bool:
    """Whether the cache (``{"encoder": …}``) has the measured columns beside a network's."""
    from weakstil.embed.encoders import has_measured_columns

    return has_measured_columns((fingerprint or {}).get("encoder"), dim)


def candidates(cfg: TrainConfig, fingerprint: Mapping | None, dim: int) -> tuple[str, ...]:
    """The column sets ``cfg.columns`` asks to cross-validate on features of this encoder."""
    from weakstil.embed.encoders import MORPH_ARCH, has_wide_columns

    available = has_morphometry(fingerprint, dim)
    wide = has_wide_columns((fingerprint or {}).get("encoder"), dim)
    if cfg.columns == "auto":
        return (CANDIDATES + WIDE if wide else CANDIDATES) if available else ("all",)
    if cfg.columns != "all" and not available:
        raise ConfigError(f"--columns {cfg.columns} reads the stain morphometry's measurements of sTIL% "
                          "beside a network's embedding, and this cache's encoder has none", fix=f"extract with a "
                          f"+stainmorph encoder ({MORPH_ARCH}, the default), or train with --columns all")
    if cfg.columns in WIDE and not wide:
        raise ConfigError(f"--columns {cfg.columns} reads the measurements under the wide nest rule, and this "
                          f"cache's morphometry is older ({(fingerprint or {}).get('encoder', {}).get('arch')})",
                          fix=f"extract again with the current encoder ({MORPH_ARCH}), or train with --columns "
                          "measured or measured-dark")
    return (cfg.columns,)


def parent_columns(state: Mapping, dim: int, *, wide: bool = False) -> str:
    """The columns a parent's weights read: the width of its first layer (LayerNorm over its inputs).
    On features with both nest rules' blocks (``wide``) a width of five or four does not say which
    rule's block: a :class:`ConfigError` that asks for the set (``weakstil train --init`` takes it
    from the parent's config.yaml, ``mil.cohort``; this is for bare weights)."""
    from weakstil.mil.fit import columns_of

    width = int(state["embed.0.weight"].shape[0])
    if width == dim:
        return "all"
    name = columns_of(width)
    if wide:
        raise ConfigError(f"the parent's weights read {width} feature columns, and these features have two "
                          f"blocks that wide ({name} and {name}-wide: the pale and the wide nest rule)",
                          fix=f"say which: columns={name!r} or {name + '-wide'!r} (`weakstil train --init MODEL` "
                              "reads it from the parent's config.yaml)")
    return name


def r2(labels, predictions) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(np.asarray(labels, np.float64), np.asarray(predictions, np.float64)))


# fewest columns first (the order the averaged sets are named and their models stored in); at equal
# width the pale nest rule's block before the wide rule's: it was chosen on more families
SIMPLEST_FIRST = ("measured-dark", "measured", "measured-dark-wide", "measured-wide", "all")


def plausible(results: Mapping[str, CVResult], mask: np.ndarray | None = None) -> tuple[str, ...]:
    """The candidates that score within one standard error of the best, or within
    :data:`PRACTICAL_R2` of it (over ``mask``'s slides), fewest columns first (:data:`SIMPLEST_FIRST`).

    The best candidate has the highest out-of-fold R² vs labels; another is as good as far as these
    slides can tell when its R² is short of the best's by less than one standard error of the
    difference — the slides' paired squared errors, so a shared hard slide cancels out (Breiman's
    one-standard-error rule) — or by less than 0.01 (where every candidate is near-perfect the
    standard error shrinks with the errors, and a difference of 0.004 is no reason to prefer one).
    The deployed model averages them all (:func:`cross_validate_columns`). Picking one of them instead
    (the fewest columns: the eighteenth to twenty-third runs) bet on a difference the cohort cannot
    show: on the seven benchmark cohorts it was never better than the average, and up to 0.04 worse
    on four (docs/accuracy.md, twenty-fourth run).
    Unknown names rank after the known, in their order.
    """
    m = slice(None) if mask is None else mask
    names = list(results)
    scores = {name: r2(cv.labels[m], cv.predictions[m]) for name, cv in results.items()}
    best = max(names, key=scores.get)
    ref = results[best]
    labels = np.asarray(ref.labels[m], np.float64)
    sq_best = (np.asarray(ref.predictions[m], np.float64) - labels) ** 2
    denom = float(((labels - labels.mean()) ** 2).mean())
    rank = {n: (SIMPLEST_FIRST.index(n) if n in SIMPLEST_FIRST else len(SIMPLEST_FIRST) + names.index(n))
            for n in names}
    keep = []
    for name in sorted(names, key=rank.get):  # the best itself passes (no difference), so one always does
        diff = (np.asarray(results[name].predictions[m], np.float64) - labels) ** 2 - sq_best
        se = diff.std(ddof=1) / np.sqrt(len(diff)) / denom if len(diff) > 1 and denom > 0 else 0.0
        if scores[name] >= scores[best] - max(se, PRACTICAL_R2):
            keep.append(name)
    return tuple(keep) or (best,)  # never empty, even should a score be NaN


def choose(results: Mapping[str, CVResult], mask: np.ndarray | None = None) -> str:
    """The :func:`plausible` candidates as one ``TrainConfig.columns`` value ("measured-dark+all")."""
    return "+".join(plausible(results, mask))


def crossfit(results: Mapping[str, CVResult]) -> tuple[np.ndarray, list[str]]:
    """Each fold's slides predicted by the candidates chosen on the other folds (the mean of their
    predictions)."""
    first = next(iter(results.values()))
    out, picks = np.empty(len(first.labels)), []
    for k in np.unique(first.folds):
        test = first.folds == k
        names = plausible(results, ~test)
        out[test] = np.mean([results[n].predictions[test] for n in names], axis=0)
        picks.append("+".join(names))
    return out, picks


@dataclass
class ColumnChoice:
    """The candidates' cross-validations and the choice among them."""

    results: dict  # name -> CVResult, same folds (one model per fold)
    chosen: str  # the sets deployed together, joined by "+"
    crossfit: np.ndarray  # each fold predicted by the candidates chosen on the other folds
    fold_choices: list

    def report(self) -> dict:
        labels = next(iter(self.results.values())).labels
        return {
            "chosen": self.chosen,
            "members": list(column_members(self.chosen)),
            "candidates": {name: {"r2": r2(labels, cv.predictions), "seconds": round(cv.seconds, 1)}
                           for name, cv in self.results.items()},
            "crossfit": {"r2": r2(labels, self.crossfit), "fold_choices": self.fold_choices},
            "note": f"the MIL's input columns: every set whose out-of-fold R² vs labels is {COLUMN_RULE} "
                    "candidate's, their models averaged (mil.select.plausible); crossfit: each fold "
                    "scored by the candidates chosen on the other folds",
        }


def cross_validate_columns(bags: Mapping[str, np.ndarray], table, cfg: TrainConfig, fingerprint: Mapping,
                           *, progress: bool = True, init_state: dict | None = None,
                           folds: np.ndarray | None = None) -> tuple[CVResult, TrainConfig, ColumnChoice | None]:
    """Cross-validate each candidate of ``cfg.columns`` on the same folds; returns the chosen one's
    result, ``cfg`` with ``columns`` resolved to it, and the choice (None with a single candidate)."""
    dim = int(np.asarray(next(iter(bags.values()))).shape[1]) if bags else 0
    if cfg.measured_emphasis is None:
        cfg = replace(cfg, measured_emphasis=MEASURED_EMPHASIS if has_morphometry(fingerprint, dim) else 1.0)
    elif cfg.measured_emphasis != 1.0 and not has_morphometry(fingerprint, dim):
        raise ConfigError("--measured-emphasis weights the stain morphometry's measurements of sTIL%, and this "
                          "cache's encoder has none", fix="leave --measured-emphasis out, or extract with a "
                          "+stainmorph encoder (the default)")
    names = candidates(cfg, fingerprint, dim)
    if init_state is not None and cfg.columns == "auto":  # a warm start keeps the parent's columns
        from weakstil.embed.encoders import has_wide_columns

        names = (parent_columns(init_state, dim, wide=has_wide_columns((fingerprint or {}).get("encoder"), dim)),)
    if len(names) == 1:
        cfg = replace(cfg, columns=names[0])
        return cross_validate(bags, table, cfg, progress=progress, init_state=init_state, folds=folds), cfg, None
    results = {}
    for name in names:  # one model per fold each: the comparison; the chosen ones get more seeds below
        results[name] = cross_validate(bags, table, replace(cfg, columns=name), progress=progress,
                                       folds=folds, title=f"cross-validation ({name})", seeds=[0])
        folds = results[name].folds  # the same folds for every candidate
    chosen = choose(results)
    honest, picks = crossfit(results)
    members = column_members(chosen)
    runs = [results[name] for name in members]
    per_set = seeds_per_set(cfg.seeds, len(members))  # cfg.seeds models per fold in all, or one per set if more
    for name in members if per_set > 1 else ():
        runs.append(cross_validate(bags, table, replace(cfg, columns=name), progress=progress, folds=folds,
                                   title=f"cross-validation ({name}, {per_set - 1} more seed{'s' * (per_set > 2)})",
                                   seeds=range(1, per_set)))
    cv = combine(runs, cfg) if len(runs) > 1 else runs[0]
    return cv, replace(cfg, columns=chosen), ColumnChoice(results, chosen, honest, picks)
