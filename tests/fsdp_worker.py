"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): FISH on an FSDP2-sharded model.

``python fsdp_worker.py OUT MODE`` with MODE
- ``train``: Fisher on each rank's share of the calibration rows (also under bf16 mixed precision), select_mask,
  then a few masked AdamW steps with SparseAdamW and with MaskedOptimizer(AdamW); writes scores, masks, gathered
  weights and per-rank costs to OUT.
- ``die``: rank 1 exits while rank 0 is inside compute_fisher's first all-gather (the launcher must not hang).
- ``hang``: rank 1 sleeps forever (only the test's timeout, which kills the process group, ends it).
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fish_tuning as ft  # noqa: E402
from fish_tuning.sharded import local, shard_rows  # noqa: E402
from test_fsdp import (  # noqa: E402
    FISHER_SAMPLES,
    KEEP,
    OPT,
    STEPS,
    calibration_rows,
    llama_lora,
    stack,
    token_loss,
    train_batches,
)


def sharded_model(mp_policy: MixedPrecisionPolicy | None = None):
    model = llama_lora()
    kw = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def full(model, names):
    """Gathered (full) values of the named parameters: a collective, so every rank calls it."""
    named = dict(model.named_parameters())
    return {n: named[n].full_tensor().detach().clone() for n in names}


def train(model, mask, opt, rank, world, batches=None):
    """Masked steps over the global batches (default all STEPS); this rank takes rows rank, rank + W, ... of each."""
    named = dict(model.named_parameters())
    nonzero = checked = 0
    for batch in train_batches() if batches is None else batches:
        tokens = int((batch["labels"][:, 1:] != -100).sum())  # of the whole global batch
        mine = {k: v[rank::world] for k, v in batch.items()}
        # FSDP averages gradients over ranks: sum / (tokens / W) per rank averages to the global sum / tokens
        (token_loss(model, mine) / (tokens / world)).backward()
        for name in mask.names:  # the guard's hook ran on this rank's reduce-scattered gradient shard
            p = named[name]
            start, stop = shard_rows(p)
            frozen = ~mask.bool_mask(name)[start:stop]
            nonzero += int(local(p.grad)[frozen].count_nonzero())
            checked += 1
        opt.step()
        opt.zero_grad()
    return nonzero, checked


def refusals(model, fisher) -> int:
    """How many of the unsupported sharded cases raise a clear ValueError on every rank (so none hangs)."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    count = 0
    try:
        ft.compute_fisher(model, [stack(calibration_rows()[:2])], num_samples=2, distributed=False, progress=False)
    except ValueError as err:
        count += "distributed=False" in str(err)
    try:  # a different mask on each rank (as separately computed Fisher scores would give)
        ft.SparseAdamW(model, ft.select_mask(fisher, keep=0.1 * (1 + dist.get_rank())), **OPT)
    except ValueError as err:
        count += "differs between ranks" in str(err)
    try:
        ft.compute_fisher(model, [stack(calibration_rows()[:2])], num_samples=2, engine="loop", progress=False)
    except ValueError as err:
        count += "FSDP2-sharded" in str(err) and "engine='loop'" in str(err)
    column = distribute_tensor(torch.zeros(4, 6), init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(1)])
    try:
        shard_rows(column)
    except ValueError as err:
        count += "sharded on dim 0" in str(err)
    return count


def resume(mask, out, rank, world):
    """1 step, a sharded checkpoint, then a fresh model and optimizer resume from it for the remaining steps.

    Model: torch.distributed.checkpoint (each rank writes its DTensor shards). SparseAdamW: one file per rank (its
    compact state covers this rank's kept entries only, so resuming needs the same world size and sharding;
    load_state_dict refuses a state whose sizes do not fit). Mask: fish_mask.safetensors, written once by rank 0.
    """
    ckpt = os.path.join(out, "ckpt")
    model = sharded_model()
    opt = ft.SparseAdamW(model, mask, **OPT)
    train(model, mask, opt, rank, world, train_batches()[:1])
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=ckpt)
    torch.save(opt.state_dict(), os.path.join(ckpt, f"optim_rank{rank}.pt"))
    if rank == 0:
        mask.save(os.path.join(ckpt, ft.FishMask.FILE_NAME))
    dist.barrier()
    opt.close()
    del model, opt

    model = sharded_model()  # fresh: the initial weights, not those of step 1
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    loaded = ft.FishMask.load(os.path.join(ckpt, ft.FishMask.FILE_NAME))
    opt = ft.SparseAdamW(model, loaded, **OPT)
    opt.load_state_dict(torch.load(os.path.join(ckpt, f"optim_rank{rank}.pt"), weights_only=True))
    train(model, loaded, opt, rank, world, train_batches()[1:])
    opt.close()
    return {f"resumed.{n}": t for n, t in full(model, mask.names).items()}


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # fail, do not hang forever
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = sharded_model()
    shard = calibration_rows()[rank::world]
    batches = [stack(shard[i: i + 4]) for i in range(0, len(shard), 4)]
    if mode == "die" and rank == 1:
        os._exit(3)
    if mode == "hang" and rank == 1:
        time.sleep(3600)

    t0 = time.perf_counter()
    fisher = ft.compute_fisher(model, batches, num_samples=FISHER_SAMPLES, progress=False)
    fisher_s = time.perf_counter() - t0
    mask = ft.select_mask(fisher, keep=KEEP)
    t0 = time.perf_counter()  # the same samples in one ordinary batched forward + backward, for the cost ratio
    for batch in batches:
        token_loss(model, batch).backward()
    fwdbwd_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    save_file({n: s.contiguous() for n, s in fisher.items()}, os.path.join(out, f"fisher_rank{rank}.safetensors"))
    # bf16 mixed precision (as configs/accelerate_fsdp2.yaml): the hooks' checks must pass at bf16 (no loop here)
    bf16 = ft.compute_fisher(sharded_model(MixedPrecisionPolicy(param_dtype=torch.bfloat16)), batches,
                             num_samples=FISHER_SAMPLES, progress=False)
    save_file({n: s.contiguous() for n, s in bf16.items()}, os.path.join(out, f"fisher_bf16_rank{rank}.safetensors"))
    mask.save(os.path.join(out, f"mask_rank{rank}.safetensors"))

    stats = {"world": torch.tensor(world), "fisher_s": torch.tensor(fisher_s), "fwdbwd_s": torch.tensor(fwdbwd_s),
             "refusals": torch.tensor(refusals(model, fisher)),
             "score_bytes": torch.tensor(sum(s.numel() * s.element_size() for s in fisher.values()))}
    weights = {}
    for kind in ("sparse", "masked"):
        model = sharded_model()
        before = full(model, mask.names)
        if kind == "sparse":
            opt = ft.SparseAdamW(model, mask, **OPT)
            stats["kept_local"] = torch.tensor(sum(e.index.numel() for e in opt.local_mask.entries.values()))
        else:
            opt = ft.make_optimizer(model, mask, sparse=False, **OPT)
        t0 = time.perf_counter()
        nonzero, checked = train(model, mask, opt, rank, world)
        stats[f"{kind}_step_s"] = torch.tensor((time.perf_counter() - t0) / STEPS)
        stats[f"{kind}_masked_grad_nonzero"] = torch.tensor(nonzero)
        stats[f"{kind}_grads_checked"] = torch.tensor(checked)
        if kind == "sparse":
            stats["state_bytes"] = torch.tensor(opt.state_bytes())
        after = full(model, mask.names)
        weights.update({f"{kind}.before.{n}": t for n, t in before.items()})
        weights.update({f"{kind}.after.{n}": t for n, t in after.items()})
        opt.close()
    weights.update(resume(mask, out, rank, world))
    save_file({**weights, **stats}, os.path.join(out, f"weights_rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
