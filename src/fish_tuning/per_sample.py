"""Per-sample gradient engine for :func:`~fish_tuning.compute_fisher` (opacus-style hooks, one rule per layer type).

One batched forward/backward gives every sample's own gradient of each candidate whose layer type has a rule in
:mod:`fish_tuning.grad_sample` (nn.Linear: activations ``a`` and output gradients ``g`` per sample form
``Σ_t g_tᵀ a_t``; nn.Embedding, (IA)³, DoRA's magnitude, LoRA's embedding factors, ``adapters``' LoRA). Each
batch is checked against autograd's summed gradient, and at each new batch size a probe checks that the hooked
rows are that batch's samples (a sample in the batch against the same sample alone); the driver falls back to the
exact per-sample loop where either check fails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .batches import probe_row, slice_batch
from .grad_sample import Compute, PerSample, load_rules, resolve, rule_for
from .loglik import sample_labels, unwrapped

Kind = Literal["empirical", "expected"]
LogLikFn = Callable[[Tensor, Tensor], Tensor]


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
        # The grouping probe's row: its own per-sample gradient (float32) is kept as well as the batch reductions.
        self.watch: int | None = None
        self.watched: dict[str, Tensor] = {}
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
        self.watched.clear()

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
        if self.watch is not None and self.watch < rows:
            self.watched[name] = per_sample(self.watch, self.watch + 1)[0].float()
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

    def row(self, name: str) -> Tensor | None:
        """Row ``watch``'s per-sample gradient of ``name`` from the last pass (None if it got none)."""
        if name in self.grad_sample and self.watch is not None:
            return self.grad_sample[name][self.watch].float()
        return self.watched.get(name)

    def inputs(self, params: list[Tensor]) -> list[Tensor]:
        """What to differentiate for ``params`` after a forward: the tensors the hooked modules used."""
        return [self.live.get(self._name_of.get(id(p), ""), p) for p in params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


LinearPerSampleHooks = PerSampleHooks  # the name before rules covered other layer types


def loss_for(model: nn.Module, batch: dict, kind: Kind, loglik_fn: LogLikFn, gen, used: dict | None = None) -> Tensor:
    labels = batch.pop("labels")
    if "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch:
        # An encoder-decoder model builds its decoder inputs from labels, which are not passed (scored here).
        prepare = decoder_inputs_from_labels(model)
        if prepare is not None:
            batch["decoder_input_ids"] = prepare(labels=torch.as_tensor(labels))
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False: a tuple, logits first
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
        # Prompt learning (Prompt Tuning, P-Tuning, CPT) prepends virtual tokens to a decoder or tagger sequence:
        # they have no label, as in peft's own loss (labels padded on the left with -100).
        labels = nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
    if kind == "expected":  # ModelLogLik knows the model's label alignment; a bare function gets the causal default
        sample = getattr(loglik_fn, "sample", sample_labels)
        labels = sample(logits, labels, gen)
    if used is not None:  # the labels scored (sampled ones for kind="expected"), for the grouping probe
        used["labels"] = labels
    # Minus the *sum* of per-sample log-likelihoods: its gradient w.r.t. sample i's activations is sample i's own.
    return -loglik_fn(logits, labels).sum()


def decoder_inputs_from_labels(model: nn.Module) -> Callable | None:
    """An encoder-decoder model's ``prepare_decoder_input_ids_from_labels`` (labels shifted right), else None."""
    for m in unwrapped(model):
        prepare = getattr(m, "prepare_decoder_input_ids_from_labels", None)
        if getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True and callable(prepare):
            return prepare
    return None


def check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise FloatingPointError(
            f"non-finite (NaN/inf) gradient for parameter '{name}' while computing Fisher. Check the inputs "
            "and labels of the calibration batches, and compute Fisher in float32 rather than half precision."
        )


def hooked_pass(model, hooks: PerSampleHooks, batch: dict, rows: int, cand_list, kind, loglik_fn, gen,
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


def probe_sample_grouping(model, cand: dict, hooks: PerSampleHooks, batch: Mapping[str, object], rows: int,
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
    # float32 from each pass's own activations (not autograd's gradient, which bf16 weights round to bf16: the
    # old probe's 0.6-0.9 eps noise), so what differs is the forward/backward's rounding at another batch size.
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


def accumulate_hooked(cand, hooks: PerSampleHooks, grads, sums, rows: int, grad_sums=None) -> bool:
    """Add the hooks' squared per-sample gradients to ``sums`` (and their plain sum to ``grad_sums``); False if any
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
    for name, s in sums.items():
        if name in stats:
            square = stats[name][1]
            s.add_(square if square is not None else hooks.grad_sample[name].square().sum(0))
            if grad_sums is not None:
                grad_sums[name].add_(stats[name][0].float())
    return True
