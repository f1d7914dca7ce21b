"""Multiple-instance regression on slide labels: the model (a plain nn.Module), the LightningModule
that trains it, labels, cross-validation, metrics and plots.
"""

# The rule that chooses the MIL's input columns (mil.select.plausible), here so the command line's help can say it
# without importing torch: an R² difference smaller than PRACTICAL_R2 does not tell two column sets apart.
PRACTICAL_R2 = 0.01
COLUMN_RULE = f"within one standard error (or {PRACTICAL_R2:g}) of the best"
# The stroma prior's floor (mil.model.stroma_log_weight), here for the same reason: the pooling weight of a tile
# estimated to hold no stroma, beside 1 + the floor for a tile of all stroma. 0.02 since the thirty-fifth accuracy
# run (docs/accuracy.md; 0.1 before, which models saved without "stroma_floor" in their config keep).
STROMA_FLOOR = 0.02


def column_choice_phrase(columns: dict) -> str:
    """How metrics.json's ``columns`` section was chosen, in words: every set within the rule,
    averaged (``members``, since the twenty-fourth benchmark run), or the fewest columns (models
    trained before it)."""
    if "members" in columns:
        n = len(columns["members"])
        return f"{'the average of the ' + str(n) + ' sets' if n > 1 else 'the one set'} {COLUMN_RULE}"
    return f"the fewest {COLUMN_RULE}"
