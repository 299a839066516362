"""``--report`` of the benchmark scripts: BENCHMARKS.md's tables are rebuilt from the saved results files, so every
figure in them is regenerable by one command. Each printed table row must appear verbatim in BENCHMARKS.md."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, figures", [
    ("fisher_engines", ["1.14x", "1.34", "1.24x", "117,504"]),
    ("sharded", ["**1.48**", "**0.90**", "1.65 / 1.39 / 1.03", "65,536"]),
])
def test_report_rebuilds_the_benchmarks_table(name, figures):
    module = load(name)
    out = module.markdown_report(str(module.RESULTS))
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) >= 6 and all(f in out for f in figures), out
    doc = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    missing = [r for r in rows if r not in doc]
    assert not missing, f"rows of `benchmarks/{name}.py --report` not in BENCHMARKS.md: {missing}"
