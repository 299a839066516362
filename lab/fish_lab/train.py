"""A small, explicit training / evaluation loop for sequence classifiers (the runner and the demo use it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .metrics import glue_score


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Sequence[dict], metric: str) -> dict:
    """Mean loss and the task score over ``batches`` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    loss_sum, count, preds, labels = 0.0, 0, [], []
    for batch in batches:
        out = model(**batch)
        n = batch["labels"].shape[0]
        loss_sum += float(out.loss) * n
        count += n
        logits = out.logits.float()
        preds.append(logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1))
        labels.append(batch["labels"])
    model.train(was_training)
    score = glue_score(metric, torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy())
    return {"loss": loss_sum / max(count, 1), "score": score}


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.06):
    """Linear warm-up then linear decay to 0 (the transformers default the paper uses)."""
    warm = max(1, int(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: torch.nn.Module, batches: Sequence[dict], optimizer: torch.optim.Optimizer, epochs: int = 1,
          grad_clip: float | None = 1.0, schedule: bool = True,
          on_epoch_end: Callable[[int, float], None] | None = None, progress: bool = True) -> list[float]:
    """Train for ``epochs`` over ``batches``; returns the mean training loss of each epoch."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sched = linear_schedule(optimizer, epochs * len(batches)) if schedule else None
    history = []
    model.train()
    for epoch in range(epochs):
        total = 0.0
        for batch in tqdm(batches, desc=f"train epoch {epoch + 1}/{epochs}", disable=not progress, leave=False):
            loss = model(**batch).loss
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower the lr")
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if sched is not None:
                sched.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
        history.append(total / max(1, len(batches)))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history[-1])
    return history
