"""Multiple-instance regression on slide labels: the model (a plain nn.Module), the LightningModule
that trains it, labels, cross-validation, metrics and plots.
"""
