"""Named selection arms in `fish-tune compare` (issue 23): the shuffled control, per-arm rates, warm-up + rewind."""

from __future__ import annotations

import pytest
import torch

from fish_lab import arms as arms_mod
from fish_lab.config import load_config
from fish_lab.runner import Study
from test_compare import _config, workspace  # noqa: F401  (workspace is a pytest fixture)

ARMS = {"shuffled": {"strategy": "rand", "allocation": "fish"},
        "uniform_consistency": {"allocation": "uniform", "score": "consistency"},
        "warm_uniform": {"allocation": "uniform", "warmup_steps": 2},
        "moving": {"allocation": "uniform", "refresh_every": 2, "refresh_fraction": 0.5, "refresh_until": 6}}


def _raw(root, out, **extra):
    raw = _config(root, out_dir=str(out), mode="fixed_proportion", rank=1, fish_rank=4, fish_layers=2, budgets=[2],
                  strategies=["fish", "shuffled", "uniform_consistency", "warm_uniform", "moving"], arms=ARMS,
                  lr_by_arm={"shuffled": 0.03, "warm_uniform": {2: 0.02}}, **extra)
    raw["train"].update(epochs=1)
    return raw


def test_arms_run_with_their_own_counts_rates_and_overlap(workspace, tmp_path):  # noqa: F811
    records = Study(load_config(raw=_raw(workspace, tmp_path)), log=lambda *a: None).run()
    by = {r["strategy"]: r for r in records}
    layers = {s: [kept for _, kept, _ in by[s]["mask"]["per_layer"]] for s in by}
    assert layers["shuffled"] == layers["fish"]  # the shuffled control: FISH's counts ...
    assert 0 < by["shuffled"]["jaccard_fish"] < 1  # ... at other positions
    assert len(set(layers["uniform_consistency"])) == 1  # uniform: the same count in each (same-sized) layer
    assert {s: r["lr"] for s, r in by.items()} == {"fish": 0.01, "shuffled": 0.03, "uniform_consistency": 0.01,
                                                   "warm_uniform": 0.02, "moving": 0.01}
    moving = by["moving"]["refresh"]  # the mask moved twice in the 6 steps, exactly k throughout
    assert [h["step"] for h in moving["history"]] == [2, 4] and all(h["regrown"] > 0 for h in moving["history"])
    assert "refresh" not in by["uniform_consistency"]
    assert by["shuffled"]["arm"] == {"strategy": "rand", "allocation": "fish", "score": "fisher", "warmup_steps": 0}
    assert "arm" not in by["fish"] and "jaccard_fish" not in by["fish"]
    # warm-up arm: scored later (its own Fisher pass), compared with the paper mask at init
    assert by["warm_uniform"]["fisher_seconds"] > 0 and 0 <= by["warm_uniform"]["jaccard_fish"] <= 1
    assert len({r["trainable"]["peft"] for r in records}) == 1  # every arm at the Original's count


def test_resume_refuses_a_changed_arm_and_configs_name_bad_fields(workspace, tmp_path):  # noqa: F811
    raw = _raw(workspace, tmp_path, seeds=[0])
    raw.update(strategies=["shuffled"], lr_by_arm={"shuffled": 0.03})
    Study(load_config(raw=raw), log=lambda *a: None).run()
    raw["arms"] = {**ARMS, "shuffled": {"strategy": "rand", "allocation": "uniform"}}
    with pytest.raises(ValueError, match="was made with arm"):
        Study(load_config(raw=raw), log=lambda *a: None).run()
    raw["arms"] = {**ARMS, "shuffled": {"strategy": "rand", "allocation": "erk"}}
    with pytest.raises(ValueError, match=r"arms.shuffled.allocation"):
        load_config(raw=raw)
    with pytest.raises(ValueError, match="built-in strategy"):
        load_config(raw={**raw, "arms": {"fish": {}}})
    with pytest.raises(ValueError, match="lr_by_arm"):
        load_config(raw={**raw, "arms": ARMS, "lr_by_arm": {"nope": 0.1}})


def test_warm_up_rewinds_exactly_and_leaves_the_training_rng_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, labels):
            return type("Out", (), {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)})

    wrapped = Wrap()
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    batches = [{"x": torch.randn(8, 4), "labels": torch.randint(0, 2, (8,))} for _ in range(3)]
    torch.manual_seed(5)
    init = arms_mod.warm_up(wrapped, batches, steps=3, lr=0.1, weight_decay=0.01)
    after_warm = torch.rand(1)
    assert any(not torch.equal(p, before[n]) for n, p in wrapped.named_parameters())
    init.rewind(wrapped)
    assert all(torch.equal(p, before[n]) for n, p in wrapped.named_parameters())
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after_warm)  # the warm-up's dropout draws came from a forked RNG
