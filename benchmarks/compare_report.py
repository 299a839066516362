"""Print the `fish-tune compare` report (mean ± std, paired differences, mask placement, recommendation) of a saved
results file, without rerunning anything:

    python benchmarks/compare_report.py benchmarks/results/compare_sst2_own_path.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fish_tuning.commands.compare import read_records  # noqa: E402
from fish_tuning.commands.compare_report import report  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/compare_report.py RESULTS.jsonl")
    print(report(read_records(Path(sys.argv[1]))), end="")
