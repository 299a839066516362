"""Paired comparisons over seeds (FISH - Original, FISH - rand, ...) and where the masks put the budget.

Pure Python (statistics only): `python -m fish_lab report` builds these tables from the results file alone.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from fish_tuning.commands.stats import fmt_paired, paired


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
