"""Run by tests/test_deepspeed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU, ``DS_ACCELERATOR=cpu``):
FishCallback in a Trainer with DeepSpeed ZeRO-3 and the optimizer offloaded to the CPU.

``python deepspeed_worker.py OUT MODE`` with MODE
- ``train``: Fisher scores straight from ``compute_fisher`` on the partitioned model, then an uninterrupted run
  (checkpoint every step) and a run resumed from its first checkpoint; writes scores, masks, gathered weights
  and per-step gradient checks to OUT.
- ``die``: rank 1 exits after the first step (the launcher must end the run, not hang).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fish_tuning as ft  # noqa: E402
from fish_tuning.zero3 import MasterPartitions, gathered, zero3_optimizer  # noqa: E402
from test_deepspeed import FISHER_SAMPLES, KEEP, ds_config, make_trainer  # noqa: E402


class Probe(TrainerCallback):
    """Placed before FishCallback. At train begin: the Fisher of the partitioned model straight from
    compute_fisher. At each step, before the guard's own step hook: the reduced fp32 gradient slices of masked
    entries must already be zero (masked in backward, before ZeRO's reduce-scatter and the clipping norm)."""

    def __init__(self, fish, out, die=False):
        self.fish, self.out, self.die = fish, out, die
        self.checked = self.nonzero = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        zero = zero3_optimizer(optimizer)
        assert zero is not None, "not running under ZeRO-3"
        if state.global_step == 0:
            cands = ft.peft_candidates(model)
            loader = ft.calibration_loader(train_dataloader.dataset, FISHER_SAMPLES, batch_size=4,
                                           collate_fn=train_dataloader.collate_fn, seed=args.seed)
            scores = ft.compute_fisher(model, loader, num_samples=FISHER_SAMPLES, params=cands, progress=False)
            save_file({n: s.contiguous() for n, s in scores.items()},
                      os.path.join(self.out, f"fisher_rank{dist.get_rank()}.safetensors"))
        named = dict(model.named_parameters())

        def check(*_):
            mask = self.fish.mask
            params = [named[n] for n in mask.names]
            parts = MasterPartitions(zero, params)
            for n, p in zip(mask.names, params):
                grad = parts.grad(p)
                local = parts.local_indices(p, mask.indices[n].long())
                frozen = torch.ones(grad.numel(), dtype=torch.bool)
                frozen[local] = False
                self.nonzero += int(grad[frozen].count_nonzero())
                self.checked += 1

        zero.optimizer.register_step_pre_hook(check)

    def on_step_end(self, args, state, control, **kw):
        if self.die and dist.get_rank() == 1:
            os._exit(3)


def gathered_weights(model, names) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    with gathered([named[n] for n in names]):
        return {n: named[n].detach().clone() for n in names}


def run(out, name, rows, resume=None, die=False):
    fish = ft.FishCallback(keep=KEEP, num_samples=FISHER_SAMPLES)
    probe = Probe(fish, out, die=die)
    trainer = make_trainer(os.path.join(out, name), rows, probe, fish, deepspeed=ds_config(), save=True)
    named = dict(trainer.model.named_parameters())
    cands = [n for n, p in named.items() if "lora_" in n]
    before = gathered_weights(trainer.model, cands)
    trainer.train(resume_from_checkpoint=resume)
    after = gathered_weights(trainer.model, cands)
    rank = dist.get_rank()
    fish.mask.save(os.path.join(out, f"{name}_mask_rank{rank}.safetensors"))
    stats = {"checked": torch.tensor(probe.checked), "masked_grad_nonzero": torch.tensor(probe.nonzero),
             "from_checkpoint": torch.tensor(int(fish.source == "checkpoint")),
             "world": torch.tensor(dist.get_world_size())}
    save_file({**{f"before.{n}": t for n, t in before.items()}, **{f"after.{n}": t for n, t in after.items()},
               **stats}, os.path.join(out, f"{name}_rank{rank}.safetensors"))


def main(out: str, mode: str) -> None:
    # accelerate enables DeepSpeed only off the CPU (PartialState: `if not cpu`; AcceleratorState: `... and not
    # cpu`), so on a CPU-only machine the Trainer would run 2 independent 1-process jobs. Set the state up as a
    # GPU launch would: gloo over 2 processes, distributed type DEEPSPEED; TrainingArguments then reuse it.
    state = PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(seconds=60))
    state.distributed_type = DistributedType.DEEPSPEED
    torch.set_num_threads(1)
    from test_deepspeed import train_rows

    rows = train_rows()
    if mode == "die":
        run(out, "die", rows, die=True)
        return
    run(out, "full", rows)
    AcceleratorState._reset_state()  # a second Trainer may not bring its DeepSpeed plugin to the first's state
    run(out, "resumed", rows, resume=os.path.join(out, "full", "checkpoint-1"))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
