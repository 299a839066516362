"""Per-sample gradient engine for :func:`~fish_tuning.compute_fisher` (opacus-style hooks, one rule per layer type).

One batched forward/backward gives every sample's own gradient of each candidate whose layer type has a rule in
:mod:`fish_tuning.grad_sample` (nn.Linear: activations ``a`` and output gradients ``g`` per sample form
``Σ_t g_tᵀ a_t``; nn.Embedding, (IA)³, DoRA's magnitude, LoRA's embedding factors, ``adapters``' LoRA). Each
batch is checked against autograd's summed gradient, and once per pass a 2-sample probe checks that the hooked
rows are the batch's samples; the driver falls back to the exact per-sample loop where either check fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .grad_sample import Compute, PerSample, load_rules, resolve, rule_for
from .loglik import sample_labels

Kind = Literal["empirical", "expected"]
LogLikFn = Callable[[Tensor, Tensor], Tensor]


def batch_size_of(batch: Mapping[str, object]) -> int:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"compute_fisher needs batches that are dicts with a 'labels' entry (got {keys}). "
            "Add labels to each batch (e.g. a DataCollator that sets 'labels'); the Fisher is the gradient of "
            "log p(labels | inputs)."
        )
    return int(torch.as_tensor(labels).shape[0])


def slice_batch(batch: Mapping[str, object], start: int, stop: int, size: int, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value[start:stop] if value.dim() > 0 and value.shape[0] == size else value
            value = value.to(device)
        out[key] = value
    return out


def probe_pair(batch: Mapping[str, object], size: int, device: torch.device) -> dict:
    """Two rows of ``batch`` for the grouping probe: row 0 and the first row whose inputs differ from it. Two
    identical samples would make a coupling between samples invisible (their joint and single passes agree)."""
    rows = [v for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size]
    other = next((j for j in range(1, size) if any(not torch.equal(v[j], v[0]) for v in rows)), 1)
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value[[0, other]] if value.dim() > 0 and value.shape[0] == size else value
            value = value.to(device)
        out[key] = value
    return out


_TINY = torch.finfo(torch.float32).tiny  # tolerances are relative to each candidate's own scale; this only keeps 0 <= 0

# Per-sample gradient entries materialised at once by the hooks (64 MB in float32), whatever the batch size.
CHUNK_ELEMS = 1 << 24


class PerSampleHooks:
    """Per-sample gradients of candidates from one batched backward pass, by the rule registered for each
    candidate's layer type (:mod:`fish_tuning.grad_sample`: nn.Linear, nn.Embedding, (IA)³, DoRA, LoRA embedding,
    ``adapters``' LoRA).

    A candidate used once per forward (the usual case) is reduced at once to the sum and the sum of squares over the
    batch, in row chunks of at most ``chunk_elems`` per-sample entries, so a large candidate (e.g. a full weight)
    never materialises ``[B, out, in]``. A candidate used several times keeps per-sample gradients, because its
    uses must be summed per sample before squaring. A use whose inputs do not lead with the batch's samples marks
    the candidate ``unbatched`` only if a gradient reaches it (DoRA runs lora_A/B on an identity matrix, detached).
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], chunk_elems: int | None = None):
        by_id = {id(p): n for n, p in params.items()}
        self.chunk_elems = CHUNK_ELEMS if chunk_elems is None else chunk_elems
        self.grad_sample: dict[str, Tensor] = {}  # name -> [B, ...] (candidates used several times)
        self.reduced: dict[str, tuple[Tensor, Tensor]] = {}  # name -> (Σ_i g_i, Σ_i g_i²)
        self.calls: dict[str, int] = {}  # batched uses of each candidate in the current forward
        self.covered: dict[str, str] = {}  # candidate -> the layer type whose rule computes it
        self.rows = 0  # samples in the current batch: a hooked input must have them as its leading dimension
        self.unbatched: set[str] = set()  # candidates whose gradient came through another leading dimension
        # The tensor each candidate's module actually used in the last forward: the parameter itself, or under
        # FSDP2 the full (unsharded) tensor that stands in for the sharded DTensor parameter during forward.
        self.live: dict[str, Tensor] = {}
        # Coarsest float eps among each candidate's tensor as used and its module's output (bf16 weights, FSDP2
        # mixed precision, autocast): hooked and autograd gradients can agree only to that precision.
        self.eps: dict[str, float] = {}
        self._name_of = by_id
        # Entries per sample, for the chunk size; a ZeRO-3 partition reports its full size as ds_numel.
        self._numel = {n: getattr(p, "ds_numel", None) or p.numel() for n, p in params.items()}
        self._handles = []
        load_rules()
        for module in model.modules():
            rule = rule_for(module)
            if rule is None:
                continue
            names = {label: by_id[id(p)] for label, p in rule.params(module).items() if id(p) in by_id}
            if names or rule.always:
                self.covered.update(dict.fromkeys(names.values(), type(module).__name__))
                self._handles.extend(rule.attach(module, names, self.tap))

    def clear(self) -> None:
        self.grad_sample.clear()
        self.reduced.clear()
        self.calls.clear()
        self.live.clear()

    def tap(self, module: nn.Module, names: Mapping[str, str], rows: int, out: Tensor, compute: Compute) -> None:
        """A rule's forward hook: record ``names``' per-sample gradients when ``out``'s gradient arrives."""
        for label, name in names.items():
            self.live[name] = resolve(module, label)
            used = [self.live[name].dtype] + ([out.dtype] if isinstance(out, Tensor) else [])
            self.eps[name] = max([self.eps.get(name, 0.0)] + [torch.finfo(d).eps for d in used if d.is_floating_point])
        if not (torch.is_grad_enabled() and isinstance(out, Tensor) and out.requires_grad):
            return
        batched = rows == self.rows
        if batched:
            for name in names.values():
                self.calls[name] = self.calls.get(name, 0) + 1

        def on_grad(grad: Tensor) -> None:
            if not batched:  # e.g. tokens flattened to [B*T, H] (MoE, packing)
                self.unbatched.update(names.values())
                return
            for label, per_sample in compute(grad).items():
                self._record(names[label], per_sample, grad.shape[0])

        out.register_hook(on_grad)

    def _record(self, name: str, per_sample: PerSample, rows: int) -> None:
        if self.calls.get(name, 1) > 1:  # summed over uses per sample before squaring
            ps = per_sample(0, rows)
            prev = self.grad_sample.get(name)
            self.grad_sample[name] = ps if prev is None else prev + ps
            return
        step = max(1, self.chunk_elems // max(1, self._numel[name]))
        total = square = None
        for lo in range(0, rows, step):
            ps = per_sample(lo, min(rows, lo + step))
            if total is None:
                total, square = ps.sum(0), ps.square().sum(0)
            else:
                total.add_(ps.sum(0))
                square.add_(ps.square().sum(0))
        self.reduced[name] = (total, square)

    def inputs(self, params: list[Tensor]) -> list[Tensor]:
        """What to differentiate for ``params`` after a forward: the tensors the hooked modules used."""
        return [self.live.get(self._name_of.get(id(p), ""), p) for p in params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


LinearPerSampleHooks = PerSampleHooks  # the name before rules covered other layer types


def loss_for(model: nn.Module, batch: dict, kind: Kind, loglik_fn: LogLikFn, gen) -> Tensor:
    labels = batch.pop("labels")
    logits = model(**batch).logits
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
        # Prompt learning on a causal LM (Prompt Tuning, P-Tuning, CPT) prepends virtual tokens to the sequence:
        # they have no label, as in peft's own loss (labels padded on the left with -100).
        labels = nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
    if kind == "expected":
        labels = sample_labels(logits, labels, generator=gen)
    # Minus the *sum* of per-sample log-likelihoods: its gradient w.r.t. sample i's activations is sample i's own.
    return -loglik_fn(logits, labels).sum()


def check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"non-finite (NaN/inf) gradient for parameter '{name}' while computing Fisher. Check the inputs "
            "and labels of the calibration batches, and compute Fisher in float32 rather than half precision."
        )


def hooked_pass(model, hooks: PerSampleHooks, batch: dict, rows: int, cand_list, kind, loglik_fn, gen):
    hooks.clear()
    hooks.unbatched.clear()
    hooks.rows = rows
    loss = loss_for(model, batch, kind, loglik_fn, gen)
    return torch.autograd.grad(loss, hooks.inputs(cand_list), allow_unused=True)


def probe_sample_grouping(model, cand: dict, hooks: PerSampleHooks, pair: dict, loglik_fn) -> str | None:
    """Check once that the hooks group activations into the batch's samples: squared per-sample gradients of a
    2-sample batch must equal those of two 1-sample passes. The summed-gradient check per batch cannot see a
    module whose rows are not samples (tokens flattened to ``[B*T, H]``, MoE experts, packed sequences).
    Returns why the hooks are not exact, or None."""
    names = list(cand)
    grads = hooked_pass(model, hooks, dict(pair), 2, list(cand.values()), "empirical", loglik_fn, None)
    if hooks.unbatched:
        hooks.clear()
        return f"'{sorted(hooks.unbatched)[0]}' sees inputs whose leading dimension is not the batch of samples"
    hooked = {n: hooks.reduced[n][1] for n in names if n in hooks.reduced}
    hooked.update({n: g.square().sum(0) for n, g in hooks.grad_sample.items()})
    # Squares of low-precision gradients agree to about one eps (the exact loop's gradient is rounded to its dtype:
    # 0.6-0.9 eps in bf16, alike for 12 to 512 tokens, 2 to 8 layers, width 32 to 256, so no length term); rows
    # that are not samples are off by O(1) (0.2 to 4 of the max, 28+ bf16 eps). float32 keeps its 1e-4.
    rel = {n: max(1e-4, 8 * hooks.eps.get(n, 0.0)) for n in hooked}
    hooks.clear()
    exact = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in cand.items()}
    for i in range(2):
        row = slice_batch(pair, i, i + 1, 2, next(iter(cand.values())).device)
        loss = loss_for(model, row, "empirical", loglik_fn, None)
        for n, g in zip(names, torch.autograd.grad(loss, hooks.inputs(list(cand.values())), allow_unused=True)):
            if g is not None:
                exact[n].add_(g.float().square())
    del grads
    for n, sq in hooked.items():
        tol = rel[n] * float(exact[n].abs().max()) + _TINY  # relative only: an absolute floor hides small gradients
        if float((sq - exact[n]).abs().max()) > tol:
            return f"per-sample gradients of '{n}' do not group by sample (squared sums differ from a per-sample loop)"
    return None


def accumulate_hooked(cand, hooks: PerSampleHooks, grads, sums, rows: int) -> bool:
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
        # Relative tolerance: float32 rounding of a sum of B terms; looser when autograd's gradient or the module's
        # activations (autocast) are low precision.
        # The scale is the candidate's own: |sum| plus sqrt(B * sum of squares) >= sum_i |g_i| (what rounding of a
        # sum that cancels is relative to); no absolute floor, which would hide any error of small gradients.
        rel = max(1e-5, 8 * torch.finfo(g.dtype).eps, 8 * hooks.eps.get(name, 0.0))
        square = stats[name][1] if stats[name][1] is not None else hooks.grad_sample[name].float().square().sum(0)
        tol = rel * (g.abs().max().float() + (square.max().float() * rows).sqrt()) + _TINY
        finite.append(torch.isfinite(g).all())
        agree.append((stats[name][0] - g.float()).abs().max() <= tol)
    if finite:
        flags = torch.stack(finite + agree).cpu()
        if not bool(flags[: len(finite)].all()):
            for name, g in zip(cand, grads):
                if g is not None:
                    check_finite(name, g)
        if not bool(flags[len(finite):].all()):
            return False
    for name, s in sums.items():
        if name in stats:
            square = stats[name][1]
            s.add_(square if square is not None else hooks.grad_sample[name].square().sum(0))
    return True
