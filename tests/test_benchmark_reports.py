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
    ("refresh_cost", ["**1.002x**", "**1.003x**", "13,824"]),
    ("cli_help", ["6.5 s", "2.5 s"]),
])
def test_report_rebuilds_the_benchmarks_table(name, figures):
    module = load(name)
    out = module.markdown_report(str(module.RESULTS))
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert len(rows) >= 4 and all(f in out for f in figures), out
    doc = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    missing = [r for r in rows if r not in doc]
    assert not missing, f"rows of `benchmarks/{name}.py --report` not in BENCHMARKS.md: {missing}"


def _rec(seed, strategy, device, budget=1, task="sst2"):
    return {"task": task, "method": "lora", "mode": "fixed_proportion", "budget": budget, "seed": seed,
            "strategy": strategy, "device": device, "score": 0.5, "config": {"strategies": ["original", "fish"]}}


def test_fill_blocks_takes_each_block_whole_from_one_machine(tmp_path):
    fill_blocks = load("fill_blocks")
    base = [_rec(0, "original", "gpu"), _rec(0, "fish", "gpu"),  # complete: kept
            _rec(1, "original", "gpu"),                           # incomplete, complete in the fill: replaced whole
            _rec(2, "fish", "gpu")]                               # incomplete everywhere: kept as it is
    fill = [_rec(0, "original", "cpu"), _rec(0, "fish", "cpu"), _rec(1, "original", "cpu"),
            _rec(1, "fish", "cpu"), _rec(2, "original", "cpu")]
    out, notes = fill_blocks.combine(base, [fill])
    got = {(r["seed"], r["strategy"]): r["device"] for r in out}
    assert got == {(0, "original"): "gpu", (0, "fish"): "gpu", (1, "original"): "cpu", (1, "fish"): "cpu",
                   (2, "fish"): "gpu"}
    assert len(notes) == 2 and "replacing 1 of 2" in notes[0] and "incomplete (1 of 2" in notes[1]


def test_fill_blocks_refuses_to_overwrite_an_input(tmp_path, monkeypatch, capsys):
    fill_blocks = load("fill_blocks")
    src = tmp_path / "a.jsonl"
    src.write_text('{"x": 1}\n')
    monkeypatch.setattr("sys.argv", ["fill_blocks", str(src), str(src), "--out", str(src)])
    with pytest.raises(SystemExit, match="one of the inputs"):
        fill_blocks.main()
    assert src.read_text() == '{"x": 1}\n'
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr("sys.argv", ["fill_blocks", str(src), str(src), "--out", str(out)])
    with pytest.raises(SystemExit, match="not a `python -m fish_lab compare` results file"):
        fill_blocks.main()
    assert not out.exists()


def _tables(markdown: str) -> list[list[str]]:
    blocks, cur = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks


@pytest.mark.parametrize("results", ["equal_budget_5seeds.jsonl", "equal_budget_dora.jsonl"])
def test_equal_budget_tables_in_benchmarks_are_what_the_saved_results_give(results, tmp_path):
    """The score table and the paired-difference table that BENCHMARKS.md quotes come out of `python -m fish_lab report`
    on the saved results file as they stand there, row for row."""
    from fish_lab.report import write_report

    md = write_report(ROOT / "benchmarks" / "results" / results, tmp_path)["table"].read_text()
    tables = _tables(md)
    scores = tables[0]
    paired = next(t for t in tables if t[0].startswith("| a − b"))
    doc = set((ROOT / "BENCHMARKS.md").read_text().splitlines())
    missing = [r for r in scores + paired if r not in doc]
    assert len(scores) > 4 and len(paired) > 3 and not missing, f"{results}: rows not in BENCHMARKS.md: {missing}"


def test_selection_study_report_is_in_benchmarks_and_the_demo_uses_the_screened_rates():
    """The screening and confirmation tables of BENCHMARKS.md are what `benchmarks/selection_study.py report` /
    `confirm` print from the saved files, and `make demo` runs every arm at the rate SST-2's held-out screening chose for it (never dev)."""
    import yaml

    module = load("selection_study")
    out = "\n".join([module.report(), module.confirm_report(), module.confirm_report("confirm_dora_*.jsonl"),
                     module.regrow_report()])
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 30, out
    doc = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    missing = [r for r in rows if r not in doc]
    assert not missing, f"rows of `benchmarks/selection_study.py report` not in BENCHMARKS.md: {missing}"
    rates = module.best_rates(module._task_records("sweep_*.jsonl"))["sst2"]
    demo = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    for arm, by_budget in demo["lr_by_arm"].items():
        assert by_budget == {b: rates[arm][b] for b in by_budget}, arm


@pytest.mark.parametrize("results, section", [
    ("compare_sst2_demo_5seeds.jsonl", "## `make demo` on five seeds"),
    ("compare_stsb_5seeds.jsonl", "## The same on STS-B: five seeds"),
    ("compare_sst2_own_path.jsonl", "## `fish-tune compare` on the user's path"),
])
def test_compare_sections_are_what_the_saved_compare_records_give(results, section):
    """Every mean ± std and every paired interval that the `fish-tune compare` report of a saved results file prints
    (`python benchmarks/compare_report.py FILE`) is in its BENCHMARKS.md section."""
    import re

    from fish_tuning.commands.compare import read_records
    from fish_tuning.commands.compare_report import report

    out = report(read_records(ROOT / "benchmarks" / "results" / results))
    text = (ROOT / "BENCHMARKS.md").read_text().split(section, 1)[1].split("\n## ", 1)[0]
    figures = re.findall(r"\d+\.\d+ ± \d+\.\d+|[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", out)
    assert len(figures) >= 6, out
    missing = [f for f in figures if f.replace("-", "−") not in text and f not in text]
    assert not missing, missing
