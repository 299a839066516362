"""Complete a study whose lease stopped part-way with whole blocks re-run elsewhere, never mixing machines in a pair.

A block is every strategy of one (task, method, mode, budget, seed): the runs a paired comparison reads together.
The same run lands differently on two machines (benchmarks/replicate.py: about a seed's worth), so a block is taken
whole from one file: from ``base`` when it is complete there, else from the first ``fill`` file where it is complete,
else the part ``base`` has. Seeds may then come from different machines; each paired difference stays within one.

    python benchmarks/fill_blocks.py benchmarks/results/equal_budget_gpu.jsonl \
        benchmarks/results/equal_budget_cpu_blocks.jsonl --out benchmarks/results/equal_budget_5seeds.jsonl
    python -m fish_lab report benchmarks/results/equal_budget_5seeds.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path


def load(path: str) -> list[dict]:
    """The records of a `python -m fish_lab compare` results file; anything else is refused with its name."""
    try:
        records = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as err:
        raise SystemExit(f"{path}: not a readable JSONL results file ({err})") from None
    keys = {"task", "method", "mode", "budget", "seed", "strategy", "config"}
    if not records or any(not keys <= set(r) for r in records):
        raise SystemExit(f"{path}: not a `python -m fish_lab compare` results file (each line needs {sorted(keys)})")
    return records


def blocks(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        out[r["task"], r["method"], r["mode"], r["budget"], r["seed"]][r["strategy"]] = r
    return out


def combine(base: list[dict], fills: list[list[dict]]) -> tuple[list[dict], list[str]]:
    """The combined records, and one line per block not taken whole from ``base``."""
    strategies = {s for r in base for s in r["config"]["strategies"]}
    b, fs = blocks(base), [blocks(f) for f in fills]
    out, notes = [], []
    for key in sorted(set(b).union(*fs), key=str):
        have = b.get(key, {})
        if strategies <= set(have):
            out += have.values()
            continue
        src = next(((i, f[key]) for i, f in enumerate(fs) if strategies <= set(f.get(key, {}))), None)
        if src is None:
            out += have.values()
            notes.append(f"{key}: incomplete ({len(have)} of {len(strategies)} runs), nothing to fill it with")
            continue
        runs = [src[1][s] for s in sorted(strategies)]
        out += runs
        notes.append(f"{key}: whole block from fill file {src[0] + 1} ({runs[0]['device']}), "
                     f"replacing {len(have)} of {len(strategies)} runs")
    return out, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("fill", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in [args.base, *args.fill]}:
        raise SystemExit(f"--out {out} is one of the inputs; name a new file")
    if not out.parent.is_dir():
        raise SystemExit(f"--out {out}: folder {out.parent} does not exist; create it or name another")
    records, notes = combine(load(args.base), [load(p) for p in args.fill])
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out)  # never a half-written results file
    print("\n".join(notes))
    print(f"{out}: {len(records)} runs")


if __name__ == "__main__":
    main()
