"""The vectorised Fisher engine's memory-bounding paths give the exact loop's numbers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fish_tuning as ft
import fish_tuning.fisher as fisher_mod
import fish_tuning.per_sample as per_sample
from conftest import cls_batches
from test_fisher import assert_close, brute_force


def test_row_chunks_match_brute_force(bert_lora, monkeypatch):
    batches = cls_batches(n_batches=2, batch_size=8)
    names = [n for n, p in bert_lora.named_parameters() if p.requires_grad]  # LoRA plus the dense head
    calls = []
    real = per_sample.PerSampleHooks._record

    def spy(self, name, g, a):
        calls.append(self.chunk_elems)
        return real(self, name, g, a)

    monkeypatch.setattr(per_sample, "CHUNK_ELEMS", 64)  # fewer entries than one sample's gradient: 1 row a chunk
    monkeypatch.setattr(per_sample.PerSampleHooks, "_record", spy)
    got = ft.compute_fisher(bert_lora, batches, num_samples=16, params=names, engine="vectorized", progress=False)
    assert calls and set(calls) == {64}
    assert_close(got, brute_force(bert_lora, batches, names))


class TwiceLinear(nn.Module):
    """One Linear applied twice per forward: its per-sample gradient is the sum of both uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.lin(torch.tanh(self.lin(h))))
        return SimpleNamespace(logits=self.head(h.mean(1)))


@pytest.mark.parametrize("chunk", [1 << 24, 8])
def test_module_used_twice_matches_brute_force(monkeypatch, chunk):
    monkeypatch.setattr(per_sample, "CHUNK_ELEMS", chunk)
    model = TwiceLinear()
    batches = cls_batches(n_batches=2, batch_size=6, num_labels=3)
    for b in batches:
        b.pop("attention_mask")
    names = ["lin.weight", "lin.bias", "head.weight"]
    got = ft.compute_fisher(model, batches, num_samples=12, params=names, engine="vectorized", progress=False)
    assert_close(got, brute_force(model, batches, names))


def test_causal_lm_log_likelihood_is_the_sum_over_scored_next_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :2] = -100
    labels[1, -3:] = -100
    ref = torch.zeros(3)
    for b in range(3):
        for t in range(6):  # position t predicts label t + 1
            if labels[b, t + 1] != -100:
                ref[b] += torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
    torch.testing.assert_close(fisher_mod.per_sample_log_likelihood(logits, labels), ref)
