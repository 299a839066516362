"""Diagonal Fisher information from **per-sample** gradients (FISH-Tuning Eq. 2-3).

F̂_j = 1/N Σᵢ (∂/∂θ_j log p(yᵢ|xᵢ))².  Squaring the gradient of a batch mean is a different quantity (it
cancels signs across samples), so every path here squares each sample's own gradient before summing.

Two exact engines:
- ``vectorized``: one batched forward/backward. Hooks on ``nn.Linear`` modules whose weight/bias is a candidate
  record activations ``a`` and output gradients ``g`` and form per-sample gradients ``Σ_t g_tᵀ a_t`` (as opacus
  does). This covers LoRA's A and B. After every batch the per-sample gradients are checked against autograd's
  summed gradient; a mismatch (a weight also used outside its module, as DoRA does) switches to the loop.
- ``loop``: one forward/backward per sample; always exact, N times slower.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

Kind = Literal["empirical", "expected"]
Method = Literal["auto", "vectorized", "loop"]
LogLikFn = Callable[[Tensor, Tensor], Tensor]
logger = logging.getLogger("fish_tuning")


class ZeroFisherWarning(UserWarning):
    """A whole candidate tensor has zero Fisher information, so no mask strategy based on it can pick it."""


# --------------------------------------------------------------------------------------------- log-likelihood
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


# --------------------------------------------------------------------------------------------- batches
def _batch_size(batch: Mapping[str, object]) -> int:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"compute_fisher needs batches that are dicts with a 'labels' entry (got {keys}). "
            "Add labels to each batch (e.g. a DataCollator that sets 'labels'); the Fisher is the gradient of "
            "log p(labels | inputs)."
        )
    return int(torch.as_tensor(labels).shape[0])


def _slice(batch: Mapping[str, object], start: int, stop: int, size: int, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value[start:stop] if value.dim() > 0 and value.shape[0] == size else value
            value = value.to(device)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------- engines
# Per-sample gradient entries materialised at once by the hooks (64 MB in float32), whatever the batch size.
CHUNK_ELEMS = 1 << 24


class _LinearPerSampleHooks:
    """Per-sample gradients of nn.Linear weight/bias candidates from one batched backward pass.

    A module used once per forward (the usual case) is reduced at once to the sum and the sum of squares over the
    batch, in row chunks of at most ``chunk_elems`` per-sample entries, so a large candidate (e.g. a full weight)
    never materialises ``[B, out, in]``. A module used several times keeps per-sample gradients, because its uses
    must be summed per sample before squaring.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], chunk_elems: int | None = None):
        by_id = {id(p): n for n, p in params.items()}
        self.chunk_elems = CHUNK_ELEMS if chunk_elems is None else chunk_elems
        self.grad_sample: dict[str, Tensor] = {}  # name -> [B, ...] (modules used several times)
        self.reduced: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (Σ_i g_i, Σ_i g_i²)
        self.calls: dict[str, int] = {}  # uses of each candidate in the current forward
        self.covered: set[str] = set()
        self.rows = 0  # samples in the current batch: a hooked input must have them as its leading dimension
        self.unbatched: set[str] = set()  # candidates whose module saw another leading dimension
        self._handles = []
        for module in model.modules():
            if not isinstance(module, nn.Linear):
                continue
            names = {
                attr: by_id[id(getattr(module, attr))]
                for attr in ("weight", "bias")
                if getattr(module, attr, None) is not None and id(getattr(module, attr)) in by_id
            }
            if names:
                self.covered.update(names.values())
                self._handles.append(module.register_forward_hook(self._forward_hook(names)))

    def clear(self) -> None:
        self.grad_sample.clear()
        self.reduced.clear()
        self.calls.clear()

    def _forward_hook(self, names: dict[str, str]):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and output.requires_grad):
                return
            for name in names.values():
                self.calls[name] = self.calls.get(name, 0) + 1
            act = inputs[0].detach()
            if act.dim() < 2 or act.shape[0] != self.rows:  # e.g. tokens flattened to [B*T, H] (MoE, packing)
                self.unbatched.update(names.values())
                return

            def on_grad(grad: Tensor) -> None:
                a = act.reshape(act.shape[0], -1, act.shape[-1]).float()
                g = grad.reshape(grad.shape[0], -1, grad.shape[-1]).float()
                if "weight" in names:
                    self._record(names["weight"], g, a)
                if "bias" in names:
                    self._record(names["bias"], g, None)

            output.register_hook(on_grad)

        return hook

    def _record(self, name: str, g: Tensor, a: Tensor | None) -> None:
        def per_sample(lo: int, hi: int) -> Tensor:
            return g[lo:hi].sum(1) if a is None else torch.einsum("bto,bti->boi", g[lo:hi], a[lo:hi])

        rows = g.shape[0]
        if self.calls.get(name, 1) > 1:  # summed over uses per sample before squaring
            ps = per_sample(0, rows)
            prev = self.grad_sample.get(name)
            self.grad_sample[name] = ps if prev is None else prev + ps
            return
        step = max(1, self.chunk_elems // (g.shape[-1] * (1 if a is None else a.shape[-1])))
        total = square = None
        for lo in range(0, rows, step):
            ps = per_sample(lo, lo + step)
            if total is None:
                total, square = ps.sum(0), ps.square().sum(0)
            else:
                total.add_(ps.sum(0))
                square.add_(ps.square().sum(0))
        self.reduced[name] = (total, square)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _loss_for(model: nn.Module, batch: dict, kind: Kind, loglik_fn: LogLikFn, gen) -> Tensor:
    labels = batch.pop("labels")
    logits = model(**batch).logits
    if kind == "expected":
        labels = sample_labels(logits, labels, generator=gen)
    # Minus the *sum* of per-sample log-likelihoods: its gradient w.r.t. sample i's activations is sample i's own.
    return -loglik_fn(logits, labels).sum()


def _check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"non-finite (NaN/inf) gradient for parameter '{name}' while computing Fisher. Check the inputs "
            "and labels of the calibration batches, and compute Fisher in float32 rather than half precision."
        )


# --------------------------------------------------------------------------------------------- public API
def compute_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    num_samples: int = 128,
    kind: Kind = "empirical",
    params: Sequence[str] | None = None,
    method: Method = "auto",
    loglik_fn: LogLikFn = per_sample_log_likelihood,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Tensor]:
    """Mean squared per-sample gradient of log p(y|x) for each candidate parameter (float32, same shape).

    Args:
        batches: any iterable of model-input dicts with ``labels`` (a DataLoader, a list), any batch size.
        num_samples: how many samples (rows, not batches) to score; the paper uses 128 (256 for generation).
        kind: ``"empirical"`` uses the data labels (Eq. 3); ``"expected"`` samples y from the model (Eq. 2).
        params: candidate parameter names; default every parameter with ``requires_grad``.
        method: ``"auto"`` (vectorised where exact, else loop), ``"vectorized"`` or ``"loop"``.
        distributed: sum over the ranks of the default process group (default: when one is initialised).
            ``num_samples`` is then the *global* count: rank r scores the first ``ceil((num_samples - r) / W)``
            samples of its own ``batches``, so with a ``DistributedSampler``-style shard (sample i of the
            union on rank i % W) the ranks together score the same samples as one process over the union.
            Sums and counts are summed on rank 0 and broadcast, so every rank gets bit-identical scores (and
            therefore the same mask); they equal a single-process run up to float summation order.
            ``kind="expected"`` draws labels per rank (seed + rank), so it matches only in distribution.
    """
    if kind not in ("empirical", "expected"):
        raise ValueError(f"kind must be 'empirical' or 'expected', got {kind!r}")
    if method not in ("auto", "vectorized", "loop"):
        raise ValueError(f"method must be 'auto', 'vectorized' or 'loop', got {method!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")

    named = dict(model.named_parameters())
    if params is None:
        params = [n for n, p in named.items() if p.requires_grad]
    else:
        params = list(params)
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"params names a parameter the model does not have: {unknown[0]!r}")
    if not params:
        raise ValueError(
            "no candidate parameters: nothing requires grad and params= is empty. Wrap the model with a PEFT "
            "method (e.g. peft.get_peft_model) or pass params=[...] names."
        )
    cand = {n: named[n] for n in params}

    rank, world = _dist_rank_world(distributed)
    quota = num_samples // world + int(rank < num_samples % world)  # this rank's share of the global count
    device = next(iter(cand.values())).device
    gen = torch.Generator(device=device).manual_seed(seed + rank) if kind == "expected" else None
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in cand.items()}
    saved_flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    hooks = _LinearPerSampleHooks(model, cand) if method != "loop" else None
    if method == "vectorized" and len(hooks.covered) < len(cand):
        missing = next(n for n in cand if n not in hooks.covered)
        hooks.remove()
        raise ValueError(f"method='vectorized' cannot handle '{missing}' (not an nn.Linear weight/bias); use 'auto'")
    use_hooks = hooks is not None and len(hooks.covered) == len(cand)
    if hooks is not None and not use_hooks:
        hooks.remove()
    cand_list = list(cand.values())
    seen, scored = 0, 0
    probed = False
    bar = tqdm(total=quota, desc=f"Fisher ({kind})", disable=not progress, leave=False)
    try:
        model.eval()
        for n, p in named.items():
            p.requires_grad_(n in cand)
        for batch in batches:
            if seen >= quota:
                break
            size = _batch_size(batch)
            take = min(size, quota - seen)
            chunk = _slice(batch, 0, take, size, device)
            scored += _label_count(chunk["labels"])
            done = False
            if use_hooks and not probed and take >= 2:
                probed = True
                why = _probe_sample_grouping(model, cand, hooks, _slice(chunk, 0, 2, take, device), loglik_fn)
                if why is not None:
                    if method == "vectorized":
                        raise RuntimeError(f"method='vectorized' is not exact for this model: {why}; use 'auto'")
                    logger.warning("compute_fisher: using the exact per-sample loop: %s", why)
                    use_hooks = False
                    hooks.remove()
            if use_hooks:
                grads = _hooked_pass(model, hooks, dict(chunk), take, cand_list, kind, loglik_fn, gen)
                done = not hooks.unbatched and _accumulate_hooked(cand, hooks, grads, sums, take)
                hooks.clear()
                if not done and method == "vectorized":
                    raise RuntimeError("per-sample hook gradients disagree with autograd; use method='loop'")
                if not done:  # a weight used outside its module (e.g. DoRA), or not batch-first inputs
                    logger.info("compute_fisher: per-sample hooks are not exact here (%s); exact loop for the rest",
                                "inputs not batch-first" if hooks.unbatched else "gradient used outside its module")
                    use_hooks = False
                    hooks.remove()
            if not done:
                for i in range(take):
                    row = _slice(chunk, i, i + 1, take, device)
                    grads = torch.autograd.grad(_loss_for(model, row, kind, loglik_fn, gen), cand_list,
                                                allow_unused=True)
                    for (n, s), g in zip(sums.items(), grads):
                        if g is not None:
                            _check_finite(n, g)
                            s.add_(g.float().square())
            seen += take
            bar.update(take)
    finally:
        bar.close()
        if hooks is not None:
            hooks.remove()
        for n, p in named.items():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)

    count = torch.tensor([float(seen), float(scored)], device=device)
    if world > 1:
        count = _sum_over_ranks(sums, count)
    total = int(count[0].item())
    if total == 0:
        raise ValueError("compute_fisher got no batches (the iterable was empty): pass calibration batches")
    if int(count[1].item()) == 0:
        raise ValueError(
            "every label of the calibration batches is -100 (ignored): there is no label token to score, so the "
            "Fisher would be zero everywhere. Check the data collator / completion-only masking (are completions "
            "cut off by max_length?)"
        )
    count = count[0]
    if total < num_samples and rank == 0:
        where = f" over {world} ranks" if world > 1 else ""
        warnings.warn(f"compute_fisher: only {total} samples available{where}, fewer than num_samples={num_samples}",
                      stacklevel=2)
    scores = {n: s / count for n, s in sums.items()}
    warn_zero_fisher(scores)
    return scores


def _dist_rank_world(distributed: bool | None) -> tuple[int, int]:
    """(rank, world size) of the default process group when summing over ranks, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed is None:
        distributed = initialised
    if not distributed:
        return 0, 1
    if not initialised:
        raise ValueError(
            "compute_fisher(distributed=True) needs an initialised process group: launch with torchrun / "
            "accelerate launch and call torch.distributed.init_process_group() first (or pass distributed=False)"
        )
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _sum_over_ranks(sums: dict[str, Tensor], count: Tensor) -> Tensor:
    """Sum every rank's Fisher sums and count in place; returns the global count.

    One flat buffer (one collective, not one per tensor), reduced on rank 0 then broadcast: unlike a bare
    all-reduce, that guarantees the same bytes on every rank, so the mask (ties included) is the same everywhere.
    """
    dist = torch.distributed
    flat = torch.cat([s.reshape(-1).to(count.device) for s in sums.values()] + [count.reshape(-1)])
    dist.reduce(flat, dst=0)
    dist.broadcast(flat, src=0)
    offset = 0
    for s in sums.values():
        s.copy_(flat[offset: offset + s.numel()].view_as(s))
        offset += s.numel()
    return flat[offset:].clone()


def _label_count(labels) -> int:
    """Scored targets in a batch: label tokens that are not -100 for a causal LM, else one per sample."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and not labels.is_floating_point():
        return int((labels[:, 1:] != -100).sum())
    return int(labels.shape[0]) if labels.dim() else 1


def _hooked_pass(model, hooks: _LinearPerSampleHooks, batch: dict, rows: int, cand_list, kind, loglik_fn, gen):
    hooks.clear()
    hooks.unbatched.clear()
    hooks.rows = rows
    return torch.autograd.grad(_loss_for(model, batch, kind, loglik_fn, gen), cand_list, allow_unused=True)


def _probe_sample_grouping(model, cand: dict, hooks: _LinearPerSampleHooks, pair: dict, loglik_fn) -> str | None:
    """Check once that the hooks group activations into the batch's samples: squared per-sample gradients of a
    2-sample batch must equal those of two 1-sample passes. The summed-gradient check per batch cannot see a
    module whose rows are not samples (tokens flattened to ``[B*T, H]``, MoE experts, packed sequences).
    Returns why the hooks are not exact, or None."""
    names = list(cand)
    grads = _hooked_pass(model, hooks, dict(pair), 2, list(cand.values()), "empirical", loglik_fn, None)
    if hooks.unbatched:
        hooks.clear()
        return f"'{sorted(hooks.unbatched)[0]}' sees inputs whose leading dimension is not the batch of samples"
    hooked = {n: hooks.reduced[n][1] for n in names if n in hooks.reduced}
    hooked.update({n: g.square().sum(0) for n, g in hooks.grad_sample.items()})
    hooks.clear()
    exact = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in cand.items()}
    for i in range(2):
        row = _slice(pair, i, i + 1, 2, next(iter(cand.values())).device)
        for n, g in zip(names, torch.autograd.grad(_loss_for(model, row, "empirical", loglik_fn, None),
                                                   list(cand.values()), allow_unused=True)):
            if g is not None:
                exact[n].add_(g.float().square())
    del grads
    for n, sq in hooked.items():
        tol = 1e-4 * float(exact[n].abs().max()) + 1e-10
        if float((sq - exact[n]).abs().max()) > tol:
            return f"per-sample gradients of '{n}' do not group by sample (squared sums differ from a per-sample loop)"
    return None


def _accumulate_hooked(cand, hooks: _LinearPerSampleHooks, grads, sums, rows: int) -> bool:
    """Add the hooks' squared per-sample gradients; False if any disagrees with autograd's summed gradient.

    All finiteness and agreement checks are reduced on the device and read back with a single sync per batch.
    """
    stats: dict[str, tuple[Tensor, Tensor | None]] = {}
    finite, agree = [], []
    for name, g in zip(cand, grads):
        if name in hooks.reduced:
            stats[name] = hooks.reduced[name]
        elif name in hooks.grad_sample:
            stats[name] = (hooks.grad_sample[name].sum(0), None)
        if g is None and name not in stats:
            continue
        if g is None or name not in stats or stats[name][0].shape != g.shape:
            return False
        g = g.detach()
        # Relative tolerance: float32 rounding of a sum of B terms; looser when autograd's gradient is low precision.
        rel = max(1e-5, 8 * torch.finfo(g.dtype).eps)
        tol = rel * g.abs().max().float() + 1e-6 * math.sqrt(rows)
        finite.append(torch.isfinite(g).all())
        agree.append((stats[name][0] - g.float()).abs().max() <= tol)
    if finite:
        flags = torch.stack(finite + agree).cpu()
        if not bool(flags[: len(finite)].all()):
            for name, g in zip(cand, grads):
                if g is not None:
                    _check_finite(name, g)
        if not bool(flags[len(finite):].all()):
            return False
    for name, s in sums.items():
        if name in stats:
            square = stats[name][1]
            s.add_(square if square is not None else hooks.grad_sample[name].square().sum(0))
    return True


def warn_zero_fisher(scores: Mapping[str, Tensor]) -> list[str]:
    """Warn about candidate tensors whose Fisher is exactly zero everywhere; returns their names."""
    zero = [n for n, s in scores.items() if s.numel() and not bool(s.any())]
    if zero:
        msg = f"{len(zero)} candidate tensor(s) have zero Fisher information everywhere, e.g. {zero[:3]}."
        known = False
        if any("lora_embedding_B" in n for n in zero):
            from .methods.peft import EMBEDDING_ADVICE

            msg, known = msg + " " + EMBEDDING_ADVICE, True
        if any("lora_A" in n for n in zero):
            msg += (
                " With LoRA's default init (B = 0) every entry of A has zero gradient, so its Fisher is 0 and a "
                "FISH mask can never select A. Use the paper's init: "
            )
            if any(".loras." in n for n in zero):  # the adapters library's LoRA (also inside UniPELT)
                msg += "adapters' LoRAConfig(init_weights='bert') (it has no PiSSA; B must be non-zero)."
            else:
                msg += "peft's LoraConfig(init_lora_weights='pissa')."
            known = True
        if not known:
            msg += " These entries can only be picked by 'rand' or as ties; check that they influence the loss."
        warnings.warn(msg, ZeroFisherWarning, stacklevel=3)
    return zero
