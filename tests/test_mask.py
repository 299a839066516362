import pytest
import torch

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert
from fish_tuning.mask import layer_of


def scores():
    g = torch.Generator().manual_seed(0)
    return {"a.layer.0.w": torch.rand(4, 5, generator=g), "a.layer.1.w": torch.rand(3, 7, generator=g),
            "head.w": torch.rand(6, generator=g)}


@pytest.mark.parametrize("strategy", ["fish", "rand", "rev"])
@pytest.mark.parametrize("k", [1, 7, 47])
def test_exactly_k(strategy, k):
    assert ft.select_mask(scores(), budget=k, strategy=strategy).num_selected == k


def test_keep_fraction_rounds_to_exact_k():
    m = ft.select_mask(scores(), keep=0.1)
    assert m.num_selected == round(0.1 * 47)
    assert ft.select_mask(scores(), keep=1.0).num_selected == 47


def flat_values(s, m):
    return torch.cat([s[n].reshape(-1)[m.indices[n]] for n in m.names])


def test_fish_is_top_k_and_rev_is_bottom_k():
    s = scores()
    allv = torch.cat([v.reshape(-1) for v in s.values()])
    top = ft.select_mask(s, budget=10, strategy="fish")
    bot = ft.select_mask(s, budget=10, strategy="rev")
    assert torch.equal(flat_values(s, top).sort().values, allv.topk(10).values.sort().values)
    assert torch.equal(flat_values(s, bot).sort().values, (-allv).topk(10).values.neg().sort().values)


def test_ties_broken_deterministically_by_position():
    s = {"x": torch.ones(10), "y": torch.ones(5)}
    m = ft.select_mask(s, budget=4)
    assert m.indices["x"].tolist() == [0, 1, 2, 3] and m.indices["y"].numel() == 0
    r = ft.select_mask(s, budget=12, strategy="rev")
    assert m.num_selected == 4 and r.indices["x"].tolist() == list(range(10)) and r.indices["y"].tolist() == [0, 1]


def test_rand_seeded():
    a = ft.select_mask(scores(), budget=10, strategy="rand", seed=1)
    b = ft.select_mask(scores(), budget=10, strategy="rand", seed=1)
    c = ft.select_mask(scores(), budget=10, strategy="rand", seed=2)
    same = all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)
    diff = any(not torch.equal(a.indices[n], c.indices[n]) for n in a.names)
    assert same and diff


def test_exclude_and_always_train():
    m = ft.select_mask(scores(), keep=0.5, exclude=r"layer\.1", always_train="head")
    assert m.names == ["a.layer.0.w"]
    assert m.always_train == ["head.w"] and m.meta["always_train_numel"] == 6
    assert m.num_selected == 10
    assert "always trainable" in m.summary()


def test_summary_and_per_layer():
    m = ft.select_mask(scores(), budget=20)
    layers = m.per_layer()
    assert sum(k for k, _ in layers.values()) == 20
    assert layers[0][1] == 20 and layers[1][1] == 21 and layers[None][1] == 6
    assert "kept 20 of 47" in m.summary()
    assert all(f"/ {total:>10,}  {name}" in m.summary(per_tensor=True) for name, (_, total) in m.per_tensor().items())
    assert layer_of("base_model.model.bert.encoder.layer.11.attention.self.query.lora_A.default.weight") == 11
    assert layer_of("model.layers.3.self_attn.q_proj.lora_B.default.weight") == 3


def test_per_module_and_the_mask_grid_agree_for_any_adapter_name():
    """Both views name a module by mask.module_of, whatever the adapter is called: with ``task1`` (not
    ``default``) two separate rules gave ``lora_A.task1`` and ``query.lora_A`` in one summary."""
    from fish_tuning.commands.maskview import grid

    gen = torch.Generator().manual_seed(0)
    names = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{f}.task1.weight"
             for i in range(2) for m in ("query", "value") for f in "AB"]
    mask = ft.select_mask({n: torch.rand(2, 3, generator=gen) for n in names}, budget=10)
    modules = ["query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"]
    assert list(mask.per_module()) == modules
    assert grid(mask)["kinds"] == modules
    assert sum(kept for kept, _ in mask.per_module().values()) == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0.0}, "keep"), ({"keep": -0.1}, "keep"), ({"keep": 1.5}, "keep"),
        ({"budget": 0}, "budget"), ({"budget": 48}, "budget"), ({"budget": -1}, "budget"),
        ({}, "exactly one"), ({"keep": 0.1, "budget": 3}, "exactly one"),
        ({"keep": 0.1, "strategy": "top"}, "strategy"),
        ({"keep": 0.1, "exclude": "."}, "no candidate"),
    ],
)
def test_bad_selection_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ft.select_mask(scores(), **kwargs)


def test_nan_scores_named():
    s = scores()
    s["head.w"][0] = float("nan")
    with pytest.raises(ValueError, match="head.w"):
        ft.select_mask(s, keep=0.1)


def test_save_load_round_trip_and_model_check(tmp_path, bert_lora):
    fisher = ft.compute_fisher(bert_lora, cls_batches(), num_samples=16, params=ft.peft_candidates(bert_lora),
                               progress=False)
    m = ft.select_mask(fisher, keep=0.05)
    path = tmp_path / "sub" / "mask.safetensors"
    m.save(path)
    back = ft.FishMask.load(path, model=bert_lora)
    assert back.num_selected == m.num_selected and back.shapes == m.shapes
    assert all(torch.equal(back.indices[n], m.indices[n]) for n in m.names)
    assert [p.name for p in path.parent.iterdir()] == ["mask.safetensors"]  # no temp file left

    other = lora(tiny_bert(), r=2)
    with pytest.raises(ValueError, match="shape"):
        back.check(other)
    other = lora(tiny_bert(), targets=("key",))
    with pytest.raises(ValueError, match="not a parameter"):
        ft.FishMask.load(path, model=other)


def test_corrupt_mask_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    ft.select_mask(scores(), keep=0.2).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt mask file"):
        ft.FishMask.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt mask file"):
        ft.FishMask.load(path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="no fish-mask metadata"):
        ft.FishMask.load(path)
    with pytest.raises(FileNotFoundError):
        ft.FishMask.load(tmp_path / "missing.safetensors")


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        ft.select_mask(scores(), keep=0.2).save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
