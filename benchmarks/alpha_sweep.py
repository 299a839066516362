"""Choose fish_balanced's alpha on held-out train (issue 16): one `python -m fish_lab compare` results file per alpha.

Each file holds fish_balanced runs of configs/equal_budget.yaml scored on 1,000 held-out train examples
(`train.holdout_examples=1000`), never on dev. One command per alpha and seed made them (alpha 0, 0.5, 1; seeds 0, 1):

    python -m fish_lab compare --no-report configs/equal_budget.yaml name=fish_balanced_alpha_a0.5 "tasks=[stsb,sst2]" \\
        "seeds=[0]" "strategies=[fish_balanced]" train.holdout_examples=1000 "select_kwargs={fish_balanced: {alpha: 0.5}}"
    python benchmarks/alpha_sweep.py            # the table and the choice

The rule: the alpha with the best mean over the (task, budget, seed) cells every alpha has; it replaces the library's
default only if its paired 95% t interval against the default, over the cells both have, excludes 0.

Only (task, budget, seed) cells that every alpha has are compared, so the means are paired.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
from pathlib import Path

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fish_tuning.selection import select_mask  # noqa: E402  (the library's default alpha)

RESULTS = Path(__file__).resolve().parent / "results"


def load(pattern: str = "fish_balanced_alpha_a*.jsonl") -> dict[float, dict[tuple, float]]:
    out: dict[float, dict[tuple, float]] = {}
    for f in sorted(RESULTS.glob(pattern)):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if r.get("eval_split") != "holdout":
                    raise SystemExit(f"{f.name}: run {r['id']} was scored on {r.get('eval_split')}, not held-out train")
                alpha = float(r["select_kwargs"]["alpha"])
                out.setdefault(alpha, {})[r["task"], r["budget"], r["seed"]] = 100 * r["score"]
    return out


def main() -> int:
    runs = load()
    if not runs:
        print("no fish_balanced_alpha_a*.jsonl results yet")
        return 1
    alphas = sorted(runs)
    every = sorted(set.union(*(set(v) for v in runs.values())))
    print("| task | budget | seed | " + " | ".join(f"alpha {a:g}" for a in alphas) + " |")
    print("|---|---|---|" + "---|" * len(alphas))
    for c in every:
        print(f"| {c[0]} | {c[1]:g} | {c[2]} | " + " | ".join(
            f"{runs[a][c]:.2f}" if c in runs[a] else "-" for a in alphas) + " |")
    cells = sorted(set.intersection(*(set(v) for v in runs.values())))
    if not cells:
        print("\nno (task, budget, seed) is done for every alpha yet")
        return 1
    means = {a: statistics.mean(runs[a][c] for c in cells) for a in alphas}
    print("| **mean over the cells every alpha has** | | | " + " | ".join(f"**{means[a]:.2f}**" for a in alphas) + " |")
    best = max(alphas, key=lambda a: means[a])
    print(f"\nBest mean held-out score over the {len(cells)} cells every alpha has: alpha {best:g}.")
    default = inspect.signature(select_mask).parameters["alpha"].default
    if best != default and default in runs:
        both = sorted(set(runs[default]) & set(runs[best]))
        d = [runs[best][c] - runs[default][c] for c in both]
        half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf")
        keep = statistics.mean(d) - half <= 0
        print(f"alpha {best:g} − the default {default:g}: {statistics.mean(d):+.2f} "
              f"[{statistics.mean(d) - half:+.2f}, {statistics.mean(d) + half:+.2f}] over {len(d)} cells: "
              + ("the interval includes 0, so the default stays." if keep else f"alpha {best:g} becomes the default."))
    for a in alphas:
        if a != best:
            both = sorted(set(runs[a]) & set(runs[best]))
            d = [runs[best][c] - runs[a][c] for c in both]
            print(f"alpha {best:g} − alpha {a:g}, paired over the {len(both)} cells both have: "
                  f"{statistics.mean(d):+.2f} points, ahead in {sum(x > 0 for x in d)} of {len(d)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
