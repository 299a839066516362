"""The report of `fish-tune compare`: mean ± std per arm, paired differences over seeds with 95 % intervals and
sign counts, the trivial baseline, where each mask put its budget, wall time, and a recommendation in words.

Built from the results file alone (``results.jsonl``), so it can be rebuilt after any interrupted run.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from .stats import fmt_paired, paired, significant

# the headline metric, by preference; eval_score is `fish-tune train`'s task metric when it writes one
METRICS = ("eval_score", "eval_accuracy", "eval_pearson", "eval_loss")


def pick_metric(records: list[dict]) -> tuple[str, bool]:
    """(the metric every record has, higher is better)."""
    for name in METRICS:
        if records and all(name in r.get("eval", {}) for r in records):
            return name, name != "eval_loss"
    raise ValueError("the runs wrote no common evaluation metric (eval_results.json); was there validation data?")


def _value(r: dict, metric: str, higher: bool) -> float:
    v = float(r["eval"][metric])
    return 100 * v if higher else v


def trivial(records: list[dict], metric: str, higher: bool) -> float | None:
    """The trivial baseline (majority class / constant predictor) on the scored data, on the report's scale."""
    key = metric.replace("eval_", "eval_trivial_", 1)
    vals = [r["eval"][key] for r in records if key in r.get("eval", {})]
    if not vals and metric == "eval_accuracy":
        vals = [r["trivial_fallback"] for r in records if r.get("trivial_fallback") is not None]
    if not vals:
        return None
    return 100 * vals[0] if higher else vals[0]


def _group(records: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for r in records:
        out[(r["arm"], r["budget"])][r["seed"]] = r
    return out


def _label(arm: str, budget: str, runs: dict[int, dict]) -> str:
    entries = next(iter(runs.values())).get("entries")
    if arm == "original":
        return f"original (dense LoRA {budget}, {entries:,} entries)" if entries else f"original {budget}"
    return f"{arm} @ {entries:,}" if entries else f"{arm} @ {budget}"


def pairs(groups: dict) -> list[tuple[tuple, tuple]]:
    """(a, b) compared as a − b: every masked arm against the original of its budget (rN) or the smallest one,
    fish against rand, and every other masked arm against fish, at one budget."""
    originals = sorted((k for k in groups if k[0] == "original"), key=lambda k: int(k[1][1:]))
    out = []
    for arm, budget in groups:
        if arm == "original":
            continue
        ref = ("original", budget) if ("original", budget) in groups else (originals[0] if originals else None)
        if ref:
            out.append(((arm, budget), ref))
        if arm == "fish" and ("rand", budget) in groups:
            out.append(((arm, budget), ("rand", budget)))
        if arm not in ("fish", "rand") and ("fish", budget) in groups:
            out.append(((arm, budget), ("fish", budget)))
    return out


def _diff(groups, a, b, metric, higher) -> dict:
    seeds = sorted(set(groups[a]) & set(groups[b]))
    return paired([_value(groups[a][s], metric, higher) - _value(groups[b][s], metric, higher) for s in seeds],
                  higher)


def _runtime(runs: dict[int, dict]) -> str:
    """Mean wall seconds of a run (load, Fisher, train, evaluate), with the train / Fisher parts when recorded."""
    text = f"{statistics.fmean(r.get('wall_s', 0) for r in runs.values()):.1f}"
    parts = [f"{what} {statistics.fmean(r['train'][key] for r in runs.values()):.1f}"
             for key, what in (("train_runtime", "train"), ("fisher_runtime", "Fisher"))
             if all(key in r.get("train", {}) for r in runs.values())]
    return text + (f" ({', '.join(parts)})" if parts else "")


def score_table(groups, metric, higher, base) -> list[str]:
    name = {"eval_score": "score (the task's headline metric)"}.get(metric, metric.removeprefix("eval_"))
    name += " x100" if higher else " (lower is better)"
    digits = 2 if higher else 4
    lines = [f"| arm | trainable PEFT entries | seeds | {name}: mean ± std | wall s per run |", "|---|---|---|---|---|"]
    if base is not None:
        lines.append(f"| trivial baseline (majority class / constant) | 0 | - | {base:.2f} | - |")
    for key in sorted(groups, key=lambda k: (k[0] != "original", k[1], k[0])):
        runs = groups[key]
        vals = [_value(r, metric, higher) for r in runs.values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        entries = next(iter(runs.values())).get("entries")
        lines.append(f"| {_label(*key, runs)} | {f'{entries:,}' if entries else '-'} | {len(vals)} | "
                     f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f} | {_runtime(runs)} |")
    return lines


def placement_table(groups) -> list[str]:
    """Share of each mask's kept entries per layer (mean over seeds); '-' collects tensors outside the layers."""
    masked = {k: v for k, v in groups.items() if k[0] != "original" and any(r.get("per_layer") for r in v.values())}
    if not masked:
        return []
    layers = sorted({str(row[0]) for runs in masked.values() for r in runs.values() for row in r["per_layer"]},
                    key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0))
    lines = ["| arm | " + " | ".join(f"layer {x}" for x in layers) + " |", "|---|" + "---|" * len(layers)]
    for key in sorted(masked, key=lambda k: (k[1], k[0])):
        cells = []
        for x in layers:
            shares = [sum(kept for lay, kept, _ in r["per_layer"] if str(lay) == x) /
                      max(1, sum(kept for _, kept, _ in r["per_layer"])) for r in masked[key].values()]
            cells.append(f"{100 * statistics.fmean(shares):.1f}%")
        lines.append(f"| {_label(*key, masked[key])} | " + " | ".join(cells) + " |")
    return lines


def recommendation(groups, metric, higher, base, one_rate: bool = True) -> list[str]:
    """Per budget: the best arm against the runner-up and against plain LoRA, in words."""
    out = []
    unit = "points" if higher else "in loss"
    for budget in sorted({k[1] for k in groups if k[0] != "original"}):
        keys = [k for k in groups if k[1] == budget and k[0] != "original"]
        ref = next((p[1] for p in pairs(groups) if p[0] in keys and p[1][0] == "original"), None)
        keys += [ref] if ref else []
        mean = {k: statistics.fmean(_value(r, metric, higher) for r in groups[k].values()) for k in keys}
        ranked = sorted(keys, key=lambda k: -mean[k] if higher else mean[k])
        best = ranked[0]
        entries = next(iter(groups[best].values())).get("entries")
        where = f"at {entries:,} entries" if entries and best[0] != "original" else f"at budget {budget}"
        if len(ranked) < 2:
            out.append(f"- {where}: only {best[0]} ran; nothing to compare.")
            continue
        for other in [ranked[1]] + ([ref] if ref and ref not in (best, ranked[1]) else []):
            p = _diff(groups, best, other, metric, higher)
            verdict = ("significant (the 95 % interval excludes 0)" if significant(p) else
                       "not significant (the 95 % interval includes 0)" if p["lo"] is not None else
                       "one seed only: no interval; run more seeds")
            digits = 2 if higher else 4
            gap = round(abs(p["mean"]), digits) > 0
            what = f"beats {other[0]} by {abs(p['mean']):.{digits}f} {unit}" if gap else f"ties with {other[0]}"
            out.append(f"- {where} on this data, **{best[0]}** {what} ({fmt_paired(p, digits)}); {verdict}.")
        if base is not None and higher and mean[best] - base < 1.0:
            out.append(f"- the best arm is within 1 point of the trivial baseline ({base:.2f}): nothing learned "
                       "much here; train longer (--max_steps / --num_train_epochs) or raise --learning_rate.")
    if one_rate:
        out.append("- Each arm ran at one --learning_rate; sparse masks often want 3-10x the dense adapter's rate, "
                   "so before trusting a gap, compare at each arm's own rate (--arm_learning_rates) chosen with "
                   "--holdout (never on the validation data).")
    return out


def rates_words(rates: dict[str, float]) -> str:
    """'every arm at learning rate 0.01', or each arm's own rate (``rates``: arm -> its rate)."""
    if len(set(rates.values())) == 1:
        return f"every arm at learning rate {next(iter(rates.values()))}"
    return "learning rate per arm: " + ", ".join(f"{arm} {rate}" for arm, rate in rates.items())


def report(records: list[dict]) -> str:
    if not records:
        return "no finished runs yet"
    metric, higher = pick_metric(records)
    groups = _group(records)
    base = trivial(records, metric, higher)
    first = records[0]
    rates = {r["arm"]: r.get("learning_rate") for r in records}
    pool = next((r for r in records if r["arm"] != "original"), {})
    scales = sorted({f"{r['lora_alpha']}/{r['lora_r']}" for r in records if r.get("lora_alpha")})
    lines = ["# fish-tune compare", "",
             f"{first['task']}, scored on {first.get('scored_on', 'the validation data')}; {rates_words(rates)}; "
             f"masked arms select from the rank-{pool.get('lora_r')} adapter's "
             f"entries; LoRA scale alpha/r {' and '.join(scales) or '-'} (the original keeps the pool's scale); the "
             "classifier head, if any, trains fully in every arm and is not counted.", "",
             *score_table(groups, metric, higher, base), "",
             "Paired over seeds (a − b, 95 % t interval, seeds where a is ahead):", "",
             "| a − b | difference |", "|---|---|"]
    for a, b in pairs(groups):
        lines.append(f"| {_label(*a, groups[a])} − {_label(*b, groups[b])} | "
                     f"{fmt_paired(_diff(groups, a, b, metric, higher), 2 if higher else 4)} |")
    placement = placement_table(groups)
    if placement:
        lines += ["", "Where each mask put its budget (share of kept entries per layer, mean over seeds):", "",
                  *placement]
    one_rate = len(set(rates.values())) == 1
    lines += ["", "Recommendation:", "", *recommendation(groups, metric, higher, base, one_rate)]
    return "\n".join(lines) + "\n"
