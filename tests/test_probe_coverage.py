"""The grouping probe re-runs at every new batch size, on a sample *within* that batch (S2), and probes
half-precision models in float32 so that a coupling of a few percent is not lost in bf16 rounding (F3).

Before: one 2-sample probe at the first batch (a coupling that appears only in larger batches passed), compared
in the model's precision against an 8 bf16 eps tolerance (a 3-5 % grouping error passed in bf16).
"""

import logging
import warnings

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import fish_tuning as ft
from conftest import cls_batches, lora, tiny_bert

PARAMS = ["proj.weight", "proj.bias"]


class MixAbove(nn.Module):
    """Rows mixed across the batch (``coupling`` of the previous row) only when the batch has more than ``above``
    samples, as a batch-size-dependent coupling does (MoE capacity limits, batch-global routing)."""

    def __init__(self, coupling: float = 0.25, above: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.coupling, self.above = coupling, above
        self.emb = nn.Embedding(64, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.proj(self.emb(input_ids))
        if h.shape[0] > self.above:
            h = (1 - self.coupling) * h + self.coupling * h.roll(1, 0)
        return SequenceClassifierOutput(logits=self.head(torch.tanh(h).mean(1)))


def fisher(model, batches, engine="auto", params=PARAMS, num_samples=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        return ft.compute_fisher(model, batches, num_samples=num_samples, params=params, engine=engine,
                                 progress=False)


def logged(caplog, *args, **kwargs):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fish_tuning"):
        out = fisher(*args, **kwargs)
    return out, [r.getMessage() for r in caplog.records]


def rel_err(got, want):
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)


# ----------------------------------------------------------------------------- S2: coupling at larger batch sizes
def test_coupling_only_in_larger_batches_is_caught():
    """Rows mix only above 2 samples: the old 2-sample probe passed and the batch-sum check cannot see a coupling,
    so 'auto' returned a Fisher 10-30 % off the exact loop's. The probe at batch size 8 sees it."""
    model = MixAbove()
    batches = cls_batches(2, batch_size=8)
    loop = fisher(model, batches, engine="loop")
    auto = fisher(model, batches)
    assert rel_err(auto, loop) < 1e-5
    with pytest.raises(RuntimeError, match="do not group by sample"):
        fisher(model, batches, engine="vectorized")


def test_a_new_batch_size_is_probed_again(caplog):
    """Batches of 2 (clean: probed, vectorised) then of 8 (coupled): the second size is probed too, the loop takes
    over from there with the reason logged, and the result is the exact loop's."""
    model = MixAbove()
    batches = cls_batches(1, batch_size=2) + cls_batches(2, batch_size=8, seed=3)
    loop = fisher(model, batches, engine="loop", num_samples=18)
    auto, log = logged(caplog, model, batches, num_samples=18)
    assert rel_err(auto, loop) < 1e-5
    assert any("batch size 8" in m and "do not group by sample" in m for m in log), log
    assert "engine=vectorized+loop" in log[-1], log


def test_probe_costs_one_single_sample_pass_per_new_batch_size(caplog):
    """A float32 model piggybacks on the real pass: the extra work is one forward/backward of 1 sample per
    distinct batch size (here 8 and 4), none for a batch size already probed."""
    model = MixAbove(above=10**9)  # never mixes: clean
    sizes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    batches = cls_batches(2, batch_size=8) + cls_batches(1, batch_size=4, seed=5)
    auto, log = logged(caplog, model, batches, num_samples=20)
    assert sizes == [8, 1, 8, 4, 1]
    assert "engine=vectorized " in log[-1], log
    torch.testing.assert_close(auto, fisher(model, batches, engine="loop", num_samples=20), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- F3: precision of the probe
@pytest.mark.parametrize("coupling", [0.015, 0.01])
def test_a_few_percent_coupling_is_caught_in_bf16(coupling, caplog):
    """A bf16 model whose rows take 1-1.5 % of the previous sample's: a sample's gradient in the batch is 2.4-3.7 %
    of its largest entry off (float32), which the old probe's 8 bf16 eps (6.25 %) on squares let through, so
    'vectorized' ran and 'auto' kept it. Probed in float32 it is caught and 'auto' falls back to the loop."""
    model = MixAbove(coupling=coupling, above=0).to(torch.bfloat16)
    batches = cls_batches(2, batch_size=8)
    with pytest.raises(RuntimeError, match="do not group by sample"):
        fisher(model, batches, engine="vectorized")
    _, log = logged(caplog, model, batches)
    assert "engine=loop" in log[-1], log
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the probe's upcast is undone


def test_clean_bf16_model_keeps_the_vectorised_engine(caplog):
    model = lora(tiny_bert()).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, log = logged(caplog, model, cls_batches(2, batch_size=6), params=ft.peft_candidates(model), num_samples=12)
    assert "engine=vectorized " in log[-1], log
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n
