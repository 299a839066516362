"""The two checks that hooked per-sample gradients are exact, run by :class:`~fish_tuning.per_sample.PerSampleEngine`.

- Per batch, :func:`accumulate_hooked`: the per-sample gradients must sum to autograd's summed gradient (a weight
  also used outside its module, or a layer set-up its rule does not cover, breaks that).
- Per new batch size, :func:`probe_sample_grouping`: the hooked rows must be that batch's samples (one sample in
  the batch against the same sample alone); the sum check cannot see rows that are tokens, experts or packed
  sequences, or a coupling between samples. Half precision is probed in float32 (:func:`float32_probe`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .batches import probe_row, slice_batch
from .loglik import loss_for

_TINY = torch.finfo(torch.float32).tiny  # tolerances are relative to each candidate's own scale; this only keeps 0 <= 0


def check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"non-finite (NaN/inf) gradient for parameter '{name}' while computing Fisher. Check the inputs "
            "and labels of the calibration batches, and compute Fisher in float32 rather than half precision."
        )


def hooked_pass(model, hooks, batch: dict, rows: int, cand_list, kind, loglik_fn, gen,
                used: dict | None = None):
    hooks.clear()
    hooks.unbatched.clear()
    hooks.rows = rows
    loss = loss_for(model, batch, kind, loglik_fn, gen, used)
    return torch.autograd.grad(loss, hooks.inputs(cand_list), allow_unused=True)


def low_precision(model: nn.Module, device: torch.device) -> bool:
    """Whether the model computes below float32: half-precision parameters or buffers, or autocast on."""
    if any(t.is_floating_point() and t.dtype in (torch.bfloat16, torch.float16)
           for t in (*model.parameters(), *model.buffers())):
        return True
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # pragma: no cover - a device type autocast does not know
        return False


@contextmanager
def float32_probe(model: nn.Module):
    """Run the model in float32 for the grouping probe: half-precision parameters and buffers upcast in place
    (restored exactly afterwards: bf16/fp16 -> float32 -> bf16/fp16 is lossless), autocast and TF32 off."""
    low = [t for t in (*model.parameters(), *model.buffers())
           if t.is_floating_point() and t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in low]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for t in low:
            t.data = t.data.float()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            yield
    finally:
        for t, dtype in zip(low, dtypes):
            t.data = t.data.to(dtype)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def probe_sample_grouping(model, cand: dict, hooks, batch: Mapping[str, object], rows: int,
                          loglik_fn, labels: Tensor | None = None) -> str | None:
    """Check that the hooks group a batch of ``rows`` into its samples: the last labelled sample's gradient
    *within this batch* must equal that of the same sample run alone. The summed-gradient check per batch cannot
    see a module whose rows are not samples (tokens flattened to ``[B*T, H]``, MoE experts, packed sequences) or a
    coupling between samples (mixing rows, batch statistics, capacity limits that depend on the batch size).

    With ``labels`` (the labels the batch was scored with) the hooks hold that batch's pass, run with
    ``hooks.watch = probe_row(batch["labels"], rows)``: only the single-sample pass runs here, and the hooks' batch
    results are left as they were. Without, the batch pass runs here too (data labels). Returns why the hooks are
    not exact, or None.
    """
    names, cand_list = list(cand), list(cand.values())
    device = cand_list[0].device
    k = probe_row(batch["labels"], rows)  # the last row with a label: an unlabelled one has no gradient to compare
    if labels is None:
        hooks.eps.clear()  # the probe's own precision (float32_probe), not the pass before's
        hooks.watch = k
        hooked_pass(model, hooks, dict(batch), rows, cand_list, "empirical", loglik_fn, None)
        labels = torch.as_tensor(batch["labels"])
    # Not returned at once: under FSDP2/ZeRO-3 every rank must run the single-sample pass below (it all-gathers).
    flat = sorted(hooks.unbatched)[:1]
    got = {n: hooks.row(n) for n in names}
    # Tolerance, relative to each candidate's largest entry. Both sides are formed by the same per-sample rule in
    # float32 from each pass's own activations (not autograd's gradient, which bf16 weights round to bf16:
    # 0.6-0.9 eps of noise), so what differs is the forward/backward's rounding at another batch size.
    # Measured (tiny LoRA Llama/BERT, batch 8): 0 on CPU in any dtype; 1e-6 in float32; with bf16 roundings
    # flipped as a GPU's other summation order does, up to 1.0 bf16 eps (a flip propagates), and a 1 % coupling
    # gives 2.5 eps. So half precision is probed in float32 (float32_probe), where 1e-4 has 100x headroom and a
    # coupling of 0.1 % is caught; 4 eps is left only for runs that cannot upcast (sharded bf16: FSDP2, ZeRO-3).
    rel = {n: max(1e-4, 4 * hooks.eps.get(n, 0.0)) for n in names}
    saved = (dict(hooks.reduced), dict(hooks.grad_sample), dict(hooks.calls), dict(hooks.live))
    try:
        hooks.watch = 0
        row = slice_batch(batch, k, k + 1, rows, device)
        row["labels"] = labels[k: k + 1].to(device)
        hooked_pass(model, hooks, row, 1, cand_list, "empirical", loglik_fn, None)
        flat = flat or sorted(hooks.unbatched)[:1]
        if flat:
            return f"'{flat[0]}' sees inputs whose leading dimension is not the batch of samples"
        want = {n: hooks.row(n) for n in names}
    finally:
        hooks.clear()
        hooks.watch = None
        for mine, kept in zip((hooks.reduced, hooks.grad_sample, hooks.calls, hooks.live), saved):
            mine.update(kept)
    for n in names:
        if got[n] is None and want[n] is None:
            continue
        if got[n] is None or want[n] is None:
            return f"per-sample gradients of '{n}' do not group by sample (it gets a gradient only in one pass)"
        err = float((got[n] - want[n]).abs().max())
        scale = float(want[n].abs().max())
        if err > rel[n] * scale + _TINY:  # relative only: an absolute floor hides small gradients
            return (f"per-sample gradients of '{n}' do not group by sample (sample {k} of a batch of {rows} differs "
                    f"from the same sample alone by {err / max(scale, _TINY):.2g} of its largest entry)")
    return None


def accumulate_hooked(cand, hooks, grads, squares, rows: int, sums=None) -> bool:
    """Add the hooks' squared per-sample gradients to ``squares`` (and their plain sum to ``sums``); False if any
    disagrees with autograd's summed gradient.

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
    for name, s in squares.items():
        if name in stats:
            square = stats[name][1]
            s.add_(square if square is not None else hooks.grad_sample[name].square().sum(0))
            if sums is not None:
                sums[name].add_(stats[name][0].float())
    return True
