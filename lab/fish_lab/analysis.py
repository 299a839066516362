"""What each run's record says about its mask (where the budget went) and about its task (the trivial baseline)."""

from __future__ import annotations

from collections import Counter

from fish_tuning.mask import FishMask

from .metrics import glue_score

TOP_LINES = 8  # concentration: share of a tensor's kept entries in its 8 most-kept rows / columns


def concentration(mask: FishMask, top: int = TOP_LINES) -> tuple[float | None, float | None]:
    """See :meth:`FishMask.concentration`."""
    return mask.concentration(top)


def mask_record(mask: FishMask) -> dict:
    """Per-layer and per-kind kept / total counts and the concentration figure, as JSON-ready lists."""
    conc, even = concentration(mask)
    return {"per_layer": [[layer, kept, total] for layer, (kept, total) in mask.per_layer().items()],
            "per_kind": [[module, kept, total] for module, (kept, total) in mask.per_module().items()],
            "concentration_top8": conc, "concentration_top8_even": even}


def trivial_baseline(metric: str, train_labels: list, eval_labels: list) -> dict:
    """Score of the prediction that ignores the input: the train set's majority class (accuracy / F1 / MCC tasks),
    or a constant (regression: no correlation, score 0)."""
    if not eval_labels:
        return {"score": None, "rule": "no labels"}
    if metric == "pearson_spearman":
        return {"score": 0.0, "rule": "constant prediction"}
    if metric not in ("accuracy", "mcc", "f1_acc"):
        return {"score": None, "rule": f"none for {metric}"}
    majority = Counter(train_labels).most_common(1)[0][0]
    return {"score": glue_score(metric, [majority] * len(eval_labels), eval_labels),
            "rule": f"majority class {majority}"}
