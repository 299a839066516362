"""The paper's GLUE-6 metrics (scikit-learn / scipy; no `evaluate`, which downloads from the hub)."""

from __future__ import annotations

import numpy as np


def glue_score(metric: str, preds, labels) -> float:
    """One number per task, in [-1, 1] or [0, 1], as the paper reports it (x100 in tables)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if metric == "accuracy":
        return float((preds == labels).mean())
    if metric == "mcc":
        from sklearn.metrics import matthews_corrcoef

        return float(matthews_corrcoef(labels, preds))
    if metric == "f1_acc":
        from sklearn.metrics import f1_score

        return float((f1_score(labels, preds) + (preds == labels).mean()) / 2)
    if metric == "pearson_spearman":
        from scipy.stats import pearsonr, spearmanr

        if np.std(preds) == 0:
            return 0.0  # a constant prediction has no correlation (scipy would warn and return nan)
        return float((pearsonr(preds, labels)[0] + spearmanr(preds, labels)[0]) / 2)
    raise ValueError(f"unknown metric {metric!r}")
