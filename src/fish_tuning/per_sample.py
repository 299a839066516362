"""Per-sample gradients for :func:`~fish_tuning.compute_fisher`: opacus-style hooks and the engine that runs them.

:class:`PerSampleHooks`: one batched forward/backward gives every sample's own gradient of each candidate whose
layer type has a rule in :mod:`fish_tuning.grad_sample` (nn.Linear: activations ``a`` and output gradients ``g``
per sample form ``Σ_t g_tᵀ a_t``; nn.Embedding, (IA)³, DoRA's magnitude, LoRA's embedding factors, ``adapters``'
LoRA). :class:`PerSampleEngine` (cf. opacus' ``GradSampleModule``) owns the choice between those hooks and the exact
per-sample loop: it checks every hooked batch (:mod:`fish_tuning.exactness`) and falls back to the loop where a
check fails, with one method per batch, so the Fisher driver only cuts batches and reduces.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from .batches import labelled_rows, probe_row, slice_batch
from .exactness import (
    accumulate_hooked,
    check_finite,
    float32_probe,
    hooked_pass,
    low_precision,
    probe_sample_grouping,
)
from .grad_sample import Compute, PerSample, load_rules, resolve, rule_for
from .loglik import Kind, LogLikFn, loss_for
from .sharded import all_agree
from .zero3 import full_shape

Engine = Literal["auto", "vectorized", "loop"]
logger = logging.getLogger("fish_tuning")

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

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


class PerSampleEngine:
    """Sums over samples of each candidate's per-sample gradient (``sums``) and of its square (``squares``, float32,
    the candidate's full shape), one :meth:`add` per batch.

    ``engine="auto"`` runs the hooks (:class:`PerSampleHooks`) where every candidate has a rule, and checks each
    batch: the hooked gradients must sum to autograd's, and at every new batch size a probe checks that hooked rows
    are samples. Where a check fails it logs why and runs the exact per-sample loop from that batch on (``name``
    says what ran: ``"vectorized"``, ``"loop"`` or ``"vectorized+loop"``). ``"vectorized"`` raises instead of
    falling back; ``"loop"`` runs the loop only.

    ``sharded`` (FSDP2 / ZeRO-3: every pass all-gathers): every rank runs the same passes and takes every decision
    together (one all-reduce each), and there is no loop to fall back to. :meth:`close` removes the hooks.
    """

    def __init__(self, model: nn.Module, cand: dict[str, Tensor], engine: Engine, kind: Kind, loglik_fn: LogLikFn,
                 gen: torch.Generator | None, sharded: bool):
        self.model, self.cand, self.cand_list = model, cand, list(cand.values())
        self.engine, self.kind, self.loglik_fn, self.gen, self.sharded = engine, kind, loglik_fn, gen, sharded
        self.device = self.cand_list[0].device
        self.squares = {n: torch.zeros(full_shape(p), dtype=torch.float32, device=p.device) for n, p in cand.items()}
        self.sums = {n: torch.zeros_like(s) for n, s in self.squares.items()}  # Σᵢ gᵢ, for the mean gradient
        self.seen = 0  # samples added
        self.probed: set[int] = set()  # batch sizes whose grouping the probe has checked
        self.hooks = PerSampleHooks(model, cand) if engine != "loop" else None
        missing = next((n for n in cand if n not in self.hooks.covered), None) if self.hooks is not None else None
        if engine == "vectorized" and missing is not None:
            self.hooks.close()
            raise ValueError(f"engine='vectorized' cannot handle '{missing}' (no per-sample rule for its layer type in "
                             "fish_tuning.grad_sample); use 'auto'")
        self.hooked = self.hooks is not None and missing is None
        self.name = "vectorized" if self.hooked else "loop"
        if self.hooks is not None and not self.hooked:
            logger.info("compute_fisher: exact per-sample loop: '%s' has no per-sample rule for its layer type", missing)
            self.hooks.close()
        if sharded and not self.hooked:
            missing = next((n for n in cand if self.hooks is None or n not in self.hooks.covered), "")
            raise ValueError(
                "compute_fisher on an FSDP2-sharded model needs the per-sample hooks (engine='auto' or 'vectorized') "
                f"and candidates with a per-sample rule only; '{missing or ''}' has none, or engine='loop' was asked. "
                "The exact loop would run a different number of all-gathers on each rank. Compute the Fisher before "
                "fully_shard, or restrict params= to nn.Linear weights (LoRA's A and B are)."
            )

    def add(self, chunk: dict, take: int, real: bool, samples: int) -> None:
        """Add a batch of ``take`` rows holding ``samples`` labelled ones; ``real`` False: a sharded rank's padding
        pass, run for its collectives and discarded."""
        if samples == 0 and not self.sharded:  # every row unlabelled: no gradient (sharded ranks run every pass)
            return
        if not (self.hooked and self._hooked_pass(chunk, take, real)):
            self._loop(chunk, take)
        if real:
            self.seen += samples

    def _hooked_pass(self, chunk: dict, take: int, real: bool) -> bool:
        """One batched pass through the hooks (probed at a new batch size), added if exact; False if the loop must
        take this batch."""
        hooks = self.hooks
        probe = take >= 2 and take not in self.probed  # a new batch size: re-probe
        if self.sharded:  # every rank runs the probe's passes (each all-gathers) if any rank probes
            probe = not all_agree(not probe, self.device)
        # Half precision is probed in float32 (its own batch pass): bf16 rounding would hide a coupling of a few %.
        # Sharded models cannot be upcast; they piggyback on the real pass in their own precision.
        upcast = probe and not self.sharded and low_precision(self.model, self.device)
        why = None
        if upcast:
            with float32_probe(self.model):
                why = probe_sample_grouping(self.model, self.cand, hooks, chunk, take, self.loglik_fn)
        if why is None:
            used: dict = {}
            hooks.watch = probe_row(chunk["labels"], take) if probe and not upcast else None
            grads = hooked_pass(self.model, hooks, dict(chunk), take, self.cand_list, self.kind, self.loglik_fn,
                                self.gen, used)
            # A pass that fails the summed-gradient check is left to that check (its own, plainer reason);
            # sharded runs probe regardless, as every rank must run the probe's pass.
            if hooks.watch is not None and (self.sharded or hooks.unbatched or accumulate_hooked(
                    self.cand, hooks, grads, {}, take)):
                why = probe_sample_grouping(self.model, self.cand, hooks, chunk, take, self.loglik_fn, used["labels"])
            hooks.watch = None
        if probe:
            self.probed.add(take)
            if self.sharded and not all_agree(why is None, self.device):
                raise RuntimeError("compute_fisher on an FSDP2-sharded model: per-sample hooks are not exact "
                                   f"on some rank ({why or 'another rank'}) and the exact per-sample loop is "
                                   "not available under FSDP; compute the Fisher before fully_shard")
            if why is not None:
                if self.engine == "vectorized":
                    raise RuntimeError(f"engine='vectorized' is not exact for this model: {why}; use 'auto'")
                logger.warning("compute_fisher: using the exact per-sample loop (batch size %d): %s", take, why)
                self._fall_back()
                return False
        done = not hooks.unbatched and (not real or accumulate_hooked(self.cand, hooks, grads, self.squares, take,
                                                                       self.sums))
        hooks.clear()
        if self.sharded and not all_agree(done, self.device):
            raise RuntimeError("compute_fisher on an FSDP2-sharded model: per-sample hook gradients "
                               "disagree with autograd on some rank, and the exact per-sample loop is not "
                               "available under FSDP; compute the Fisher before fully_shard")
        if not done and self.engine == "vectorized":
            raise RuntimeError("per-sample hook gradients disagree with autograd; use engine='loop'")
        if not done:  # a weight used outside its module, an unsupported set-up, or not batch-first inputs
            why = (f"'{sorted(hooks.unbatched)[0]}' saw inputs that are not batch-first" if hooks.unbatched
                   else "hooked per-sample gradients do not sum to autograd's gradient (a weight used "
                        "outside its module, or a layer set-up its rule does not cover)")
            logger.info("compute_fisher: per-sample hooks are not exact here (%s); exact loop for the rest", why)
            self._fall_back()
        return done

    def _fall_back(self) -> None:
        """The exact loop for this batch and every later one."""
        self.hooked, self.name = False, ("vectorized+loop" if self.seen else "loop")
        self.hooks.clear()
        self.hooks.close()

    def _loop(self, chunk: dict, take: int) -> None:
        """One forward/backward per labelled row: always exact."""
        labelled = labelled_rows(chunk["labels"])
        for i in range(take):
            if labelled is not None and not labelled[i]:  # no label, no gradient
                continue
            row = slice_batch(chunk, i, i + 1, take, self.device)
            grads = torch.autograd.grad(loss_for(self.model, row, self.kind, self.loglik_fn, self.gen),
                                        self.cand_list, allow_unused=True)
            for (n, s), g in zip(self.squares.items(), grads):
                if g is not None:
                    check_finite(n, g)
                    s.add_(g.float().square())
                    self.sums[n].add_(g.float())

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
