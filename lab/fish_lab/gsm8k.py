"""GSM8K as causal-LM fine-tuning: loss only on answer tokens; exact match of the final number by greedy decoding."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

PROMPT = "Question: {question}\nAnswer:"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def prompt_of(example: dict) -> str:
    return PROMPT.format(question=example["question"].strip())


def lm_batches(examples: Sequence[dict], tokenizer, batch_size: int = 8, max_length: int = 256,
               shuffle: bool = False, seed: int = 0) -> list[dict]:
    """Right-padded ``prompt + " " + answer + eos`` with ``labels = -100`` on prompt and padding tokens."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token or ""
    batches = []
    for start in range(0, len(order), batch_size):
        rows = []
        for i in order[start: start + batch_size]:
            ex = examples[i]
            p_ids = tokenizer(prompt_of(ex), add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(" " + ex["answer"].strip() + eos, add_special_tokens=False)["input_ids"]
            ids = (p_ids + a_ids)[:max_length]
            labels = ([-100] * len(p_ids) + a_ids)[:max_length]
            rows.append((ids, labels))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            labels[r, : len(lab)] = torch.tensor(lab)
            att[r, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": att, "labels": labels})
    return batches


def final_number(text: str) -> str | None:
    """The number after ``####`` if the model wrote one, else the last number in the text (commas dropped)."""
    part = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(part)
    if not found:
        return None
    value = (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")
    try:  # "18.00" == "18"
        number = float(value)
        return str(int(number)) if number == int(number) else str(number)
    except ValueError:
        return value


@torch.no_grad()
def exact_match(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 96, batch_size: int = 16,
                progress: bool = True) -> float:
    """Fraction of problems whose generated final number equals the reference (greedy, left-padded batches)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for start in tqdm(range(0, len(examples), batch_size), desc="gsm8k generate", disable=not progress,
                          leave=False):
            chunk = examples[start: start + batch_size]
            enc = tokenizer([prompt_of(e) for e in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            device = next(model.parameters()).device
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, ex in zip(texts, chunk):
                text = text.split("Question:", 1)[0]  # the model may go on with a new problem
                correct += int(final_number(text) == final_number("#### " + ex["final"]))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / max(1, len(examples))


@torch.no_grad()
def answer_loss(model, batches: Sequence[dict]) -> float:
    """Mean cross-entropy per answer token (prompt and padding are -100)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train(was_training)
    return total / max(1, tokens)
