"""The rough cases of issue 27: each a one-line `fish-tune: error:` before any model loads (or a run that now
works), where the old code gave a raw traceback, a late error, or blamed the wrong file."""

from __future__ import annotations

import csv
import json

import pytest

from fish_tuning.cli import main
from fish_tuning.commands import build
from test_cli_train import FAST, POS, tiny  # noqa: F401  (tiny: the shared fixture)


def _no_model(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(build, "build_trainer", no_model)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish-tune: error: ") and "\n" not in err, err
    return err


def _train(tiny, tmp_path, *extra, data=None):  # noqa: F811
    return main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(data or tiny["csv"]),
                 "--output_dir", str(tmp_path / "o"), *extra])


def test_a_reporter_that_is_not_installed(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    from transformers.integrations import integration_utils

    _no_model(monkeypatch)
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    assert _train(tiny, tmp_path, "--keep", "0.1", "--report_to", "tensorboard") == 2
    assert "--report_to tensorboard needs the tensorboard package, which is not installed: pip install " \
           "tensorboard" in _one_line(capsys)


def test_push_to_hub_offline_or_without_a_login(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    import huggingface_hub
    from huggingface_hub import constants

    _no_model(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert _train(tiny, tmp_path, "--keep", "0.1", "--push_to_hub", "true") == 2
    assert "--push_to_hub with HF_HUB_OFFLINE set" in _one_line(capsys)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert _train(tiny, tmp_path, "--keep", "0.1", "--push_to_hub", "true") == 2
    assert "--push_to_hub needs a hub login" in _one_line(capsys)


def test_texts_longer_than_the_model_positions_are_cut_to_them(tiny, tmp_path, capsys):  # noqa: F811
    """The tiny BERT has 64 positions; --max_length 256 (the default) used to index past them in the Fisher pass."""
    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for i in range(16):
            w.writerow([" ".join([POS[i % 4]] * 100), i % 2])
    assert _train(tiny, tmp_path, "--keep", "0.1", *FAST, data=path) == 0
    assert "--max_length 256 is above the model's 64 positions: texts are cut at 64 tokens" in capsys.readouterr().out


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):  # noqa: F811
    """An r 8 run with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    fast = [a for a in FAST if a not in ("--save_strategy", "no")]
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--keep", "0.1", "--output_dir", str(out), *fast, "--save_strategy", "steps",
                 "--save_steps", "1"]) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    return out


def _resume(tiny, out, *extra):  # noqa: F811
    return main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--keep", "0.1", "--output_dir", str(out), *FAST, "--max_steps", "3",
                 "--resume_from_checkpoint", "true", *extra])


def test_resuming_with_another_lora_rank_is_refused(tiny, checkpoints, monkeypatch, capsys):  # noqa: F811
    _no_model(monkeypatch)
    assert _resume(tiny, checkpoints, "--lora_r", "4") == 2
    assert f"checkpoint {checkpoints / 'checkpoint-2'} was trained with --lora_r 8, not 4; resume with --lora_r 8" \
        in _one_line(capsys)


@pytest.mark.parametrize("name, damage, problem", [
    ("optimizer.pt", "truncate", "its optimizer.pt is truncated or corrupt"),
    ("adapter_model.safetensors", "truncate", "its adapter_model.safetensors is truncated"),
    ("trainer_state.json", "delete", "it has no trainer_state.json"),
])
def test_a_damaged_checkpoint_names_the_previous_whole_one(tiny, checkpoints, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                            name, damage, problem):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(checkpoints, out)
    target = out / "checkpoint-2" / name
    if damage == "delete":
        target.unlink()
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    _no_model(monkeypatch)
    assert _resume(tiny, out) == 2
    err = _one_line(capsys)
    assert f"the last checkpoint {out / 'checkpoint-2'} is damaged: {problem}" in err, err
    assert f"resume from the previous whole one: --resume_from_checkpoint {out / 'checkpoint-1'}" in err


@pytest.mark.parametrize("extra, message", [
    (["--budget", "5000"], "--budget 5,000 is above the 2,048 PEFT candidate entries of this model"),
    (["--keep", "0.1", "--exclude", ".*"], "--exclude .* leaves no PEFT entry to select from"),
    (["--budget", "1500", "--exclude", "layer\\.0\\."], "--budget 1,500 is above the 1,024 PEFT candidate entries "
                                                        "of this model (after --exclude)"),
])
@pytest.mark.parametrize("command", ["train", "mask"])
def test_a_budget_the_candidates_cannot_hold_is_refused_before_the_model_loads(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                                                capsys, extra, message, command):
    from transformers import AutoModelForSequenceClassification

    def no_weights(*a, **k):
        raise AssertionError("model weights were loaded before the budget was checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    out = ["--output_dir", str(tmp_path / "o")] if command == "train" else ["--output", str(tmp_path / "m.safetensors")]
    assert main([command, "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), *out,
                 *extra]) == 2
    assert message in _one_line(capsys)


@pytest.mark.parametrize("flag", ["--png", "--summary_json"])
def test_mask_outputs_that_cannot_be_written_are_refused_before_the_model(tiny, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                                         flag):
    _no_model(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["mask", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep",
                 "0.1", "--output", str(tmp_path / "m.safetensors"), flag, str(blocker / "out.x")]) == 2
    assert f"{flag} {blocker / 'out.x'}: its folder is not writable (or is a file)" in _one_line(capsys)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_bad_validation_file_is_blamed_not_the_train_file(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    _no_model(monkeypatch)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"sentence": "the movie was good", "label": i % 2}) + "\n" for i in range(8)))
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"sentence": "the movie", "label": 1}\n{"sentence": "broken\n')
    assert _train(tiny, tmp_path, "--keep", "0.1", "--validation_file", str(bad), data=train) == 2
    err = _one_line(capsys)
    assert f"could not read --validation_file {bad}" in err and str(train) not in err, err


def test_a_hub_id_without_an_organisation_is_a_hub_id():
    from fish_tuning.models import resolve_model

    assert resolve_model("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model("gpt2") == "gpt2"
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("../not a model")


def test_tsv_with_bare_quotes_reads_as_glue_does(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    """GLUE's TSVs (RTE, MRPC, STS-B) hold bare quotes inside sentences; read as CSV-quoted they merged rows or
    failed ('Expected 5 fields')."""
    _no_model(monkeypatch)
    path = tmp_path / "pairs.tsv"
    rows = ["index\tsentence1\tsentence2\tlabel"]
    rows += [f'{i}\tthe "movie\twas {POS[i % 4]}\t{"entailment" if i % 2 else "not_entailment"}' for i in range(10)]
    path.write_text("\n".join(rows) + "\n")
    from fish_tuning.commands.common import read_file

    ds = read_file("--train_file", str(path))
    assert len(ds) == 10 and ds[0]["sentence1"] == 'the "movie'
    with pytest.raises(AssertionError, match="a model was built"):
        _train(tiny, tmp_path, "--keep", "0.1", data=path)
    assert "text: sentence1 + sentence2 (pair) | label: label ('entailment', 'not_entailment')" in \
        capsys.readouterr().out


def test_outputs_that_would_replace_inputs_are_refused(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A run into the model's own folder replaced its README.md and tokenizer; a data file named like one of the
    run's outputs (eval_results.json, predict_results.tsv) inside output_dir was overwritten."""
    import shutil

    _no_model(monkeypatch)
    model = tmp_path / "model"
    shutil.copytree(tiny["bert"], model)
    assert main(["train", "--model_name_or_path", str(model), "--train_file", str(tiny["csv"]), "--keep", "0.1",
                 "--output_dir", str(model)]) == 2
    assert "is the model's own folder" in _one_line(capsys)
    out = tmp_path / "run"
    out.mkdir()
    data = out / "eval_results.json"
    data.write_text("".join(json.dumps({"sentence": "the movie was good", "label": i % 2}) + "\n" for i in range(8)))
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(data), "--keep", "0.1",
                 "--output_dir", str(out)]) == 2
    assert f"--train_file {data} would be overwritten by the run's own eval_results.json" in _one_line(capsys)
