"""`python -m fish_lab report` for equal-budget studies: trivial baseline row, average without excluded tasks, paired
differences over seeds with t intervals and sign counts, where the masks put the budget."""

from __future__ import annotations

import json
import math

import pytest

from fish_lab.cli import main
from fish_lab.stats import comparisons, fmt_paired, paired


def _rec(task: str, budget: int, strategy: str, seed: int, score: float, rank: int) -> dict:
    mask = None
    if strategy != "original":
        mask = {"per_layer": [[0, 10, 100], [1, 30, 100]], "per_kind": [], "concentration_top8": 0.4,
                "concentration_top8_even": 0.02}
    return {"id": f"{task}|lora|fixed_proportion|{budget}|{strategy}|{seed}", "task": task, "method": "lora",
            "mode": "fixed_proportion", "budget": budget, "strategy": strategy, "seed": seed, "score": score,
            "rank": rank, "epochs": [{"epoch": 1, "train_loss": 0.5, "dev_loss": 0.4, "dev_score": score}],
            "trainable": {"peft": 40, "candidates": 200, "always_train": 2, "base_params": 1000, "proportion": 0.04},
            "trivial": {"score": 0.5 if task == "rte" else 0.0, "rule": "majority class 0"}, "mask": mask,
            "wall_seconds": 60.0, "finished": 1000.0 + 3600 * seed, "model": "minilm",
            "config": {"train": {"epochs": 1, "holdout_examples": None}, "average_excludes": ["wnli"]}}


def _study(tmp_path):
    records = []
    for seed in range(3):
        for task in ("rte", "stsb", "wnli"):
            base = {"rte": 0.6, "stsb": 0.8, "wnli": 0.5}[task] + 0.01 * seed
            records += [_rec(task, 1, "original", seed, base, 1),
                        _rec(task, 1, "fish", seed, base + 0.02 * (seed + 1), 8),  # ahead by 2, 4, 6 points
                        _rec(task, 1, "rand", seed, base - 0.05, 8)]
    # wnli: fish behind original on every seed; it must not enter the average
    for r in records:
        if r["task"] == "wnli" and r["strategy"] == "fish":
            r["score"] -= 0.5
    path = tmp_path / "study.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_paired_interval_and_signs():
    p = paired([1.0, 2.0, 3.0])
    assert p["mean"] == 2.0 and (p["ahead"], p["behind"], p["n"]) == (3, 0, 3)
    assert p["hi"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert fmt_paired(paired([1.0, -1.0, 0.0])) == "+0.00 [-2.48, +2.48] 1/3 ahead (1 tied)"
    assert fmt_paired(paired([2.5])) == "+2.50 1/1 ahead" and fmt_paired(paired([])) == "-"


def test_comparisons_pair_each_strategy_with_its_original_and_fish_with_rand():
    recs = [{"method": "lora", "budget": b, "strategy": s} for b in (1, 6)
            for s in ("original", "fish", "rand", "fish_balanced")]
    pairs = comparisons(recs)
    for b in (1, 6):
        orig, fish = ("lora", b, "original"), ("lora", b, "fish")
        assert (fish, orig) in pairs and (("lora", b, "rand"), orig) in pairs
        assert (fish, ("lora", b, "rand")) in pairs
        assert (("lora", b, "fish_balanced"), orig) in pairs and (("lora", b, "fish_balanced"), fish) in pairs
    assert len(pairs) == 2 * 5
    dense = [{"method": "lora", "budget": 1.0, "strategy": "original"}, {"method": "lora", "budget": 0.05,
                                                                        "strategy": "fish"}]
    assert comparisons(dense) == [(("lora", 0.05, "fish"), ("lora", 1.0, "original"))]  # fixed_layers: dense Original


def test_report_of_an_equal_budget_study(tmp_path, capsys):
    path = _study(tmp_path)
    assert main(["report", str(path)]) == 0
    text = (tmp_path / "study.md").read_text()
    assert "| trivial baseline (majority class / constant) | 0 | - | - | 50.00 | 0.00 | 0.00 | - |" in text
    assert "Avg (without wnli)" in text
    fish_row = next(line for line in text.splitlines() if line.startswith("| LORA FISH r8 pool = top-1 budget |"))
    assert fish_row.rstrip(" |").endswith("75.00 ± 3.00")  # mean of rte and stsb per seed: 72, 75, 78 (wnli left out)
    pair = next(line for line in text.splitlines()
                if line.startswith("| LORA FISH r8 pool = top-1 budget − LORA Original r1 top-1 layers |"))
    cells = [c.strip() for c in pair.strip("|").split("|")]
    half = 4.303 * 2.0 / math.sqrt(3)
    assert cells[1] == f"+4.00 [{4 - half:+.2f}, {4 + half:+.2f}] 3/3 ahead"  # rte
    assert cells[3].startswith("-46.00") and cells[3].endswith("0/3 ahead")  # wnli, reported
    assert cells[4] == cells[1]  # the average leaves wnli out
    assert "LORA FISH r8 pool = top-1 budget − LORA rand r8 pool = top-1 budget" in text
    mask_row = next(line for line in text.splitlines() if line.startswith("| LORA rand r8 pool = top-1 budget | 25.0%"))
    assert mask_row.endswith("| 75.0% | 40.0% | 2.0% |")
    assert "2.0 h, all sessions together" in text
    capsys.readouterr()


def test_paired_loss_counts_lower_as_ahead(tmp_path, capsys):
    assert paired([-0.01, -0.02, 0.01], higher_is_better=False)["ahead"] == 2
    path = _study(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:  # fish: lower loss than original on every seed
        r["epochs"][-1]["dev_loss"] = 0.5 if r["strategy"] == "fish" else 0.6
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(path)]) == 0
    text = (tmp_path / "study.md").read_text()
    rows = [line for line in text.splitlines()
            if line.startswith("| LORA FISH r8 pool = top-1 budget − LORA Original r1 top-1 layers |")]
    assert len(rows) == 2 and "-0.100 [-0.100, -0.100] 3/3 ahead" in rows[1]
    capsys.readouterr()


def test_wall_time_is_split_by_machine_when_a_study_mixes_them(tmp_path, capsys):
    path = _study(tmp_path)
    assert main(["report", str(path)]) == 0
    assert "by machine" not in (tmp_path / "study.md").read_text()  # one machine: one total
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:  # seed 2's runs re-run on the CPU, slower
        r["device"], r["wall_seconds"] = ("cpu", 240.0) if r["seed"] == 2 else ("NVIDIA H200", 60.0)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["report", str(path)]) == 0
    text = (tmp_path / "study.md").read_text()
    assert "by machine: NVIDIA H200 18.0 min over 18 runs, cpu 36.0 min over 9 runs." in text
    capsys.readouterr()


def test_report_never_writes_over_its_results_file(tmp_path, capsys):
    path = _study(tmp_path)
    named_md = tmp_path / "runs.md"  # a results file whose report table would be runs.md itself
    named_md.write_bytes(path.read_bytes())
    before = named_md.read_bytes()
    assert main(["report", str(named_md)]) == 2
    assert "would overwrite the results file" in capsys.readouterr().err
    assert named_md.read_bytes() == before
