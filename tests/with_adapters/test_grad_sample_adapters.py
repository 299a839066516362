"""The vectorised Fisher engine on the ``adapters`` library: its LoRA (UniPELT's too) has a per-sample rule, and
bottleneck adapters / prefix tables go through the nn.Linear / nn.Embedding rules. ``engine="auto"`` must not fall
back to the loop and must equal it (rtol 2e-4: float32 sums in another order). Runs in .venv-adapters."""

import logging
import warnings

import pytest
import torch

pytest.importorskip("adapters")

from test_methods_adapters import batches_for, build  # noqa: E402

import fish_tuning as ft  # noqa: E402


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["seq_bn", "prefix_tuning", "lora", "unipelt"])
def test_vectorised_equals_loop_without_falling_back(arch, method):
    model = build(arch, method)
    batches = batches_for(arch)
    cand = ft.peft_candidates(model)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name in cand and not p.any():  # adapters starts LoRA's B at zero: A would score zero everywhere
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("fish_tuning")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = ft.compute_fisher(model, batches, num_samples=16, params=cand, progress=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert lines[-1].startswith("compute_fisher: engine=vectorized "), lines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = ft.compute_fisher(model, batches, num_samples=16, params=cand, engine="loop", progress=False)
    for n in cand:
        torch.testing.assert_close(auto[n], loop[n], rtol=2e-4, atol=1e-10, msg=f"Fisher of {n}")
    assert all(bool(loop[n].any()) for n in cand if "lora" in n), "a LoRA factor scores zero: nothing tested"
