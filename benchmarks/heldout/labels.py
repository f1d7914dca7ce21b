"""Per-slide target sTIL and the noisy pathologist label."""

from __future__ import annotations

import numpy as np


def draw_target(rng):
    """Target sTIL %: 72 % lognormal (median 4.5, σlog 0.75), 28 % 12 + 78·Beta(1, 2); clipped 0.5-90."""
    if rng.random() < 0.72:
        t = float(np.exp(rng.normal(np.log(4.5), 0.75)))
    else:
        t = float(12 + 78 * rng.beta(1.0, 2.0))
    return float(np.clip(t, 0.5, 90))


def pathologist_label(rng, t):
    """Label for true sTIL ``t``: t + N(0, 1 + 0.15 t); 5 % gross errors (×/÷ 1.5-2); rounded under 10
    to 1 (55 %) or 5, above to 5 (60 %) or 10; a 0 with t ≥ 0.5 becomes 1; clipped 0-100."""
    sd = 1.0 + 0.15 * t
    est = t + rng.normal(0, sd)
    if rng.random() < 0.05:
        f = rng.uniform(1.5, 2.0)
        est = t * f if rng.random() < 0.5 else t / f
    est = max(est, 0.0)
    if est < 10:
        step = 1 if rng.random() < 0.55 else 5
    else:
        step = 5 if rng.random() < 0.6 else 10
    lab = step * round(est / step)
    if lab == 0 and t >= 0.5:
        lab = 1
    return float(np.clip(lab, 0, 100))
