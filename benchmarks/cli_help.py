"""`fish-tune train --help` wall time: built from the full HfArgumentParser (no cache) against the cached text.

    python benchmarks/cli_help.py [--rounds 3]    # writes benchmarks/results/cli_help.json and prints the table

Each round runs, in fresh processes and alternating, the command with an empty cache (which builds and stores
the text) and then with that cache (the next call a user makes). `python -m fish_tuning` from this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = OUT = ROOT / "benchmarks" / "results" / "cli_help.json"


def once(cache: str) -> float:
    env = {**os.environ, "FISH_CACHE": cache, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fish_tuning", "train", "--help"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    cold, warm = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(once(cache))
            warm.append(once(cache))
    result = {"cold_s": cold, "cached_s": warm, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
              "shared with other jobs", "python": platform.python_version()}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))


def markdown_report(path: str) -> str:
    return report(json.loads(Path(path).read_text()))


def report(result: dict) -> str:
    rows = ["| `fish-tune train --help` | " + " | ".join(f"{v:.1f} s" for v in result["cold_s"]) + " |",
            "| the same, cached | " + " | ".join(f"{v:.1f} s" for v in result["cached_s"]) + " |"]
    head = "| measured | " + " | ".join(f"run {i + 1}" for i in range(len(result["cold_s"]))) + " |"
    return "\n".join([head, "|---|" + "---|" * len(result["cold_s"]), *rows])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        print(markdown_report(str(RESULTS)))
    else:
        main()
