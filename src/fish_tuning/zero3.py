"""DeepSpeed ZeRO-3 support: partitioned parameters and the ZeRO optimizer's fp32 master partitions.

Under ZeRO-3 a module parameter is an empty placeholder outside forward/backward (``ds_shape`` is its real shape,
``ds_tensor`` this rank's flat partition), and the optimizer steps fp32 *master* copies kept in one flat tensor
per sub-group (``fp32_partitioned_groups_flat``), offloaded to the CPU with ``offload_optimizer``. So:

- Fisher: :func:`gathered` all-gathers the candidate (adapter-sized) parameters for the whole pass and keeps
  ZeRO's coordinator from releasing them between passes; the base model is still gathered module by module. The
  per-sample hooks then see full weights, full activations and per-sample output gradients, as without ZeRO.
- Gradients: in backward the parameter is gathered, so its ``.grad`` is full-size; the guard's hook zeroes the
  masked entries there, *before* ZeRO's own reduce-scatter hook (it is moved to the front), so the reduced
  partitions, the gradient norm used for clipping and accumulation all see Eq. 6.
- Steps: :class:`MasterPartitions` finds each parameter's slice of the fp32 master flat on this rank (rank r holds
  global flat entries ``[r * P, (r + 1) * P)``, P = partition size, the last one padded); the guard's torch step
  hooks on the optimizer ZeRO wraps (e.g. ``DeepSpeedCPUAdam``) back these slices up and write masked entries
  back, which undoes weight decay; ZeRO then copies the master into the parameter partitions.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_PINNED = -0x7F15  # a module id no module has: while present, ZeRO-3's coordinator never releases the parameter


def is_zero3(t: object) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` / ``deepspeed.initialize``)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_tensor") and hasattr(t, "ds_shape")


def full_shape(p: Tensor) -> torch.Size:
    """The real shape of a parameter, also when ZeRO-3 has replaced its data by an empty placeholder."""
    return p.ds_shape if is_zero3(p) else p.shape


def full_numel(p: Tensor) -> int:
    return int(p.ds_numel) if is_zero3(p) else p.numel()


@contextmanager
def gathered(params: Iterable[Tensor]):
    """Hold the ZeRO-3 parameters among ``params`` gathered (full on every rank) for the block; a collective.

    ``deepspeed.zero.GatheredParameters`` gathers them, but ZeRO's coordinator would release them again after the
    first module that uses them; a pin in ``ds_active_sub_modules`` (how ZeRO marks a parameter in use) keeps them.
    No-op when none is partitioned."""
    # only those not available now: persistent ones (under stage3_param_persistence_threshold) stay gathered once a
    # forward has fetched them, and must not be partitioned on exit; before the first forward they are not yet
    parts = [p for p in params if is_zero3(p) and getattr(p.ds_status, "name", "") != "AVAILABLE"]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts):
        for p in parts:
            p.ds_active_sub_modules.add(_PINNED)
        try:
            yield
        finally:
            # clear, not just unpin: a module fed a no-grad input (LoRA A in the first layer) never runs ZeRO's
            # post-backward release; engine.backward would clean that up, a bare autograd.grad does not
            for p in parts:
                p.ds_active_sub_modules.clear()


def zero_optimizer(optimizer, stage3_only: bool = False) -> object | None:
    """DeepSpeed's ZeRO optimizer (stage 3, or 1/2 unless ``stage3_only``) below accelerate's / the engine's
    wrappers, else None."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if hasattr(optimizer, "fp32_partitioned_groups_flat") and hasattr(optimizer, "grad_position"):
            return optimizer
        if not stage3_only and hasattr(optimizer, "single_partition_of_fp32_groups"):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def zero3_optimizer(optimizer) -> object | None:
    """The ``DeepSpeedZeroOptimizer_Stage3`` below accelerate's / the engine's wrappers, else None."""
    return zero_optimizer(optimizer, stage3_only=True)


def zero_params(zero_opt) -> list[Tensor]:
    """The module parameters a ZeRO optimizer trains (its groups hold flat fp32 masters instead)."""
    groups = zero_opt.fp16_groups if hasattr(zero_opt, "fp32_partitioned_groups_flat") else zero_opt.bit16_groups
    return [p for group in groups for p in group]


def prepend_grad_hook(p: Tensor, hook):
    """``p.register_post_accumulate_grad_hook(hook)``, moved before hooks registered earlier (ZeRO's reduce)."""
    handle = p.register_post_accumulate_grad_hook(hook)
    hooks = getattr(p, "_post_accumulate_grad_hooks", None)
    if not hasattr(hooks, "move_to_end"):  # pragma: no cover - a torch that stores these hooks differently
        handle.remove()
        raise RuntimeError("FISH under ZeRO-3 needs its gradient hook to run before DeepSpeed's reduce hook, and "
                           "this torch version keeps post-accumulate-grad hooks where it cannot be ordered")
    hooks.move_to_end(handle.id, last=False)
    return handle


class MasterPartitions:
    """This rank's slices of a ZeRO optimizer's fp32 master weights and gradients, per module parameter.

    ZeRO-3: from ``grad_position`` (sub-group, offset) and the partition size. ZeRO-1/2 (parameters whole on
    every rank, the fp32 master of each group flattened and split across ranks): from the fragment DeepSpeed links
    to each parameter (``param._hp_mapping``: which flat range of the parameter, where in this rank's partition;
    None when this rank holds none of it). Refuses what it cannot see: NVMe-swapped optimizer state (the master
    is not in memory between steps), ZenFlow and SuperOffload (their CPU steps bypass the wrapped optimizer's
    ``step``).
    """

    def __init__(self, zero_opt, params: Iterable[Tensor]):
        self.stage3 = hasattr(zero_opt, "fp32_partitioned_groups_flat")
        needed = ("fp32_partitioned_groups_flat", "grad_position", "get_param_id") if self.stage3 else (
            "single_partition_of_fp32_groups",)
        missing = [a for a in (*needed, "optimizer") if not hasattr(zero_opt, a)]
        if missing:
            raise RuntimeError(f"FISH does not recognise this DeepSpeed ZeRO optimizer ({type(zero_opt).__name__} "
                               f"has no {missing[0]!r}); it was written against deepspeed 0.19")
        if getattr(zero_opt, "swap_optimizer", False):
            raise NotImplementedError("FISH under ZeRO cannot mask optimizer state swapped to NVMe "
                                      "(offload_optimizer.device='nvme'): the fp32 master is not in memory between "
                                      "steps. Use offload_optimizer.device='cpu' (the paper's set-up) or 'none'.")
        if getattr(zero_opt, "superoffload_cpu_optimizer", None) is not None:
            raise NotImplementedError("FISH under ZeRO-3 does not support SuperOffload (offload_optimizer."
                                      "super_offload=true): its CPU sub-groups are stepped by a worker process, not "
                                      "the wrapped optimizer's step, so weight decay would move masked entries. "
                                      "Turn super_offload off (plain offload_optimizer.device='cpu' is supported).")
        if getattr(zero_opt, "zenflow", False):
            raise NotImplementedError("FISH under ZeRO does not support ZenFlow: its CPU step bypasses the wrapped "
                                      "optimizer, so masked entries could move. Turn zenflow off.")
        self.zero_opt = zero_opt
        self.flats = zero_opt.fp32_partitioned_groups_flat if self.stage3 else zero_opt.single_partition_of_fp32_groups
        self.where: dict[Tensor, tuple[int, int, int, int]] = {}  # p -> (group, offset in its flat, lo, hi)
        for p in params:
            if self.stage3:
                group, offset, size = zero_opt.grad_position[zero_opt.get_param_id(p)]
                rank = zero_opt._get_param_partition_rank(p)
                lo = min(rank * size, p.ds_numel)
                self.where[p] = (group, offset, lo, min(lo + size, p.ds_numel))
                continue
            frag = getattr(p, "_hp_mapping", None)
            if frag is None:  # none of this parameter is in this rank's partition
                self.where[p] = (-1, 0, 0, 0)
            else:
                lo = frag.lp_fragment_address.start
                self.where[p] = (frag.param_group_index, frag.hp_fragment_address.start, lo,
                                 lo + frag.lp_fragment_address.numel)

    def local_indices(self, p: Tensor, indices: Tensor) -> Tensor:
        """The sorted global flat ``indices`` of ``p`` that this rank's partition holds, as positions in it."""
        _, _, lo, hi = self.where[p]
        idx = indices.to(torch.int64)
        a, b = (int(torch.searchsorted(idx, torch.tensor(v, dtype=torch.int64))) for v in (lo, hi))
        return (idx[a:b] - lo).to(indices.dtype)

    def master(self, p: Tensor) -> Tensor:
        """This rank's fp32 master entries of ``p`` (a view: in-place writes reach the optimizer's copy)."""
        group, offset, lo, hi = self.where[p]
        if group < 0:
            return torch.zeros(0)
        return self.flats[group].narrow(0, offset, hi - lo)

    def grad(self, p: Tensor) -> Tensor | None:
        group, offset, lo, hi = self.where[p]
        grad = self.flats[group].grad if group >= 0 else None
        return None if grad is None else grad.narrow(0, offset, hi - lo)

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers ZeRO steps the master flats with (a second one with partial offload)."""
        out = [self.zero_opt.optimizer]
        backup = getattr(self.zero_opt, "backup_optimizer", None)
        if isinstance(backup, torch.optim.Optimizer):
            out.append(backup)
        return out


def model_is_zero3(model: nn.Module) -> bool:
    return any(is_zero3(p) for p in model.parameters())
