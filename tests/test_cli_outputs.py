"""The output folder of `fish-tune train` a person reuses: label names that survive a reload, a portable base
model id, a model card that says FISH, predictions for --test_file, and the dense baseline without a Fisher pass."""

from __future__ import annotations

import json

import pytest

import fish_tuning as ft
from fish_tuning.cli import main
from fish_tuning.commands.outputs import PORTABLE_IDS, portable_base
from test_cli_train import FAST, tiny, write_sentiment_csv  # noqa: F401  (tiny: the shared fixture)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):  # noqa: F811
    """One FISH run with validation and test data (the test file without its label column)."""
    root = tmp_path_factory.mktemp("outputs")
    val = write_sentiment_csv(root / "val.csv", n=16, seed=1)
    test = root / "test.csv"
    test.write_text("sentence\nthe movie was good good good\nthe movie was awful bad poor\nthe film\n")
    out = root / "run"
    rc = main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
               "--validation_file", str(val), "--test_file", str(test), "--keep", "0.1", "--output_dir", str(out),
               *FAST])
    assert rc == 0
    return out


def test_label_names_survive_a_reload(run, tiny):  # noqa: F811

    card = (run / "README.md").read_text()
    snippet = card[card.index("```python") + 9:card.rindex("```")].replace("path/to/this/folder", str(run))
    scope: dict = {}
    exec(snippet, scope)  # the model card's load recipe, as written
    model = scope["model"]
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    assert not (run / "config.json").exists()  # it would make transformers take the folder for a full model


def test_base_model_id_is_what_the_user_gave_and_aliases_become_hub_ids(run, tiny):  # noqa: F811
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["bert"])
    assert portable_base("minilm") == PORTABLE_IDS["minilm"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_base("SmolLM2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base("org/model") == "org/model"


def test_model_card_says_fish_the_budget_and_the_baseline(run):
    card = (run / "README.md").read_text()
    summary = json.loads((run / "fish_mask.json").read_text())
    ev = json.loads((run / "eval_results.json").read_text())
    k, n = summary["num_selected"], summary["num_candidates"]
    assert f"Trained **{k:,} of {n:,}** PEFT entries" in card and "strategy `fish`" in card
    assert "| value.lora_A |" in card and "| layer 1 |" in card
    assert f"| **accuracy** | **{ev['eval_score']:.4f}** | {ev['eval_trivial_score']:.4f} |" in card
    assert "[More Information Needed]" not in card  # not peft's empty template


def test_predictions_for_the_test_file(run):
    rows = (run / "predict_results.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 4
    assert all(r.split("\t")[1] in ("neg", "pos") for r in rows[1:])
    assert not (run / "test_results.json").exists()  # no labels in the test file: no test metrics


def test_keep_1_or_dense_trains_every_entry_without_a_fisher_pass(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    import fish_tuning.integrations.trainer as trainer_mod

    def no_fisher(*a, **k):
        raise AssertionError("the Fisher pass ran for a dense run")

    monkeypatch.setattr(trainer_mod, "gradient_moments", no_fisher)
    out = tmp_path / "dense"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--dense",
                 "--output_dir", str(out), *FAST]) == 0
    assert "with lora + dense (every entry, no Fisher pass)" in capsys.readouterr().out
    mask = ft.FishMask.load(out / ft.FishMask.FILE_NAME)
    assert mask.num_selected == mask.num_candidates == 2048
    assert json.loads((out / "train_results.json").read_text())["fisher_runtime"] == 0.0
    assert "Dense baseline" in (out / "README.md").read_text()
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep",
                 "1.0", "--exclude", "layer\\.0\\.", "--output_dir", str(tmp_path / "keep1"), *FAST]) == 0
    assert ft.FishMask.load(tmp_path / "keep1" / ft.FishMask.FILE_NAME).num_selected == 1024  # layer 1 only


@pytest.mark.parametrize("extra, message", [
    (["--dense", "--budget", "10"], "--dense trains every entry: leave out --keep / --budget"),
    (["--keep", "1.0", "--refresh_every", "2"], "--keep 1.0 (--dense) trains every entry"),
    (["--keep", "0.1", "--do_predict", "true"], "--do_predict needs --test_file"),
])
def test_output_flag_errors_before_any_model(tiny, tmp_path, capsys, extra, message):  # noqa: F811
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--output_dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish-tune: error: ") and message in err and "\n" not in err, err


def test_sft_refuses_a_test_file(tiny, tmp_path, capsys):  # noqa: F811
    assert main(["train", "--model_name_or_path", str(tiny["llama"]), "--train_file", str(tiny["sft"]),
                 "--test_file", str(tiny["sft"]), "--keep", "0.1", "--output_dir", str(tmp_path / "o")]) == 2
    assert "causal-LM SFT has none" in capsys.readouterr().err
