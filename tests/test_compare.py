"""`fish-tune compare` / `report` end to end on a tiny random BERT saved to disk and a few dozen TSV rows."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from transformers import BertConfig, BertModel, BertTokenizerFast

from conftest import VOCAB, tiny_llama
from fish_lab.cli import main
from fish_lab.config import apply_overrides, load_config
from fish_lab.gsm8k import final_number, lm_batches
from fish_lab.runner import Study, plan_runs, read_results

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]


def _tokenizer(folder) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.eos_token = "[SEP]"
    return tok


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BERT encoder (no head: compare adds one per task) + tokenizer on disk, and SST-2 / GSM8K files."""
    root = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "model")
    _tokenizer(root / "model").save_pretrained(root / "model")
    rng = random.Random(0)
    sst = root / "data" / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for split, n in (("train", 48), ("dev", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(WORDS[2:], 5) + [WORDS[label]]  # w0 / w1 give the label away
            rows.append(" ".join(rng.sample(words, len(words))) + f"\t{label}")
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    gsm = root / "data" / "gsm8k"
    gsm.mkdir(parents=True)
    for split in ("train", "test"):
        lines = [json.dumps({"question": f"w{i} w{i + 1} w3", "answer": f"w5 w6\n#### {i}"}) for i in range(12)]
        (gsm / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(root, **extra) -> dict:
    cfg = {"model": str(root / "model"), "tasks": ["sst2"], "methods": ["lora"], "mode": "fixed_layers",
           "budgets": [0.1], "seeds": [0], "rank": 4, "data_dir": str(root / "data"), "out_dir": str(root / "out"),
           "name": "tiny", "progress": False,
           "train": {"epochs": 2, "batch_size": 8, "max_length": 16, "lr": 0.01, "train_examples": None,
                     "dev_examples": None}}
    cfg.update(extra)
    return cfg


def test_compare_and_report_end_to_end(workspace, tmp_path, capsys):
    raw = _config(workspace, out_dir=str(tmp_path / "out"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path)]) == 0
    results = tmp_path / "out" / "tiny.jsonl"
    records = read_results(results)
    assert [r["strategy"] for r in records] == ["original", "fish", "rand", "rev"]
    cand = records[0]["trainable"]["candidates"]
    assert cand == 2 * 3 * (4 * 32 + 32 * 4)  # 2 layers x q/k/v x (A + B) at rank 4, hidden 32
    assert records[0]["trainable"]["peft"] == cand
    assert {r["trainable"]["peft"] for r in records[1:]} == {round(0.1 * cand)}
    assert all(r["trainable"]["always_train"] == 32 * 2 + 2 for r in records)  # classifier, outside the budget
    for r in records:
        assert [e["epoch"] for e in r["epochs"]] == [1, 2]
        assert r["score"] == r["epochs"][-1]["dev_score"] and 0.0 <= r["score"] <= 1.0
        assert r["wall_seconds"] > 0 and r["peak_memory_mb"]["process_rss_high_water"] > 0
    out = capsys.readouterr().out
    assert "4 to do" in out and "| LORA FISH keep 10% |" in out
    table = (tmp_path / "out" / "tiny.md").read_text()
    assert "LORA rev keep 10%" in table and "LORA Original (dense)" in table
    for png in ("tiny_score_vs_proportion.png", "tiny_epochs.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is redone; a new seed only adds its own runs
    assert main(["compare", str(path)]) == 0
    assert "0 to do" in capsys.readouterr().out
    assert len(read_results(results)) == 4
    assert main(["compare", str(path), "seeds=[0,1]", "strategies=[original]"]) == 0
    again = read_results(results)
    assert again[:4] == records and [(r["seed"], r["strategy"]) for r in again[4:]] == [(1, "original")]

    # report rebuilds table and plots from the results file alone
    for f in ("tiny.md", "tiny_epochs.png"):
        (tmp_path / "out" / f).unlink()
    assert main(["report", str(results)]) == 0
    assert "± " in (tmp_path / "out" / "tiny.md").read_text() and (tmp_path / "out" / "tiny_epochs.png").is_file()

    # a torn last line (crash mid-write) is redone, not fatal
    with open(results, "a") as f:
        f.write('{"id": "sst2|lora')
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert len(read_results(results)) == 5


def test_different_setup_refuses_to_mix(workspace, tmp_path):
    raw = _config(workspace, out_dir=str(tmp_path), strategies=["fish"])
    raw["train"]["epochs"] = 1
    Study(load_config(raw=raw)).run()
    with pytest.raises(ValueError, match="different setup"):
        Study(load_config(raw=raw, overrides=["train.lr=0.5"])).run()


def test_fixed_proportion_matches_original_budget(workspace, tmp_path):
    raw = _config(workspace, out_dir=str(tmp_path), mode="fixed_proportion", budgets=[1], fish_layers=2, rank=1,
                  strategies=["original", "fish", "rand"])
    raw["train"]["epochs"] = 1
    records = Study(load_config(raw=raw)).run()
    orig, fish, rand = records
    assert orig["layers"] == 1 and fish["layers"] == 2
    assert orig["trainable"]["peft"] == orig["trainable"]["candidates"] == 3 * (32 + 32)  # top layer, rank 1
    assert fish["trainable"]["candidates"] == 2 * orig["trainable"]["candidates"]
    assert fish["trainable"]["peft"] == rand["trainable"]["peft"] == orig["trainable"]["peft"]


@pytest.mark.parametrize(("change", "field"), [
    ({"tasks": ["qnli"]}, "'tasks'"),
    ({"methods": ["lorax"]}, "'methods'"),
    ({"model": "not-a-model"}, "'model'"),
    ({"data_dir": "/nonexistent/data"}, "'data_dir'"),
    ({"mode": "fixed_proportion", "budgets": [3], "fish_layers": 2}, "'budgets'"),
    ({"mode": "fixed_layers", "budgets": [5]}, "'budgets'"),
    ({"strategies": ["best"]}, "'strategies'"),
    ({"train": {"optimizer": "sgd"}}, "'train.optimizer'"),
    ({"train": {"epochs": 0}}, "'train.epochs'"),
    ({"typo_field": 1}, "'typo_field'"),
])
def test_bad_config_names_the_field(workspace, tmp_path, capsys, change, field):
    raw = _config(workspace, out_dir=str(tmp_path / "out"))
    raw.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (tmp_path / "out").exists()  # stopped before any training


def test_budget_larger_than_model_stops_before_training(workspace, tmp_path):
    raw = _config(workspace, out_dir=str(tmp_path / "out"), mode="fixed_proportion", budgets=[1], fish_layers=5)
    with pytest.raises(ValueError, match=r"\[1, 2\].*fish_layers"):
        Study(load_config(raw=raw)).run()
    assert not (tmp_path / "out").exists()


def test_overrides_parse_yaml_values():
    out = apply_overrides({"seeds": [0, 1, 2], "train": {"epochs": 3}}, ["seeds=[0]", "train.epochs=1",
                                                                         "data_dir=null"])
    assert out == {"seeds": [0], "train": {"epochs": 1}, "data_dir": None}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["seeds"])


def test_plan_runs_dense_reference_once_per_seed(workspace):
    cfg = load_config(raw=_config(workspace, budgets=[0.5, 0.05], seeds=[0, 1]))
    runs = plan_runs(cfg)
    assert sum(r.strategy == "original" for r in runs) == 2
    assert len(runs) == 2 * (1 + 2 * 3) and len({r.id for r in runs}) == len(runs)


def test_gsm8k_pieces(workspace):
    assert final_number("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert final_number("the answer is 18.00 dollars") == "18"
    assert final_number("no digits") is None
    tok = _tokenizer(workspace / "tok")
    batch = lm_batches([{"question": "w1 w2 w3", "answer": "w4 w5\n#### 9"}, {"question": "w1", "answer": "w6"}],
                       tok, batch_size=2)[0]
    prompt_len = len(tok("Question: w1 w2 w3\nAnswer:", add_special_tokens=False)["input_ids"])
    assert (batch["labels"][0, :prompt_len] == -100).all() and (batch["labels"][0, prompt_len:] != -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_gsm8k_study_with_model_factory(workspace, tmp_path):
    raw = _config(workspace, out_dir=str(tmp_path), tasks=["gsm8k"], strategies=["original", "fish"],
                  target_modules=["q_proj", "v_proj"])
    raw["train"].update(epochs=1, max_length=32, max_new_tokens=4, train_examples=8, dev_examples=4,
                        fisher_samples=8)
    tok = _tokenizer(tmp_path / "tok")
    records = Study(load_config(raw=raw), model_factory=lambda kind, n: (tiny_llama(), tok)).run()
    assert [r["metric"] for r in records] == ["exact_match", "exact_match"]
    assert records[1]["trainable"]["peft"] == round(0.1 * records[0]["trainable"]["candidates"])
    assert all(r["epochs"][0]["dev_loss"] > 0 and 0 <= r["score"] <= 1 for r in records)
