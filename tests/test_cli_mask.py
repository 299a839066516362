"""`fish-tune mask`: compute / save / show a mask, the layers x modules grid, JSON summary and PNG heat map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fish_tuning as ft
from fish_tuning.cli import main
from fish_tuning.commands.maskview import grid
from fish_tuning.mask import module_of
from test_cli_train import FAST, tiny  # noqa: F401  (module-scoped fixture: tiny models and data files)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mask_args(tiny, out, *extra):  # noqa: F811
    return ["mask", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--num_samples",
            "16", "--output", str(out), *extra]


def test_mask_computes_saves_and_draws_where_the_budget_goes(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "m" / "mask.safetensors"
    assert main(_mask_args(tiny, out, "--budget", "37")) == 0
    printed = capsys.readouterr().out
    mask = ft.FishMask.load(out)
    assert mask.num_selected == 37  # exactly k
    summary = json.loads((tmp_path / "m" / "mask.json").read_text())
    g = summary["grid"]
    assert g["layers"] == [0, 1]
    assert g["kinds"] == ["query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"]  # A / B split
    assert sum(map(sum, g["kept"])) == 37 and sum(map(sum, g["total"])) == mask.num_candidates
    assert summary["trainable"] == 37 + 66  # + the classifier head, trained fully outside the budget
    assert summary["fish_config"]["budget"] == 37 and summary["fisher"]["num_samples"] == 16
    assert (tmp_path / "m" / "mask.png").read_bytes()[:8] == PNG_MAGIC
    assert "kept entries per layer x module" in printed and "value.lora_A" in printed


def test_show_an_existing_mask_without_a_model(tiny, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "mask.safetensors"
    assert main(_mask_args(tiny, out, "--keep", "0.1", "--strategy", "rand", "--png", "none")) == 0
    assert not (tmp_path / "mask.png").exists()
    capsys.readouterr()
    assert main(["mask", "--show", str(out), "--summary_json", str(tmp_path / "s.json"),
                 "--png", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert "FishMask strategy=rand kept 205 of 2,048" in printed
    assert json.loads((tmp_path / "s.json").read_text())["num_selected"] == 205
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, message", [
    (["mask", "--show", "missing.safetensors"], "--show missing.safetensors: file not found"),
    (["mask", "--model_name_or_path", "x", "--train_file", "nope.csv", "--keep", "0.1"],
     "--train_file nope.csv not found"),
    (["mask", "--train_file", "a.csv", "--keep", "0.1", "--budget", "3"], "give exactly one of --keep"),
])
def test_mask_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fish-tune: error: ") and message in err and "\n" not in err, err


@pytest.mark.slow
def test_train_selects_the_mask_that_fish_tune_mask_showed(tiny, tmp_path):  # noqa: F811
    """Same flags and seed: `mask` scores the batches `train` would (same collator, subset, head init)."""
    common = ["--model_name_or_path", str(tiny["bert"]), "--train_file", str(tiny["csv"]), "--keep", "0.1",
              "--num_samples", "16", "--per_device_train_batch_size", "8", "--seed", "3"]
    assert main(["mask", *common, "--output", str(tmp_path / "m.safetensors"), "--png", "none"]) == 0
    fast = [a for a in FAST if a not in ("--num_samples", "16", "--per_device_train_batch_size", "8")]
    assert main(["train", *common, "--output_dir", str(tmp_path / "run"), *fast]) == 0
    shown = ft.FishMask.load(tmp_path / "m.safetensors")
    trained = ft.FishMask.load(tmp_path / "run" / ft.FishMask.FILE_NAME)
    assert shown.fingerprint() == trained.fingerprint()


def test_grid_columns_drop_any_adapter_name():
    assert module_of("base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.sst2.weight") == \
        "query.lora_A"
    assert module_of("base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector.default.weight") \
        == "v_proj.lora_magnitude_vector"
    import torch

    scores = {"m.layer.0.q.lora_A.x.weight": torch.arange(4.0).view(2, 2),
              "m.layer.1.q.lora_A.x.weight": torch.zeros(2, 2), "prompt_encoder.x.embedding": torch.ones(3)}
    mask = ft.select_mask(scores, budget=3)
    g = grid(mask)
    assert g["layers"] == [0, 1, "-"] and g["kinds"] == ["q.lora_A", "x.embedding"]
    assert g["kept"] == [[3, 0], [0, 0], [0, 3 - 3]]  # top-3 of 0..3 in layer 0; ties go to the earlier entry
    assert g["total"] == [[4, 0], [4, 0], [0, 3]]


def test_report_draws_the_per_layer_mask_summary_of_each_run(tmp_path):
    """`python -m fish_lab report` turns the per-layer summary each compare record carries into a heat map."""
    from pathlib import Path

    from fish_lab.report import draw_run_layers, write_report
    from fish_lab.results import read_results

    demo = Path(__file__).resolve().parents[1] / "docs" / "demo" / "demo.jsonl"
    records = read_results(demo)
    for r in records:
        r["mask"] = None
    assert draw_run_layers(records, tmp_path / "none.png") is None  # no run recorded a mask: nothing drawn
    for r in records:
        if r["strategy"] != "original":
            r["mask"] = {"per_layer": [[0, 10, 100], [1, 30, 100], [None, 0, 4]]}
    results = tmp_path / "study.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report(results)
    assert paths["mask_plot"] == tmp_path / "study_mask_layers.png"
    assert paths["mask_plot"].read_bytes()[:8] == PNG_MAGIC
    from fish_lab.cli import main as lab_main

    assert lab_main(["report", str(results)]) == 0


def test_mask_outputs_never_overwrite_the_training_data(tiny, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "train.csv"
    data.write_bytes(Path(tiny["csv"]).read_bytes())
    before = data.read_bytes()
    for extra in (["--output", str(data)], ["--output", str(tmp_path / "m.safetensors"), "--summary_json", str(data)]):
        argv = ["mask", "--model_name_or_path", str(tiny["bert"]), "--train_file", str(data), "--keep", "0.1",
                "--num_samples", "8", *extra]
        assert main(argv) == 2
        assert "would overwrite the data file" in capsys.readouterr().err
        assert data.read_bytes() == before
    assert main(_mask_args(tiny, tmp_path / "w.safetensors", "--keep", "0.1", "--fish_warmup_steps", "2")) == 2
    assert "use fish-tune train" in capsys.readouterr().err
