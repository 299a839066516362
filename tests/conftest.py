"""Tiny random models built from configs (no downloads) and batches for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# the paper's lab (lab/fish_lab) is not in the package: put it on the path of the processes tests start too
# (pyproject's pytest `pythonpath` covers this process; a dev install's .pth covers both)
_LAB = str(Path(__file__).resolve().parents[1] / "lab")
if _LAB not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_LAB, os.environ.get("PYTHONPATH")) if p)

VOCAB = 64


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def lora(model, init="pissa", targets=("query", "value"), r=4, use_dora=False, task="SEQ_CLS", **kw):
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=init,
                     use_dora=use_dora, task_type=task, lora_dropout=0.0, **kw)
    return get_peft_model(model, cfg)


def cls_batches(n_batches=2, batch_size=8, seq=10, num_labels=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq), generator=g)
        att = torch.ones_like(ids)
        att[: batch_size // 2, seq - 3:] = 0  # padding in half the rows
        if num_labels == 1:
            labels = torch.rand(batch_size, generator=g) * 5
        else:
            labels = torch.randint(0, num_labels, (batch_size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": att, "labels": labels})
    return out


def lm_batches(n_batches=2, batch_size=8, seq=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (batch_size, seq), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # prompt tokens are not scored
        labels[0, -3:] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


@pytest.fixture
def bert_lora():
    return lora(tiny_bert())


@pytest.fixture
def llama_lora():
    return lora(tiny_llama(), targets=("q_proj", "v_proj"), task="CAUSAL_LM")


def shared_data_dir() -> Path | None:
    env = os.environ.get("FISH_DATA_DIR")
    for cand in ([Path(env)] if env else []) + [Path(__file__).resolve().parents[1].parent / "shared" / "data"]:
        if (cand / "glue").is_dir():
            return cand
    return None
