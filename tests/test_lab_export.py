"""`python -m fish_lab data`: the paper's tasks as files that `fish-tune train` / `compare` read as a user's own."""

from __future__ import annotations

import csv
import json

from fish_lab.cli import main
from fish_lab.tasks import load_glue, load_gsm8k
from fish_tuning.commands.columns import infer_task
from fish_tuning.commands.common import DataArguments, ModelArguments, load_data
from test_compare import workspace  # noqa: F401  (a pytest fixture: tiny SST-2 and GSM8K files)


def _task_of(train, dev, **cols):
    data = load_data(DataArguments(train_file=str(train), validation_file=str(dev), **cols))
    return data, infer_task(ModelArguments(model_name_or_path="x"), DataArguments(**cols), data["train"])


def test_sst2_becomes_a_classification_csv_with_every_row(workspace, tmp_path, capsys):  # noqa: F811
    assert main(["data", "sst2", str(tmp_path / "sst2"), "--data-dir", str(workspace / "data")]) == 0
    out = capsys.readouterr().out
    assert "fish-tune compare --model_name_or_path minilm --train_file" in out
    with open(tmp_path / "sst2" / "train.csv") as f:
        rows = list(csv.DictReader(f))
    source = load_glue("sst2", "train", workspace / "data")
    assert [(r["sentence"], int(r["label"])) for r in rows] == [(s["text_a"], s["label"]) for s in source]
    data, info = _task_of(tmp_path / "sst2" / "train.csv", tmp_path / "sst2" / "dev.csv")
    assert info["task"] == "classification" and info["text"] == "sentence" and info["label_list"] == [0, 1]
    assert len(data["validation"]) == len(load_glue("sst2", "dev", workspace / "data"))


def test_gsm8k_becomes_prompt_completion_lines_and_a_limit_keeps_the_first_rows(workspace, tmp_path):  # noqa: F811
    argv = ["data", "gsm8k", str(tmp_path / "g"), "--data-dir", str(workspace / "data"), "--train-examples", "5"]
    assert main(argv) == 0
    lines = [json.loads(x) for x in (tmp_path / "g" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and all(x["prompt"].startswith("Question: ") and x["prompt"].endswith("Answer:")
                                   for x in lines)
    assert {x["completion"].strip() for x in lines} <= {r["answer"] for r in load_gsm8k("train", workspace / "data")}
    _, info = _task_of(tmp_path / "g" / "train.jsonl", tmp_path / "g" / "dev.jsonl")
    assert info["task"] == "causal-lm" and info["sft_format"] == "prompt-completion"


def test_unknown_task_is_one_line(tmp_path, capsys):
    assert main(["data", "imdb", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("fish_lab: error: unknown task 'imdb'")
    assert not (tmp_path / "x").exists()
