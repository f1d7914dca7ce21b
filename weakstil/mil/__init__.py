"""Multiple-instance regression on slide labels: the model (a plain nn.Module), the LightningModule
that trains it, labels, cross-validation, metrics and plots.
"""

# The rule that chooses the MIL's input columns (mil.select.choose), here so the command line's help can say it
# without importing torch: an R² difference smaller than PRACTICAL_R2 is no reason for more columns, however sure.
PRACTICAL_R2 = 0.01
COLUMN_RULE = f"within one standard error (or {PRACTICAL_R2:g}) of the best"
