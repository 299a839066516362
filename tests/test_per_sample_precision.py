"""Per-sample hooks in bf16: the 2-sample grouping probe and the per-batch sum check allow the rounding of the
precision actually used (bf16 weights as DeepSpeed ZeRO-3 ``bf16`` and FSDP2 mixed precision give, or autocast),
which a fixed 1e-4 did not: sharded models have no per-sample loop to fall back to, so compute_fisher raised. Rows
that are not samples must still fail the probe, in bf16 as in float32.
"""

import contextlib
import warnings

import pytest
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import fish_tuning as ft
from conftest import cls_batches, lm_batches, lora, tiny_bert, tiny_llama
from fish_tuning.exactness import float32_probe, low_precision, probe_sample_grouping
from fish_tuning.loglik import per_sample_log_likelihood
from fish_tuning.per_sample import PerSampleHooks
from test_audit_defects import FlatTokens

EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
# A bf16 model's scores against the float32 model's: its weights and gradients are each rounded to bf16 and the
# score is a square, about 2 eps on the largest entries (at most 1.6 % of a tensor's max measured here).
SCORE_TOL = 4 * EPS


def build(arch: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "llama":
            return lora(tiny_llama(), targets=("q_proj", "v_proj", "down_proj"), task="CAUSAL_LM")
        return lora(tiny_bert())


def fisher(model, batches, engine="vectorized", autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        return ft.compute_fisher(model, batches, num_samples=12, params=ft.peft_candidates(model), engine=engine,
                                 progress=False)


def probe(model, batch, params, upcast: bool | None = None) -> str | None:
    """The grouping probe on ``batch`` as compute_fisher runs it: in float32 for a half-precision model (unless
    ``upcast=False``, as for sharded models), else on the batch pass itself."""
    named = dict(model.named_parameters())
    cand = {n: named[n] for n in params}
    model.eval()
    for n, p in named.items():
        p.requires_grad_(n in cand)
    hooks = PerSampleHooks(model, cand)
    rows = batch["labels"].shape[0]
    upcast = low_precision(model, torch.device("cpu")) if upcast is None else upcast
    try:
        with float32_probe(model) if upcast else contextlib.nullcontext():
            return probe_sample_grouping(model, cand, hooks, batch, rows, per_sample_log_likelihood)
    finally:
        hooks.close()


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_bf16_vectorised_fisher_passes_and_matches_float32(arch, precision):
    """bf16 weights (as ZeRO-3/FSDP2 use) or fp32 weights under bf16 autocast: the probe passes, engine='vectorized'
    runs (it raises where a check fails), its scores are within 4 bf16 eps of each float32 tensor's max, and the
    kept entries mostly agree."""
    batches = lm_batches(2, batch_size=6) if arch == "llama" else cls_batches(2, batch_size=6)
    model = build(arch)
    ref = fisher(model, batches, engine="loop")
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        assert probe(model, batches[0], ft.peft_candidates(model)) is None
    got = fisher(model, batches, autocast=precision == "autocast")
    for n, want in ref.items():
        assert got[n].dtype == torch.float32
        err = float((got[n] - want).abs().max() / want.abs().max())
        assert err <= SCORE_TOL, f"{n}: {err:.3g} of the max, over {SCORE_TOL:.3g}"
    mine, theirs = ft.select_mask(got, keep=0.1), ft.select_mask(ref, keep=0.1)
    both = sum(int((mine.bool_mask(n) & theirs.bool_mask(n)).sum()) for n in ref)
    assert both >= 0.9 * theirs.num_selected, f"{both} of {theirs.num_selected} kept entries shared"


class MixRows(nn.Module):
    """A Linear's output rows mixed across the batch before the head: each row's gradient carries another sample's
    loss too. Right in the batch sum, wrong per sample: only the 2-sample probe can see it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.proj(self.emb(input_ids))
        h = 0.75 * h + 0.25 * h.roll(1, 0)
        return SequenceClassifierOutput(logits=self.head(torch.tanh(h).mean(1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda: FlatTokens(rows_of_first_sample=True), MixRows], ids=["first", "mixed"])
def test_rows_that_are_not_samples_fail_the_probe_in_any_precision(make, dtype):
    model = make().to(dtype)
    batches = cls_batches(2, batch_size=8)
    params = ["proj.weight", "proj.bias"]
    assert "do not group by sample" in (probe(model, batches[0], params) or "")
    with pytest.raises(RuntimeError, match="do not group by sample"):
        ft.compute_fisher(model, batches, num_samples=16, params=params, engine="vectorized", progress=False)
