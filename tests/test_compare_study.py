"""Equal-budget study pieces (issue 15): a lower-rank Original over all layers, held-out train split, trivial baseline,
mask concentration in each record, strategies from fish_tuning.mask, per-strategy select arguments."""

from __future__ import annotations

import pytest
import torch

import fish_tuning.selection
from fish_lab import arms as arms_mod
from fish_lab import config as config_mod
from fish_lab import runner
from fish_lab.analysis import concentration, trivial_baseline
from fish_lab.config import load_config
from fish_lab.runner import Study, plan_runs
from fish_tuning.mask import FishMask
from test_compare import _config, workspace  # noqa: F401  (workspace is a pytest fixture)


def _equal_budget(root, out, **extra) -> dict:
    raw = _config(root, out_dir=str(out), mode="fixed_proportion", rank=1, fish_rank=4, fish_layers=2,
                  budgets=[1, 2], strategies=["original", "fish", "rev"], seeds=[0, 1], **extra)
    raw["train"].update(epochs=1, holdout_examples=12)
    return raw


def test_equal_budget_study_records(workspace, tmp_path, monkeypatch):  # noqa: F811
    calls = []
    real = runner.gradient_moments

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "gradient_moments", counting)
    records = Study(load_config(raw=_equal_budget(workspace, tmp_path)), log=lambda *a: None).run()
    assert len(records) == 2 * 2 * 3
    assert [r["seed"] for r in records] == [0] * 6 + [1] * 6  # seed by seed: a half study has whole seeds
    assert len(calls) == 2  # one Fisher pass per seed, shared by fish and rev at both budgets
    by = {(r["budget"], r["strategy"], r["seed"]): r for r in records}
    top1, all2 = by[(1, "original", 0)], by[(2, "original", 0)]
    assert (top1["rank"], top1["layers"], top1["trainable"]["peft"]) == (1, 1, 3 * (32 + 32))
    assert (all2["rank"], all2["layers"], all2["trainable"]["peft"]) == (1, 2, 2 * 3 * (32 + 32))
    for budget, orig in ((1, top1), (2, all2)):
        for strategy in ("fish", "rev"):
            r = by[(budget, strategy, 0)]
            assert r["rank"] == 4 and r["layers"] == 2
            assert r["trainable"]["candidates"] == 2 * 3 * 2 * 4 * 32  # the rank-4 pool over both layers
            assert r["trainable"]["peft"] == orig["trainable"]["peft"]
            assert sum(kept for _, kept, _ in r["mask"]["per_layer"]) == r["trainable"]["peft"]
            assert r["mask"]["concentration_top8_even"] <= r["mask"]["concentration_top8"] <= 1
    assert top1["mask"] is None
    # held-out part of train scored instead of dev; the trivial baseline is stated with every record
    assert {(r["eval_split"], r["dev_examples"], r["train_examples"]) for r in records} == {("holdout", 12, 36)}
    assert top1["trivial"]["rule"].startswith("majority class") and 0 < top1["trivial"]["score"] < 1


def test_holdout_is_seeded_disjoint_and_capped(workspace, tmp_path):  # noqa: F811
    raw = _equal_budget(workspace, tmp_path)
    raw["train"]["train_examples"] = 20
    cfg = load_config(raw=raw)
    data = runner._TaskData("sst2", cfg, runner.load_model(cfg.model)[1])
    again = runner._TaskData("sst2", cfg, runner.load_model(cfg.model)[1])
    assert len(data.dev_ex) == 12 and len(data.train_ex) == 20 and data.eval_split == "holdout"
    assert data.dev_ex == again.dev_ex and data.train_ex == again.train_ex
    key = lambda e: (e["text_a"], e["label"])  # noqa: E731
    assert not {key(e) for e in data.dev_ex} & {key(e) for e in data.train_ex}
    assert data.train_batches(0) is data.train_batches(0)  # tokenised once per seed
    raw["train"]["holdout_examples"] = 48
    with pytest.raises(ValueError, match="holdout_examples.*leaves no sst2 train"):
        runner._TaskData("sst2", load_config(raw=raw), runner.load_model(cfg.model)[1])


def test_strategies_come_from_the_mask_module():
    assert config_mod.RUN_STRATEGIES == ("original", *fish_tuning.selection.STRATEGIES)


@pytest.mark.parametrize(("change", "expect"), [
    ({"select_kwargs": {"rand": {"exclude": "x"}}}, "'rand' is not a masked strategy of this study"),
    ({"select_kwargs": {"fish": {"keep": 0.1}}}, "'keep' is not a select_mask argument"),
    ({"select_kwargs": {"fish": 3}}, "must be a mapping"),
    ({"fish_rank": 0}, "'fish_rank'"),
    ({"average_excludes": ["qnli"]}, "'average_excludes'"),
])
def test_bad_study_fields(workspace, tmp_path, change, expect):  # noqa: F811
    raw = _equal_budget(workspace, tmp_path)
    raw.update(change)
    with pytest.raises(ValueError, match=expect):
        load_config(raw=raw)
    with pytest.raises(ValueError, match="only used in fixed_proportion"):
        load_config(raw=_config(workspace, fish_rank=8))


def test_select_kwargs_reach_select_mask(workspace, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    real = arms_mod.select_mask

    def spy(scores, **kwargs):
        if "allocation" in kwargs:  # the arm's own selection (the other call is the paper mask it is compared to)
            seen.append((kwargs["strategy"], kwargs.pop("exclude", None)))
        return real(scores, **kwargs)

    monkeypatch.setattr(arms_mod, "select_mask", spy)
    raw = _equal_budget(workspace, tmp_path, select_kwargs={"fish": {"exclude": "nothing-matches"}})
    raw.update(budgets=[1], seeds=[0])
    records = Study(load_config(raw=raw), log=lambda *a: None).run()
    assert seen == [("fish", "nothing-matches"), ("rev", None)]
    assert records[1]["select_kwargs"] == {"exclude": "nothing-matches"} and records[2]["select_kwargs"] == {}


def test_plan_is_seed_major(workspace):  # noqa: F811
    cfg = load_config(raw=_config(workspace, seeds=[0, 1], strategies=["original", "fish"]))
    assert [(r.seed, r.strategy) for r in plan_runs(cfg)] == [(0, "original"), (0, "fish"), (1, "original"),
                                                                (1, "fish")]


def test_concentration_and_trivial_baseline():
    shapes = {"a": (2, 16), "b": (16, 2)}
    # a keeps all of columns 0..3 (8 entries in 4 columns); b keeps 8 entries spread over 8 rows
    mask = FishMask(shapes=shapes, indices={"a": torch.tensor([0, 1, 2, 3, 16, 17, 18, 19]),
                                            "b": torch.arange(0, 32, 4)})
    conc, even = concentration(mask, top=4)
    assert conc == pytest.approx((8 + 4) / 16) and even == pytest.approx(4 / 16)
    assert trivial_baseline("accuracy", [1, 1, 0], [0, 1, 1, 1]) == {"score": 0.75, "rule": "majority class 1"}
    assert trivial_baseline("mcc", [0, 0, 1], [0, 1]) == {"score": 0.0, "rule": "majority class 0"}
    assert trivial_baseline("pearson_spearman", [1.0, 2.0], [3.0])["score"] == 0.0


def test_group_by_length_keeps_the_examples_and_cuts_padding(workspace):  # noqa: F811
    from fish_lab.tasks import glue_batches

    tok = runner.load_model(str(workspace / "model"))[1]
    examples = [{"text_a": " ".join(["w3"] * (1 + (7 * i) % 23)), "text_b": None, "label": i % 2} for i in range(200)]
    plain = glue_batches(examples, tok, 8, 64, shuffle=True, seed=0)
    grouped = glue_batches(examples, tok, 8, 64, shuffle=True, seed=0, group_by_length=True)

    def tokens(batches):
        return sorted(tuple(row[m.bool()].tolist()) for b in batches for row, m in zip(b["input_ids"],
                                                                                       b["attention_mask"]))

    assert tokens(grouped) == tokens(plain)  # the same examples, batched differently
    padded = sum(b["input_ids"].numel() for b in grouped)
    assert padded < 0.7 * sum(b["input_ids"].numel() for b in plain)
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(grouped, glue_batches(
        examples, tok, 8, 64, shuffle=True, seed=0, group_by_length=True)))  # deterministic
    lengths = [b["input_ids"].shape[1] for b in grouped]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)  # batch order shuffled


@pytest.mark.skipif("fish_balanced" not in fish_tuning.selection.STRATEGIES, reason="fish_balanced not in this checkout")
def test_new_mask_strategies_run_at_the_original_budget(workspace, tmp_path):  # noqa: F811
    raw = _equal_budget(workspace, tmp_path, select_kwargs={"fish_balanced": {"alpha": 0.0}})
    raw.update(budgets=[2], seeds=[0], strategies=["original", "fish", "fish_balanced"])
    records = Study(load_config(raw=raw), log=lambda *a: None).run()
    orig, fish, bal = records
    assert fish["trainable"]["peft"] == bal["trainable"]["peft"] == orig["trainable"]["peft"]
    assert bal["select_kwargs"] == {"alpha": 0.0} and fish["select_kwargs"] == {}
    # alpha 0: every tensor gets an equal share, so the layers hold the budget evenly; fish need not
    assert [kept for _, kept, _ in bal["mask"]["per_layer"]] == [orig["trainable"]["peft"] // 2] * 2


def test_lr_by_budget(workspace, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    real = runner.optimizer_for_run
    monkeypatch.setattr(runner, "optimizer_for_run", lambda model, mask, cfg, lr=None, refresh=None: seen.append(
        lr) or real(model, mask, cfg, lr, refresh))
    raw = _equal_budget(workspace, tmp_path, lr_by_budget={1: 0.05})
    raw.update(seeds=[0], strategies=["original", "fish"])
    cfg = load_config(raw=raw)
    records = Study(cfg, log=lambda *a: None).run()
    assert seen == [0.05, 0.05, 0.01, 0.01] and [r["lr"] for r in records] == seen  # budget 2 keeps train.lr
    assert runner.setup_fingerprint(cfg) != runner.setup_fingerprint(load_config(raw={**raw, "lr_by_budget": {}}))
    for bad, msg in (({3: 0.1}, "not one of the budgets"), ({1: -1}, "positive number"), ([0.1], "must map")):
        with pytest.raises(ValueError, match=msg):
            load_config(raw={**raw, "lr_by_budget": bad})


def test_device_field(workspace, tmp_path):  # noqa: F811
    raw = _equal_budget(workspace, tmp_path)
    for bad, msg in (("gpu0", "torch device name"), (3, "torch device name")):
        with pytest.raises(ValueError, match=msg):
            load_config(raw={**raw, "device": bad})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU; use device=cpu"):
            load_config(raw={**raw, "device": "cuda"})
    cpu = load_config(raw=raw)
    assert cpu.device == "cpu"
    gpu = load_config(raw=raw)
    gpu.device = "cuda:0"  # set after validation: this machine may have no GPU
    assert runner.setup_fingerprint(gpu) != runner.setup_fingerprint(cpu)  # never one results file for both


def test_runs_record_their_device(workspace, tmp_path):  # noqa: F811
    raw = _equal_budget(workspace, tmp_path, device="cpu")
    raw.update(budgets=[1], seeds=[0], strategies=["original", "fish"])
    records = Study(load_config(raw=raw), log=lambda *a: None).run()
    assert [r["device"] for r in records] == ["cpu", "cpu"]
