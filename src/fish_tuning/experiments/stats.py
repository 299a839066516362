"""Paired comparisons over seeds (FISH - Original, FISH - rand, ...) and where the masks put the budget.

Pure Python (statistics only): `fish-tune report` builds these tables from the results file alone.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (then the normal 1.96)
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def paired(diffs: list[float], higher_is_better: bool = True) -> dict:
    """Mean of paired differences, its 95% t interval (None below 2 pairs) and the sign count (``ahead``: pairs where
    the first is better: a positive difference, or a negative one when lower is better, as for a loss)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else None
    return {"n": n, "mean": mean, "lo": None if half is None else mean - half, "hi": None if half is None else mean + half,
            "ahead": sum((d > 0) if higher_is_better else (d < 0) for d in diffs),
            "behind": sum((d < 0) if higher_is_better else (d > 0) for d in diffs)}


def fmt_paired(p: dict, digits: int = 2) -> str:
    """``+1.20 [-0.40, +2.80] 4/5 ahead`` (x100 scores in, as given)."""
    if not p["n"]:
        return "-"
    ci = f" [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]" if p["lo"] is not None else ""
    ties = p["n"] - p["ahead"] - p["behind"]
    return f"{p['mean']:+.{digits}f}{ci} {p['ahead']}/{p['n']} ahead" + (f" ({ties} tied)" if ties else "")


def _scores(records: list[dict], value: str = "score") -> dict[tuple, dict[str, dict[int, float]]]:
    """(method, budget, strategy) -> task -> seed -> score x100 (or the final dev loss)."""
    out: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        v = 100 * r["score"] if value == "score" else r["epochs"][-1]["dev_loss"]
        out[(r["method"], r["budget"], r["strategy"])][r["task"]][r["seed"]] = v
    return out


def comparisons(records: list[dict]) -> list[tuple[tuple, tuple]]:
    """Pairs (a, b), each (method, budget, strategy), compared as a - b at one budget: every masked strategy against
    the Original of that budget (fixed_proportion) or the dense Original (fixed_layers), fish against rand, and every
    other strategy against fish."""
    keys = sorted({(r["method"], r["budget"], r["strategy"]) for r in records}, key=lambda k: (k[0], -k[1], k[2]))
    have = set(keys)
    pairs = []
    for method, budget, strategy in keys:
        if strategy == "original":
            continue
        orig = (method, budget if (method, budget, "original") in have else 1.0, "original")
        if orig in have:
            pairs.append(((method, budget, strategy), orig))
        if strategy == "fish" and (method, budget, "rand") in have:
            pairs.append(((method, budget, "fish"), (method, budget, "rand")))
        if strategy not in ("fish", "rand", "rev") and (method, budget, "fish") in have:
            pairs.append(((method, budget, strategy), (method, budget, "fish")))
    return pairs


def paired_table(records: list[dict], label, tasks: list[str], task_names: dict, counted: list[str],
                 value: str = "score") -> str:
    """Markdown: one row per comparison, one column per task and the average over ``counted`` tasks; each cell the
    mean paired difference over seeds (scores x100, or the final dev loss: ``value="dev_loss"``, lower is better)
    with its 95% t interval and on how many seeds the first one is ahead."""
    scores = _scores(records, value)
    loss = value == "dev_loss"
    head = ["a − b (paired over seeds, " + ("final dev loss)" if loss else "x100)"),
            *[task_names.get(t, t) for t in tasks]]
    if len(counted) > 1:
        head.append("Avg of " + ", ".join(task_names.get(t, t).split(" ")[0] for t in counted))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b in comparisons(records):
        cells = [f"{label(a)} − {label(b)}"]
        per_task = {}
        for t in tasks:
            seeds = sorted(set(scores[a][t]) & set(scores[b][t]))
            per_task[t] = {s: scores[a][t][s] - scores[b][t][s] for s in seeds}
            cells.append(fmt_paired(paired(list(per_task[t].values()), not loss), 3 if loss else 2))
        if len(counted) > 1:
            common = set.intersection(*(set(per_task[t]) for t in counted))
            cells.append(fmt_paired(paired([statistics.fmean(per_task[t][s] for t in counted)
                                            for s in sorted(common)], not loss), 3 if loss else 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mask_table(records: list[dict], label) -> str:
    """Where each masked strategy put its budget (mean over tasks and seeds): share of the kept entries per layer and
    the top-8 concentration (share of a tensor's kept entries in its 8 most-kept rows / columns; 'even' = the same
    share for a perfectly even spread)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("mask"):
            groups[(r["method"], r["budget"], r["strategy"])].append(r["mask"])
    if not groups:
        return ""
    layers = sorted({row[0] for ms in groups.values() for m in ms for row in m["per_layer"] if row[0] is not None})
    head = ["strategy", *[f"layer {i}" for i in layers], "top-8 concentration", "even spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(groups, key=lambda k: (k[0], -k[1], k[2])):
        ms = groups[key]
        cells = [label(key)]
        for i in layers:
            shares = [sum(kept for layer, kept, _ in m["per_layer"] if layer == i) /
                      max(1, sum(kept for _, kept, _ in m["per_layer"])) for m in ms]
            cells.append(f"{100 * statistics.fmean(shares):.1f}%")
        for field in ("concentration_top8", "concentration_top8_even"):
            vals = [m[field] for m in ms if m.get(field) is not None]
            cells.append(f"{100 * statistics.fmean(vals):.1f}%" if vals else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
