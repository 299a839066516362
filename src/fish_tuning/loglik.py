"""Per-sample log-likelihoods of model outputs, and labels drawn from the model (the y of Eq. 2 and Eq. 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def per_sample_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-likelihood of each sample, shape ``[B]``.

    - ``logits [B, T, V]`` with ``labels [B, T]``: causal LM; position t predicts label t+1; ``-100`` is ignored and a
      sample's log-likelihood is the sum over its label tokens.
    - ``logits [B, 1]`` or floating labels of shape ``[B]``: regression with unit-variance Gaussian (matches MSE).
    - ``logits [B, C]`` with float labels ``[B, C]``: multi-label Bernoulli.
    - ``logits [B, C]`` with integer labels ``[B]``: categorical.
    """
    logits = logits.float()
    if logits.dim() == 3:
        if labels.dim() != 2:
            raise ValueError(f"causal-LM logits {tuple(logits.shape)} need labels [B, T]; got {tuple(labels.shape)}")
        # Shift the labels (pad with -100), not the logits: slicing [B, T, V] would copy it twice (forward and
        # backward); fused cross-entropy is ~40% cheaper than log_softmax + gather at a 49k vocabulary.
        b, t, v = logits.shape
        target = nn.functional.pad(labels[:, 1:].long(), (0, 1), value=-100)
        nll = nn.functional.cross_entropy(logits.reshape(b * t, v), target.reshape(-1), ignore_index=-100,
                                          reduction="none")
        return -nll.view(b, t).sum(1)
    if logits.dim() != 2:
        raise ValueError(f"unsupported logits shape {tuple(logits.shape)}: pass loglik_fn= for this model")
    if logits.shape[1] == 1 and (labels.is_floating_point() or labels.dim() == 1):
        return -0.5 * (logits.squeeze(1) - labels.float().view(-1)) ** 2
    if labels.is_floating_point() and labels.shape == logits.shape:
        return -nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)
    return torch.log_softmax(logits, dim=-1).gather(1, labels.long().view(-1, 1)).squeeze(1)


@torch.no_grad()
def sample_labels(logits: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Draw labels from the model's own predictive distribution (expected Fisher, Eq. 2), same layout as ``labels``."""
    logits = logits.float()
    if logits.dim() == 3:  # causal LM: sample every scored position independently (teacher forcing)
        probs = torch.softmax(logits[:, :-1], dim=-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
        out = labels.clone()
        scored = labels[:, 1:] != -100
        out[:, 1:] = torch.where(scored, drawn, labels[:, 1:])
        return out
    if logits.shape[1] == 1 and (labels.is_floating_point() or labels.dim() == 1):
        noise = torch.randn(logits.shape[0], generator=generator, device=logits.device)
        return (logits.squeeze(1) + noise).to(labels.dtype if labels.is_floating_point() else torch.float32)
    if labels.is_floating_point() and labels.shape == logits.shape:
        return torch.bernoulli(torch.sigmoid(logits), generator=generator).to(labels.dtype)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).view(-1).to(labels.dtype)
