"""Sequence logits are scored against the labels the model's own loss pairs them with: the next label for a causal
LM, the label at the same position for token classification and encoder-decoder models (a shift there is no error,
just a wrong Fisher). The reference is each model's own ``.loss``, one sample at a time."""

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate
from transformers import BertConfig, BertForTokenClassification, T5Config, T5ForConditionalGeneration

import fish_tuning as ft
from conftest import VOCAB, lm_batches, lora, tiny_bert, tiny_llama
from fish_tuning.loglik import ModelLogLik, label_shift, per_sample_log_likelihood, sample_labels
from test_trainer_callback import bert_rows

TAGS = 5


def token_cls():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=TAGS)
    return lora(BertForTokenClassification(cfg).eval(), task="TOKEN_CLS")


def seq2seq():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    return lora(T5ForConditionalGeneration(cfg).eval(), targets=("q", "v"), task="SEQ_2_SEQ_LM")


def causal_lm():
    return lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM")


def batches(kind, model, n=1, rows=6, seed=5):
    """Token tags with an unlabelled first token; seq2seq targets (decoder inputs as DataCollatorForSeq2Seq
    builds them, or none: the model builds them from the labels); causal LM as everywhere else."""
    if kind == "causal":
        return lm_batches(n, batch_size=rows)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (rows, 10), generator=g)
        labels = torch.randint(0, TAGS, (rows, 10), generator=g) if kind == "tags" else \
            torch.randint(1, VOCAB, (rows, 6), generator=g)
        labels[:, 0 if kind == "tags" else -1] = -100
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if kind == "seq2seq":
            batch["decoder_input_ids"] = model.get_base_model()._shift_right(labels)
        out.append(batch)
    return out


def own_loss_fisher(model, data, names, shift):
    """Mean squared gradient of each sample's summed token NLL: the model's own mean loss times its token count."""
    params = dict(model.named_parameters())
    sums, count = {n: torch.zeros_like(params[n]) for n in names}, 0
    for batch in data:
        for i in range(batch["labels"].shape[0]):
            row = {k: v[i: i + 1] for k, v in batch.items()}
            tokens = int(((row["labels"][:, 1:] if shift else row["labels"]) != -100).sum())
            grads = torch.autograd.grad(model(**row).loss * tokens, [params[n] for n in names])
            for n, g in zip(names, grads):
                sums[n] += g.square()
            count += 1
    return {n: s / count for n, s in sums.items()}


def max_rel_err(got, ref):
    return max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)) for n in ref)


CASES = {"token-cls": (token_cls, "tags", False), "seq2seq": (seq2seq, "seq2seq", False),
         "seq2seq-no-decoder-inputs": (seq2seq, "seq2seq-bare", False), "causal-lm": (causal_lm, "causal", True)}


@pytest.mark.parametrize("engine", ["vectorized", "loop"])
@pytest.mark.parametrize("case", list(CASES))
def test_fisher_matches_the_models_own_loss(case, engine):
    build, kind, shift = CASES[case]
    model = build()
    assert label_shift(model) is shift
    data = batches(kind, model)
    names = ft.peft_candidates(model)
    ref = own_loss_fisher(model, data, names, shift)
    got = ft.compute_fisher(model, data, num_samples=6, params=names, engine=engine, progress=False)
    assert max_rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("shift", [True, False])
def test_sampled_labels_follow_the_alignment(shift):
    labels = torch.tensor([[-100, 3, 1, 4], [2, 0, 3, -100]])
    target = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])  # the class each position predicts, with certainty
    drawn = sample_labels(100.0 * nn.functional.one_hot(target, TAGS), labels, torch.Generator().manual_seed(0),
                          shift=shift)
    want = torch.cat([labels[:, :1], target[:, :-1]], 1) if shift else target
    assert torch.equal(drawn, torch.where(labels == -100, labels, want))
    bound = ModelLogLik(per_sample_log_likelihood, token_cls())  # compute_fisher's kind="expected" path
    logits = 100.0 * nn.functional.one_hot(target, TAGS)
    assert torch.equal(bound.sample(logits, labels), torch.where(labels == -100, labels, target))


class Tagger(nn.Module):
    """3-D logits from a model that names neither its task nor its architecture."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, TAGS)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids))))


@pytest.mark.parametrize("kind", ["empirical", "expected"])
def test_unclassifiable_sequence_model_raises_and_says_the_fix(kind):
    data = batches("tags", None)
    with pytest.raises(ValueError, match=r"Tagger.*line up.*shift=True.*shift=False"):
        ft.compute_fisher(Tagger(), data, num_samples=6, kind=kind, progress=False)
    aligned = functools.partial(per_sample_log_likelihood, shift=False)
    got = ft.compute_fisher(Tagger(), data, num_samples=6, kind=kind, loglik_fn=aligned, progress=False)
    if kind == "empirical":  # the fix scores what cross-entropy at each position does
        model, names = Tagger(), ["head.weight", "emb.weight"]
        params = dict(model.named_parameters())
        ref = {n: torch.zeros_like(params[n]) for n in names}
        for row in (dict(input_ids=b["input_ids"][i:i + 1], y=b["labels"][i]) for b in data for i in range(6)):
            nll = nn.functional.cross_entropy(model(row["input_ids"]).logits[0], row["y"], reduction="sum")
            for n, g in zip(names, torch.autograd.grad(nll, [params[n] for n in names])):
                ref[n] += g.square() / 6
        assert max_rel_err(got, ref) <= 1e-4


def test_own_loglik_fn_is_trusted_and_may_declare_its_alignment():
    data = batches("tags", None)

    def mine(logits, labels):
        return per_sample_log_likelihood(logits, labels, shift=False)

    ft.compute_fisher(Tagger(), data, num_samples=6, loglik_fn=mine, progress=False)
    with pytest.raises(ValueError, match="`shift` attribute"):
        ft.compute_fisher(Tagger(), data, num_samples=6, kind="expected", loglik_fn=mine, progress=False)
    mine.shift = False
    ft.compute_fisher(Tagger(), data, num_samples=6, kind="expected", loglik_fn=mine, progress=False)


def test_fish_callback_passes_loglik_fn_to_the_fisher_pass():
    calls = []

    def spy(logits, labels):
        calls.append(tuple(logits.shape))
        return per_sample_log_likelihood(logits, 1 - labels)  # another Fisher, so another mask

    model = lora(tiny_bert(), modules_to_save=["classifier"])
    rows = bert_rows(n_batches=2)
    loader = ft.calibration_loader(rows, 16, batch_size=4, collate_fn=default_collate, seed=0)
    names = ft.peft_candidates(model)
    want = ft.select_mask(ft.compute_fisher(model, loader, num_samples=16, params=names, loglik_fn=spy,
                                            progress=False), keep=0.05)
    calls.clear()
    cb = ft.FishCallback(keep=0.05, num_samples=16, loglik_fn=spy)
    args = SimpleNamespace(seed=0, per_device_train_batch_size=4, disable_tqdm=True)
    mask = cb._select(args, SimpleNamespace(is_local_process_zero=False), model, DataLoader(rows, batch_size=4))
    assert calls and all(torch.equal(mask.indices[n], want.indices[n]) for n in names)
    with pytest.raises(TypeError, match="loglik_fn must be callable"):
        ft.FishCallback(keep=0.05, loglik_fn="causal")
