"""How far the same run lands on two machines: runs of two `python -m fish_lab compare` results files with the same id.

The GPU study (`equal_budget_gpu.jsonl`, an H200, MiniLM's weights rounded to float16) and the CPU study
(`equal_budget.jsonl`, float32) share their run ids. Same seed, data order, mask rule and lr: what differs is float
rounding, and training amplifies it. This prints how big that is next to the seed-to-seed spread, which says how
much one run can be trusted and why the studies compare strategies paired within one machine, never across.

    python benchmarks/replicate.py benchmarks/results/equal_budget.jsonl benchmarks/results/equal_budget_gpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def load(path: str) -> dict[str, dict]:
    return {r["id"]: r for r in (json.loads(x) for x in Path(path).read_text().splitlines() if x.strip())
            if r.get("id")}


def seed_spread(runs: dict[str, dict]) -> float:
    """Mean over (task, budget, strategy) of the std over seeds, x100: the noise a paired design removes."""
    groups = defaultdict(list)
    for r in runs.values():
        groups[r["task"], r["budget"], r["strategy"]].append(100 * r["score"])
    return statistics.mean(statistics.stdev(v) for v in groups.values() if len(v) > 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    a, b = load(args.a), load(args.b)
    both = sorted(set(a) & set(b))
    if not both:
        raise SystemExit("no run id is in both files")
    diff = [100 * (b[i]["score"] - a[i]["score"]) for i in both]
    by_task = defaultdict(list)
    for i, d in zip(both, diff):
        by_task[a[i]["task"]].append(abs(d))
    print("| runs in both | mean b − a | mean abs | largest abs | per task mean abs | seed std in b |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(both)} | {statistics.mean(diff):+.2f} | {statistics.mean(map(abs, diff)):.2f} | "
          f"{max(map(abs, diff)):.2f} | "
          f"{', '.join(f'{t} {statistics.mean(v):.2f} ({len(v)})' for t, v in sorted(by_task.items()))} | "
          f"{seed_spread(b):.2f} |")


if __name__ == "__main__":
    main()
