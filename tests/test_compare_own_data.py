"""`fish-tune compare` on a user's own CSV (tiny random BERT saved to disk): every arm is a `fish-tune train` run,
masked arms keep exactly dense LoRA r1's count, the shuffled arm keeps FISH's per-tensor counts, finished runs are
skipped on resume, the report pairs the arms, and bad input is one line before any model loads."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import fish_tuning as ft
from fish_tuning.cli import main
from fish_tuning.commands import compare, compare_args, train
from fish_tuning.commands.compare_report import pick_metric, report
from test_cli_train import save_tiny_models, write_sentiment_csv

FAST = ["--max_steps", "4", "--per_device_train_batch_size", "8", "--num_samples", "16", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true"]


def _renamed(src, dst):
    """The sentiment CSV with the user's own column names (review, sentiment)."""
    with open(src) as f, open(dst, "w", newline="") as g:
        rows = list(csv.reader(f))
        w = csv.writer(g)
        w.writerow(["review", "sentiment"])
        w.writerows(rows[1:])
    return dst


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    out = save_tiny_models(root)
    out["train"] = _renamed(write_sentiment_csv(root / "t.csv", n=48), root / "train.csv")
    out["dev"] = _renamed(write_sentiment_csv(root / "d.csv", n=16, seed=1), root / "dev.csv")
    return out


def _argv(user, out_dir, *extra):
    return ["compare", "--model_name_or_path", str(user["bert"]), "--train_file", str(user["train"]),
            "--validation_file", str(user["dev"]), "--text_column", "review", "--label_column", "sentiment",
            "--seeds", "0,1", "--output_dir", str(out_dir), *FAST, *extra]


def _records(out_dir):
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def _counts(mask):
    return {n: int(mask.indices[n].numel()) for n in mask.names}


@pytest.mark.slow
def test_compare_on_a_user_csv_pairs_equal_budget_arms_and_resumes(user, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "cmp"
    argv = _argv(user, out_dir, "--arms", "original,fish,rand,shuffled")
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Paired over seeds" in text and "Recommendation:" in text and "trivial baseline" in text
    assert "fish @ " in text and "− original (dense LoRA r1" in text
    records = _records(out_dir)
    assert sorted(r["key"] for r in records) == sorted(f"{a}/r1/s{s}" for a in ("original", "fish", "rand", "shuffled")
                                                       for s in (0, 1))
    original = next(r for r in records if r["arm"] == "original")
    r1 = original["entries"]  # dense LoRA r1 trains every entry of its adapter: the default budget
    assert original["candidates"] == r1 and r1 > 0
    config = json.loads((out_dir / "runs" / "original_r1_s0" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (1, 2)  # the pool's scale 16 / 8, not 16 / 1
    for r in records:
        assert r["entries"] == r1, r["key"]  # equal budgets: exactly that many entries of the r8 pool
        assert "eval_accuracy" in r["eval"] and r["wall_s"] > 0
        if r["arm"] != "original":
            assert r["candidates"] == 8 * r1 and r["lora_r"] == 8
    for seed in (0, 1):  # the shuffled control: FISH's per-tensor counts at other positions
        fish = ft.FishMask.load(out_dir / "runs" / f"fish_r1_s{seed}" / "fish_mask.safetensors")
        shuffled = ft.FishMask.load(out_dir / "runs" / f"shuffled_r1_s{seed}" / "fish_mask.safetensors")
        rand = ft.FishMask.load(out_dir / "runs" / f"rand_r1_s{seed}" / "fish_mask.safetensors")
        assert _counts(shuffled) == _counts(fish) != _counts(rand)
        assert any(not torch.equal(shuffled.indices[n], fish.indices[n]) for n in fish.names)
    assert (out_dir / "compare.md").read_text() in text

    def no_training(argv):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(train, "run", no_training)
    assert main(argv) == 0  # everything finished: only the report
    assert "Recommendation:" in capsys.readouterr().out

    lines = (out_dir / "results.jsonl").read_text().splitlines()  # a run killed before its record was written
    (out_dir / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # ... and a torn line
    ran = []
    monkeypatch.undo()
    real = train.run
    monkeypatch.setattr(train, "run", lambda a: ran.append(a) or real(a))
    assert main(argv) == 0
    assert len(ran) == 1 and sorted(r["key"] for r in _records_ok(out_dir)) == sorted(r["key"] for r in records)


@pytest.mark.slow
def test_each_arm_at_its_own_learning_rate(user, tmp_path, capsys, monkeypatch):
    """--arm_learning_rates: the named arms train at their rate (the run's TrainingArguments say so), the others at
    --learning_rate; the records and the report's header name each rate; other rates are another study."""
    out_dir = tmp_path / "rates"
    argv = _argv(user, out_dir, "--arms", "original,fish,rand", "--seeds", "0", "--learning_rate", "0.001",
                 "--arm_learning_rates", "original=0.05,fish=0.002")
    ran = []
    real = train.run
    monkeypatch.setattr(train, "run", lambda a: ran.append(a) or real(a))
    assert main(argv) == 0
    text = capsys.readouterr().out
    rates = {r["arm"]: r["learning_rate"] for r in _records(out_dir)}
    assert rates == {"original": 0.05, "fish": 0.002, "rand": 0.001}
    for arm, rate in rates.items():
        args = torch.load(out_dir / "runs" / f"{arm}_r1_s0" / "training_args.bin", weights_only=False)
        assert args.learning_rate == rate, arm
    assert "learning rate per arm: original 0.05, fish 0.002, rand 0.001" in text
    assert "Each arm ran at one --learning_rate" not in text
    assert main([*argv[:-1], "original=0.05,fish=0.003"]) == 2  # the same folder with other rates: refused
    assert "holds runs made with other flags" in capsys.readouterr().err


def _records_ok(out_dir):
    return compare.read_records(out_dir / "results.jsonl")


@pytest.mark.slow
def test_holdout_scores_on_part_of_train_never_the_validation_data(user, tmp_path, capsys):
    out_dir = tmp_path / "hold"
    broken = tmp_path / "dev.csv"  # a validation file the scoring must never read
    broken.write_text("review,sentiment\nthe movie was good,UNSEEN\n")
    argv = _argv(user, out_dir, "--arms", "fish,uniform", "--budgets", "r1,0.25", "--holdout", "12")
    argv[argv.index(str(user["dev"]))] = str(broken)
    assert main(argv) == 0
    held = (out_dir / "holdout" / "holdout.jsonl").read_text().splitlines()
    rest = (out_dir / "holdout" / "train.jsonl").read_text().splitlines()
    with open(user["train"]) as f:
        train_rows = len(f.read().splitlines()) - 1
    assert len(held) == 12 and len(rest) == train_rows - 12
    records = _records(out_dir)
    assert {r["budget"] for r in records} == {"r1", "0.25"}
    pool = records[0]["candidates"]
    assert {r["entries"] for r in records if r["budget"] == "0.25"} == {round(0.25 * pool)}
    assert all("held-out train (12 rows" in r["scored_on"] for r in records)
    assert "uniform @ " in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--arms", "original,nope"], "unknown arm 'nope'"),
    (["--arms", "shuffled"], "add fish to --arms"),
    (["--strategy", "rand"], "--strategy is set per arm"),
    (["--budgets", "r0"], "--budgets item 'r0'"),
    (["--budgets", "2.5"], "--budgets item '2.5'"),
    (["--budgets", "0"], "--budgets item '0'"),
    (["--budgets", "r1", "--keep", "0.1"], "not both"),
    (["--budgets", "999999"], "more than the --lora_r 8 pool"),
    (["--seeds", "0,0"], "names an item twice"),
    (["--holdout", "0"], "--holdout 0"),
    (["--arm_learning_rates", "fish=0"], "--arm_learning_rates item 'fish=0'"),
    (["--arm_learning_rates", "rev=1e-3"], "--arm_learning_rates item 'rev=1e-3'"),  # rev is not in --arms
    (["--arm_learning_rates", "fish"], "--arm_learning_rates item 'fish'"),
    (["--load_in_4bit", "--peft", "ia3"], "--load_in_4bit works with --peft lora or dora"),
    (["--load_in_4bit"], "are for causal-LM SFT"),  # this CSV is a classification task
])
def test_bad_input_is_one_line_before_any_model_loads(user, tmp_path, monkeypatch, capsys, extra, message):
    from transformers import AutoModelForSequenceClassification

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_model)
    assert main(_argv(user, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fish-tune: error:") and message in err[0], err
    assert not (tmp_path / "bad" / "results.jsonl").exists()


def test_no_validation_data_and_no_holdout_is_refused(user, tmp_path, capsys):
    argv = _argv(user, tmp_path / "x")
    i = argv.index("--validation_file")
    del argv[i:i + 2]
    assert main(argv) == 2
    assert "--holdout" in capsys.readouterr().err


def test_results_of_other_flags_are_not_mixed_in(user, tmp_path, capsys):
    out_dir = tmp_path / "mixed"
    out_dir.mkdir()
    (out_dir / "results.jsonl").write_text(json.dumps({"key": "fish/r1/s0", "study": "0123456789ab"}) + "\n")
    assert main(_argv(user, out_dir)) == 2
    assert "other flags" in capsys.readouterr().err


def test_report_pairs_by_seed_and_says_when_a_gap_is_significant():
    def rec(arm, seed, acc, entries=100):
        return {"key": f"{arm}/r1/s{seed}", "arm": arm, "budget": "r1", "seed": seed, "entries": entries,
                "lora_r": 1 if arm == "original" else 8, "task": "classification", "wall_s": 1.0,
                "eval": {"eval_accuracy": acc, "eval_loss": 0.5, "eval_trivial_accuracy": 0.5}}

    records = [rec("original", s, 0.70 + 0.01 * s) for s in range(4)]
    records += [rec("fish", s, 0.80 + 0.01 * s + 0.001 * (s % 2)) for s in range(4)]
    records += [rec("rand", s, 0.70 + 0.01 * s + 0.02 * (-1) ** s) for s in range(4)]
    assert pick_metric(records) == ("eval_accuracy", True)
    text = report(records)
    assert "| trivial baseline (majority class / constant) | 0 | - | 50.00 |" in text
    assert "**fish** beats original by 10.05 points" in text and "; significant" in text
    fish_vs_rand = next(line for line in text.splitlines() if line.startswith("| fish @ 100 − rand @ 100"))
    assert "4/4 ahead" in fish_vs_rand
    rand_vs_orig = next(line for line in text.splitlines() if line.startswith("| rand @ 100 − original"))
    assert "+0.00 [" in rand_vs_orig and "2/4 ahead" in rand_vs_orig  # +2, -2, +2, -2: centred on 0


def test_train_allocation_from_a_missing_mask_file_is_one_line(user, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", str(user["bert"]), "--train_file", str(user["train"]),
            "--text_column", "review", "--label_column", "sentiment", "--budget", "10", "--strategy", "rand",
            "--allocation", str(tmp_path / "none.safetensors"), "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "allocation mask file" in capsys.readouterr().err


@pytest.mark.slow
def test_the_readme_compare_command_runs_as_written(user, tmp_path, monkeypatch, capsys):
    """The README's `fish-tune compare` block on examples/data (the issue's "done when" command), with minilm
    swapped for the tiny BERT, the output in a temp folder and a smaller calibration set."""
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text().split("`fish-tune compare` with train's flags", 1)[1]
    cmd = shlex.split(text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " "))
    assert cmd[:2] == ["fish-tune", "compare"] and "--arms" in cmd and "--seeds" in cmd
    argv = cmd[1:]
    argv[argv.index("--model_name_or_path") + 1] = str(user["bert"])
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "cmp")
    monkeypatch.chdir(root)  # the README's data paths are relative to the repository root
    assert main([*argv, "--num_samples", "8", "--report_to", "none", "--disable_tqdm", "true"]) == 0
    out = capsys.readouterr().out
    assert "Paired over seeds" in out and "Recommendation:" in out and " on this data, **" in out
    assert len(_records(tmp_path / "cmp")) == 6


def test_a_loss_only_report_ranks_lower_as_better():
    """causal-LM runs have only eval_loss: lower is better in the means, the sign counts and the words."""
    def rec(arm, seed, loss):
        return {"key": f"{arm}/r1/s{seed}", "arm": arm, "budget": "r1", "seed": seed, "entries": 224, "lora_r": 8,
                "task": "causal-lm", "wall_s": 1.0, "eval": {"eval_loss": loss}}

    records = [rec("original", s, 3.0 + 0.01 * s) for s in range(3)] + [rec("fish", s, 2.9 + 0.01 * s)
                                                                         for s in range(3)]
    assert pick_metric(records) == ("eval_loss", False)
    text = report(records)
    assert "loss (lower is better)" in text and "trivial baseline" not in text
    assert "| fish @ 224 − original (dense LoRA r1, 224 entries) | -0.1000 [" in text and "3/3 ahead" in text
    assert "**fish** beats original by 0.1000 in loss" in text


def test_budget_tokens_are_ranks_counts_or_fractions(monkeypatch):
    """"1" is one entry, "1.0" the whole pool, "r2" dense LoRA rank 2's count; --budget N is N entries."""
    from fish_tuning.commands.common import PeftArguments

    monkeypatch.setattr(compare, "lora_count", lambda path, task, peft, rank: 100 * rank)
    budgets = compare_args.parse_budgets(compare_args.CompareArguments(budgets="r2,1,1.0,0.25,50"), None, None)
    assert [b.rank for b in budgets] == [2, None, None, None, None]
    counts = compare.budget_counts("m", "classification", PeftArguments(lora_r=8), budgets)
    assert counts == {"r2": 200, "1": 1, "1.0": 800, "0.25": 200, "50": 50}
    only = compare_args.parse_budgets(compare_args.CompareArguments(), None, 1)
    assert compare.budget_counts("m", "classification", PeftArguments(lora_r=8), only) == {"1": 1}
    assert compare_args.parse_budgets(compare_args.CompareArguments(), None, None) == [compare_args.Budget("r1", 1)]
