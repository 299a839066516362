"""`fish-tune train` finds its columns as transformers' run_glue.py does (a known pair, else the text columns
other than the label), says what it read in one start-up line, and refuses ambiguous or list-valued text."""

from __future__ import annotations

import csv
import json
import random

import pytest

from fish_tuning.cli import main
from fish_tuning.commands import build
from test_cli_train import FAST, NEG, POS, tiny  # noqa: F401  (tiny: the shared fixture)


def _pair_csv(path, header, n, seed):
    """QNLI-like: the label is only readable from the SECOND text (first text is the same for every row)."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for _ in range(n):
            pos = rng.random() < 0.5
            words = " ".join(rng.choice(POS if pos else NEG) for _ in range(3))
            w.writerow(["the question was", f"the answer was {words}", "entailment" if pos else "not_entailment"])
    return path


def test_a_qnli_like_pair_csv_trains_on_both_columns_and_prints_the_baseline(tiny, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """Done-when of issue 27: only --train_file / --validation_file; both columns reach the tokenizer, and the
    metric is printed beside the trivial baseline."""
    train = _pair_csv(tmp_path / "train.csv", ["question", "sentence", "label"], 48, 0)
    val = _pair_csv(tmp_path / "dev.csv", ["question", "sentence", "label"], 16, 1)
    seen = []
    original = build._cls_trainer

    def spy(model_args, peft_args, info, *a, **k):
        trainer = original(model_args, peft_args, info, *a, **k)
        seen.append(trainer.train_dataset[0]["input_ids"])
        return trainer

    monkeypatch.setattr(build, "_cls_trainer", spy)
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(train),
                 "--validation_file", str(val), "--keep", "0.1", "--output_dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert ("fish-tune train: task classification | text: question + sentence (pair) | label: label "
            "('entailment', 'not_entailment') | metric: accuracy") in printed
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    tokens = tok.convert_ids_to_tokens(seen[0])
    assert tokens[:3] == ["the", "question", "was"] and "answer" in tokens  # both texts are encoded
    line = next(x for x in printed.splitlines() if x.startswith("eval: "))
    assert line.startswith("eval: accuracy ") and "| trivial baseline (always " in line
    ev = json.loads((out / "eval_results.json").read_text())
    assert f"{ev['eval_score']:.4f}" in line and f"{ev['eval_trivial_score']:.4f}" in line


@pytest.mark.parametrize("header, expected", [
    (["sentence1", "sentence2", "label"], "text: sentence1 + sentence2 (pair)"),
    (["label", "premise", "hypothesis"], "text: premise + hypothesis (pair)"),
    (["first", "second", "label"], "text: first + second (pair)"),  # run_glue: the first two non-label columns
    (["review", "label"], "text: review |"),
])
def test_columns_found_without_flags(tiny, tmp_path, monkeypatch, capsys, header, expected):  # noqa: F811
    monkeypatch.setattr(build, "build_trainer", _stop)
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(8):
            w.writerow([str(i % 2) if h == "label" else f"the movie was {POS[i % 4]}" for h in header])
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(path), "--keep", "0.1",
                 "--output_dir", str(tmp_path / "o")]) == 3
    assert expected in capsys.readouterr().out


class _Stopped(Exception):
    pass


def _stop(*a, **k):
    raise _Stopped


@pytest.fixture(autouse=True)
def _stopped_is_rc3(monkeypatch):
    """A model build stopped by the test returns 3 from main (so the test sees the start-up line got printed)."""
    from fish_tuning.commands import train

    run = train.run

    def guarded(argv):
        try:
            return run(argv)
        except _Stopped:
            return 3

    monkeypatch.setattr(train, "run", guarded)


@pytest.mark.parametrize("rows, extra, message", [
    ([{"a": "x y", "b": "the film", "c": "good", "label": 1}] * 4, [],
     "3 text columns (a, b, c) and no known pair: say which with --text_column a (and --text_pair_column b"),
    ([{"text": ["the film", "was good"], "label": 1}] * 4, [],
     "text column 'text' (the text column) holds lists, not text; put a sentence pair in two columns"),
    ([{"text": ["the", "film", "was"], "label": 1}] * 4, ["--text_column", "text"],
     "text column 'text' (--text_column) holds lists, not text"),
    ([{"sentence1": "a", "sentence2": ["b", "c"], "label": 1}] * 4, [],
     "text column 'sentence2' (a sentence-pair column) holds lists"),
])
def test_ambiguous_or_list_valued_text_is_one_line_before_any_model(tiny, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                                     rows, extra, message):
    monkeypatch.setattr(build, "build_trainer", _stop)
    rows = [dict(r, label=i % 2) for i, r in enumerate(rows)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(path), "--keep", "0.1",
               "--output_dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fish-tune: error: ") and "\n" not in err, err
    assert message in err, err


def test_hub_class_label_names_are_the_label_names():
    """A hub dataset's ClassLabel column holds ids; the start-up line, the head config and the predictions name
    the classes (entailment, ...), not 0 / 1."""
    import datasets

    from fish_tuning.commands.columns import describe_task, infer_task
    from fish_tuning.commands.common import DataArguments, ModelArguments
    from fish_tuning.commands.outputs import label_config

    features = datasets.Features({"question": datasets.Value("string"), "sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                  "idx": datasets.Value("int32")})
    train = datasets.Dataset.from_dict({"question": ["q"] * 4, "sentence": ["the film"] * 4, "label": [0, 1, 1, 0],
                                        "idx": [0, 1, 2, 3]}, features=features)
    data = DataArguments(dataset_name="nyu-mll/glue", dataset_config_name="qnli")
    info = infer_task(ModelArguments(), data, train)
    assert info["label_names"] == ["entailment", "not_entailment"]
    assert describe_task(info, data) == ("fish-tune train: task classification | text: question + sentence (pair) | "
                                         "label: label ('entailment', 'not_entailment') | metric: accuracy (GLUE qnli)")
    assert label_config(info)["id2label"] == {"0": "entailment", "1": "not_entailment"}
