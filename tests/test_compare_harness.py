"""Harness defects of issue 10: torn results lines, late or raw CLI errors, junk report lines, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fish_lab import runner
from fish_lab.cli import build_parser, main, parse_args
from fish_lab.config import load_config
from fish_lab.results import read_results
from fish_lab.runner import Study, plan_runs
from fish_tuning.files import append_record
from test_compare import _config, workspace  # noqa: F401  (workspace is a pytest fixture)

ROOT = Path(__file__).resolve().parents[1]


def record(seed: int = 0, strategy: str = "fish", score: float = 0.5) -> dict:
    """A minimal valid run record, as the runner writes it."""
    return {"id": f"sst2|lora|fixed_layers|0.1|{strategy}|{seed}", "task": "sst2", "method": "lora",
            "mode": "fixed_layers", "budget": 0.1, "strategy": strategy, "seed": seed, "score": score,
            "epochs": [{"epoch": 1, "train_loss": 0.7, "dev_loss": 0.6, "dev_score": score}],
            "trainable": {"peft": 10, "candidates": 100, "always_train": 4, "base_params": 1000, "proportion": 0.01},
            "wall_seconds": 1.0, "model": "tiny", "config": {"train": {"epochs": 1}}}


# ---------------------------------------------------------------- 1. torn last line
def test_append_after_torn_line_starts_a_new_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, record(0))
    with open(path, "a") as f:
        f.write('{"id": "sst2|lora|fixed_lay')  # a run killed mid-write
    append_record(path, record(1))
    with pytest.warns(UserWarning, match=rf"{path.name}:2 is not valid JSON"):
        got = read_results(path)
    assert [r["seed"] for r in got] == [0, 1]
    assert path.read_text().count("\n") == 3


def test_study_resumes_after_torn_line_without_losing_the_next_run(workspace, tmp_path):  # noqa: F811
    raw = _config(workspace, out_dir=str(tmp_path), strategies=["original"])
    raw["train"]["epochs"] = 1
    Study(load_config(raw=raw)).run()
    path = tmp_path / "tiny.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "sst2|lora')
    with pytest.warns(UserWarning, match="tiny.jsonl:2"):
        Study(load_config(raw=raw, overrides=["seeds=[0,1]"]), log=lambda *a: None).run()
    logs: list[str] = []
    with pytest.warns(UserWarning, match="tiny.jsonl:2"):
        records = Study(load_config(raw=raw, overrides=["seeds=[0,1]"]), log=logs.append).run()
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert "0 to do" in logs[0]


# ---------------------------------------------------------------- 2. compare: every failure before any model loads
@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was reported")

    monkeypatch.setattr(runner, "load_model", refuse)


def _bad(workspace, tmp_path, change):  # noqa: F811
    raw = _config(workspace, out_dir=str(tmp_path / "out"))
    for key, value in change.items():
        if key.startswith("train."):
            raw["train"][key[6:]] = value
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(("change", "overrides", "expect"), [
    ({"train.weight_decay": -5}, [], "'train.weight_decay'"),
    ({"train.optimizer_kwargs": {"nesterov": True}}, [], "'nesterov' is not accepted"),
    ({"train.optimizer_kwargs": {"lr": 0.1}}, [], "set 'lr' as train.lr"),
    ({"seeds": [0, -1]}, [], "'seeds'"),
    ({}, ["seeds=[0"], "override 'seeds=[0'"),
    ({}, ["=3"], "empty field name"),
])
def test_bad_value_is_a_one_line_error(workspace, tmp_path, capsys, no_model_load, change, overrides, expect):  # noqa: F811
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_bad(workspace, tmp_path, change)))
    assert main(["compare", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fish_lab: error: ") and expect in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_malformed_and_empty_config_files(tmp_path, capsys, no_model_load):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [sst2\nseeds: [0]\n")
    assert main(["compare", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fish_lab: error: config file") and "not valid YAML" in err and "line" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    assert main(["compare", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_unloadable_model_is_a_config_error(workspace, tmp_path, capsys, no_model_load):  # noqa: F811
    (tmp_path / "not_a_model").mkdir()  # a folder without config.json: transformers raises OSError on load
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_bad(workspace, tmp_path, {"model": str(tmp_path / "not_a_model")})))
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fish_lab: error: config field 'model': cannot load") and "Traceback" not in err


def test_unwritable_out_dir_fails_before_any_model_loads(workspace, tmp_path, capsys, no_model_load):  # noqa: F811
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # out_dir below a regular file cannot be created (even as root)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_bad(workspace, tmp_path, {"out_dir": str(blocker / "out")})))
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fish_lab: error: config field 'out_dir': cannot write results to") and "--out-dir" in err


def test_overrides_may_follow_options():
    parser = build_parser()
    args = parse_args(parser, ["compare", "c.yaml", "a=1", "--out-dir", "R", "seeds=[0]", "train.epochs=2"])
    assert args.out_dir == "R" and args.overrides == ["a=1", "seeds=[0]", "train.epochs=2"]
    with pytest.raises(SystemExit):
        parse_args(parser, ["compare", "c.yaml", "--out-dir", "R", "stray"])
    with pytest.raises(SystemExit):
        parse_args(parser, ["report", "r.jsonl", "a=1"])


# ---------------------------------------------------------------- 3. report: valid JSON that is not a record
def test_report_skips_lines_that_are_not_records(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    bad_score, no_epochs = record(1), record(2)
    bad_score["score"] = None
    no_epochs["epochs"] = []
    lines = [record(0), {}, 42, bad_score, no_epochs, record(3, "rand"), [1]]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.warns(UserWarning) as caught:
        assert main(["report", str(path)]) == 0
    lines_named = [str(w.message).split(" ")[0].rsplit(":", 1)[1] for w in caught if "r.jsonl:" in str(w.message)]
    assert sorted(lines_named) == ["2", "3", "4", "5", "7"]
    assert "'score' is None" in " ".join(str(w.message) for w in caught)
    table = (tmp_path / "r.md").read_text()
    assert "LORA FISH keep 10%" in table and "LORA rand keep 10%" in table
    capsys.readouterr()


def test_report_of_only_junk_is_an_error(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text("{}\n42\n")
    with pytest.warns(UserWarning):
        assert main(["report", str(path)]) == 2
    assert "holds no runs" in capsys.readouterr().err


def test_report_module_does_not_import_the_runner():
    code = ("import sys, fish_lab.report; "
            "assert 'fish_lab.runner' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------- 4. fault: SIGKILL mid-study, then resume
def test_kill_mid_study_then_resume(workspace, tmp_path):  # noqa: F811
    raw = _config(workspace, out_dir=str(tmp_path / "out"), seeds=[0, 1, 2])
    raw["train"]["epochs"] = 6
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    results = tmp_path / "out" / "tiny.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "lab")])}
    proc = subprocess.Popen([sys.executable, "-m", "fish_lab", "compare", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the study ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before_bytes = results.read_bytes()
    before = read_results(results)
    planned = [r.id for r in plan_runs(load_config(raw=raw))]
    assert 2 <= len(before) < len(planned)
    after = Study(load_config(raw=raw), log=lambda *a: None).run()
    assert results.read_bytes().startswith(before_bytes)  # finished records untouched
    assert after[: len(before)] == before
    ids = [r["id"] for r in read_results(results)]
    assert sorted(ids) == sorted(planned)  # every run exactly once: none lost, the killed one redone once
