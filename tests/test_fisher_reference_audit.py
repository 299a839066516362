"""Outside audit of compute_fisher against an independent brute-force reference.

The reference owns nothing of the library's: one sample at a time (batch size 1), plain autograd on the model's
own output, log p(y|x) written out here (class: the model's own cross-entropy loss; causal LM: the model's own
token-mean loss times its label-token count; regression: a unit-variance Gaussian over every output; multi-label:
a Bernoulli per output), each sample's gradient squared in float64 and averaged. Each configuration below is one an
outsider would try; ``engine="auto"`` must match it to float tolerance (the engine it picks is free).
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

import fish_tuning as ft
from fish_tuning.loglik import ModelLogLik, per_sample_log_likelihood

V = 64
RTOL = 1e-4


def bert(num_labels: int = 2, problem_type: str | None = None) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=num_labels, problem_type=problem_type)
    return BertForSequenceClassification(cfg).eval()


def llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, **kw)


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=1)).eval()


def lora(model, **kw):
    kw = {"r": 4, "lora_alpha": 8, "init_lora_weights": "pissa", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(**kw))


def away_from_init(model, seed: int = 3):
    """(IA)³ vectors, DoRA magnitudes and embedding-LoRA A start at values that hide a wrong factor or zero B."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if any(k in n for k in ("ia3_l", "lora_magnitude_vector", "lora_embedding_A")):
            offset = 0.0 if "lora_embedding_A" in n else 1.0
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5 + offset)
    return model


def cls_batches(n=2, bs=5, seq=9, labels="class", classes=2, seed=1):
    """Right-padded rows whose padding is the pad id 0 (the embedding's padding_idx for BERT)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, V, (bs, seq), generator=g)
        att = torch.ones_like(ids)
        att[: bs // 2, seq - 3:] = 0
        ids[att == 0] = 0
        if labels == "class":
            y = torch.randint(0, classes, (bs,), generator=g)
        elif labels == "regression":
            y = torch.randn(bs, classes, generator=g).squeeze(1) * 2
        else:  # multi-label
            y = (torch.rand(bs, classes, generator=g) > 0.5).float()
        out.append({"input_ids": ids, "attention_mask": att, "labels": y})
    return out


def lm_batches(n=2, bs=5, lens=(10, 10), side="right", seed=2):
    """Rows of three lengths per batch, padded on ``side``; the first two real tokens are an unscored prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n):
        s = lens[j]
        ids = torch.randint(1, V, (bs, s), generator=g)
        att = torch.ones_like(ids)
        for r in range(bs):
            real = s - (r % 3)
            if side == "right":
                att[r, real:] = 0
            else:
                att[r, : s - real] = 0
        ids[att == 0] = 0
        labels = ids.masked_fill(att == 0, -100)
        first = (att.cumsum(1) <= 2) & (att == 1)
        out.append({"input_ids": ids, "attention_mask": att, "labels": labels.masked_fill(first, -100)})
    return out


def reference(model, batches, names, num_samples, kind):
    params = dict(model.named_parameters())
    was = model.training
    model.eval()
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in names}
    count = 0
    for batch in batches:
        for i in range(batch["labels"].shape[0]):
            if count == num_samples:
                break
            row = {k: v[i: i + 1] for k, v in batch.items()}
            y = row["labels"]
            if kind == "class" and int(y) == -100:
                continue
            out = model(**row)
            if kind == "class":
                ll = -out.loss
            elif kind == "lm":
                ll = -out.loss * int((y[:, 1:] != -100).sum())
            elif kind == "regression":
                ll = -0.5 * (out.logits - y.float().view(out.logits.shape)).square().sum()
            else:
                ll = -F.binary_cross_entropy_with_logits(out.logits, y, reduction="sum")
            for n, g in zip(names, torch.autograd.grad(ll, [params[n] for n in names], allow_unused=True)):
                if g is not None:
                    sums[n] += g.double().square()
            count += 1
    model.train(was)
    assert count == num_samples
    return {n: (s / count).float() for n, s in sums.items()}


def check(model, batches, num_samples, kind, names=None):
    names = ft.peft_candidates(model) if names is None else names
    was = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ft.compute_fisher(model, batches, num_samples=num_samples, params=names, progress=False)
    assert model.training == was
    want = reference(model, batches, names, num_samples, kind)
    assert set(got) == set(names)
    for n in names:
        scale = float(want[n].abs().max())
        assert scale > 0, f"reference Fisher of {n} is all zero: the case tests nothing"
        err = float((got[n] - want[n]).abs().max()) / scale
        assert err <= RTOL, f"{n}: relative error {err:.2e}"


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------- causal LMs
def test_gpt2_conv1d_lora_attention_and_mlp_left_padded_variable_length():
    model = lora(gpt2(), target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"], fan_in_fan_out=True,
                 task_type="CAUSAL_LM")
    check(model, lm_batches(n=3, bs=4, lens=(7, 11, 9), side="left"), 9, "lm")  # 9 = 4 + 4 + 1 of 3 batches


def test_gpt2_lora_on_token_and_position_embeddings():
    # wpe looks up position ids [1, T], not one row per sample: the engine must not treat them as samples.
    model = away_from_init(lora(gpt2(), target_modules=["wte", "wpe", "c_attn"], fan_in_fan_out=True,
                                task_type="CAUSAL_LM"))
    check(model, lm_batches(), 10, "lm")


def test_gpt2_dora_and_ia3_on_conv1d():
    dora = away_from_init(lora(gpt2(), target_modules=["c_attn", "c_fc"], use_dora=True, fan_in_fan_out=True,
                               task_type="CAUSAL_LM"))
    check(dora, lm_batches(), 10, "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = away_from_init(get_peft_model(gpt2(), peft.IA3Config(
            target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True,
            task_type="CAUSAL_LM")))
    check(ia3, lm_batches(side="left"), 10, "lm")


def test_llama_rslora_dropout_in_train_mode_with_gradient_checkpointing_is_the_eval_model_fisher():
    """The Fisher is of the deterministic (eval) model: lora_dropout and checkpointing change nothing, and the
    caller's train() mode is restored."""
    model = lora(llama(), target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], use_rslora=True,
                 lora_dropout=0.3, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in transformers 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    check(model, lm_batches(side="left"), 10, "lm")


def test_llama_two_adapters_only_the_active_one_is_scored_and_both_when_both_are_active():
    model = lora(llama(), target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"],
                                           init_lora_weights="pissa", task_type="CAUSAL_LM"))
    model.set_adapter("second")
    assert all(".second." in n for n in ft.peft_candidates(model))
    check(model, lm_batches(), 10, "lm")
    model.base_model.set_adapter(["default", "second"])
    check(model, lm_batches(), 10, "lm")


def test_llama_modules_to_save_head_and_embedding_with_all_trainable_tensors():
    model = lora(llama(), target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"],
                 task_type="CAUSAL_LM")
    check(model, lm_batches(), 10, "lm", names=trainable(model))


# ----------------------------------------------------------------------------------------------- classifiers
def test_bert_lora_embedding_with_padding_ids_and_bias_all():
    model = away_from_init(lora(bert(), target_modules=["word_embeddings", "query", "intermediate.dense"],
                                bias="all", task_type="SEQ_CLS"))
    check(model, cls_batches(), 10, "class", names=trainable(model))  # LayerNorm biases too


def test_bert_dora_ia3_and_modules_to_save_embeddings():
    dora = away_from_init(lora(bert(3), target_modules=["query", "value"], use_dora=True,
                               modules_to_save=["classifier", "token_type_embeddings"], task_type="SEQ_CLS"))
    check(dora, cls_batches(classes=3), 10, "class", names=trainable(dora))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ia3 = away_from_init(get_peft_model(bert(), peft.IA3Config(
            target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"],
            task_type="SEQ_CLS")))
    check(ia3, cls_batches(), 10, "class")


def test_class_labels_minus_100_are_skipped_and_n_does_not_divide_the_batches():
    batches = cls_batches(n=3, bs=4)
    batches[0]["labels"][1] = -100
    batches[1]["labels"][:] = -100
    batches[2]["labels"][0] = -100
    model = lora(bert(), target_modules=["query", "value"], task_type="SEQ_CLS")
    check(model, batches, 5, "class", names=trainable(model))


def test_regression_one_output_llama_left_padded():
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(llama_config(num_labels=1)).eval()
    model = lora(base, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    batches = cls_batches(labels="regression", classes=1)
    for b in batches:
        b["attention_mask"] = b["attention_mask"].flip(1)
        b["input_ids"] = torch.where(b["attention_mask"] == 1, b["input_ids"].clamp_min(1), 0)
    check(model, batches, 10, "regression", names=trainable(model))


def test_regression_with_several_outputs_is_gaussian_not_bernoulli():
    """problem_type="regression" with num_labels=3 (the model's own loss is MSE over the 3 outputs): float labels
    [B, 3] used to be scored as multi-label Bernoulli (BCE), a different gradient for every entry."""
    model = lora(bert(3, problem_type="regression"), target_modules=["query", "value"], task_type="SEQ_CLS")
    check(model, cls_batches(labels="regression", classes=3), 10, "regression", names=trainable(model))


@pytest.mark.parametrize("outputs", [3, 1])
def test_multi_label_is_bernoulli_per_output(outputs):
    """One output with problem_type="multi_label_classification" (the model's loss: BCE) used to score as a
    Gaussian regression."""
    model = lora(bert(outputs, problem_type="multi_label_classification"), target_modules=["query", "value"],
                 task_type="SEQ_CLS")
    check(model, cls_batches(labels="multi", classes=outputs), 10, "multi", names=trainable(model))


def test_expected_fisher_of_several_output_regression_draws_gaussian_labels():
    model = lora(bert(3, problem_type="regression"), target_modules=["query"], task_type="SEQ_CLS")
    batches = cls_batches(n=1, labels="regression", classes=3)
    logits = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits.detach()
    ll = ModelLogLik(per_sample_log_likelihood, model)
    drawn = ll.sample(logits, batches[0]["labels"], torch.Generator().manual_seed(0))
    assert drawn.shape == logits.shape and drawn.is_floating_point()
    assert not bool(((drawn == 0) | (drawn == 1)).all()), "labels drawn as Bernoulli 0/1, not Gaussian"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher = ft.compute_fisher(model, batches, num_samples=5, kind="expected", progress=False)
    assert all(bool(f.any()) and bool(torch.isfinite(f).all()) for f in fisher.values())
