"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU); writes results to argv[1].

1. plain ``compute_fisher``: each rank scores its DistributedSampler-style shard (rows r, r + W, ...).
2. ``FishCallback`` in a DDP ``Trainer``: mask, and LoRA weights before/after a few masked steps.
3. a mask selected separately on each rank: every rank's optimizer must refuse it.
4. ``FishCallback(refresh_every=...)`` in a DDP ``Trainer``: the mask in force and the weights after it moved.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fish_tuning as ft  # noqa: E402
from conftest import lora, tiny_bert  # noqa: E402
from test_distributed import FISHER_SAMPLES, TRAIN_SAMPLES, calibration_rows, stack, train_rows  # noqa: E402


class MaskedGradsAfterAllReduce(TrainerCallback):
    """Between DDP's all-reduce + clipping and the step: masked gradient entries must be exactly zero."""

    def __init__(self, fish):
        self.fish, self.checked, self.nonzero = fish, 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        for name in self.fish.mask.names:
            grad = named[name].grad
            if grad is not None:
                self.checked += 1
                self.nonzero += int(grad[~self.fish.mask.bool_mask(name)].count_nonzero())


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # fail, do not hang
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    # 1. plain compute_fisher over this rank's shard; num_samples is the global count
    model = lora(tiny_bert())
    shard = calibration_rows()[rank::world]
    batches = [stack(shard[i: i + 4]) for i in range(0, len(shard), 4)]
    fisher = ft.compute_fisher(model, batches, num_samples=FISHER_SAMPLES, progress=False)
    save_file({n: s.contiguous() for n, s in fisher.items()}, os.path.join(out, f"fisher_rank{rank}.safetensors"))

    # 2. FishCallback in a DDP Trainer
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cb = ft.FishCallback(keep=0.1, num_samples=TRAIN_SAMPLES)
    args = TrainingArguments(output_dir=os.path.join(out, "run"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, logging_steps=1)
    probe = MaskedGradsAfterAllReduce(cb)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows(), callbacks=[cb, probe])
    trainer.train()
    ddp = isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    cb.mask.save(os.path.join(out, f"mask_rank{rank}.safetensors"))
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file({**{f"before.{n}": t for n, t in before.items()}, **{f"after.{n}": t for n, t in after.items()},
               "world": torch.tensor(world),
               "ddp": torch.tensor(int(ddp)),
               "grads_checked": torch.tensor(probe.checked), "masked_grad_nonzero": torch.tensor(probe.nonzero)}, os.path.join(out, f"weights_rank{rank}.safetensors"))

    # 3. a mask that differs between DDP ranks (selected per rank) must be refused on every rank, not diverge
    del trainer, model
    dist.barrier()  # the DDP run above is over on both ranks before the next collective
    model = lora(tiny_bert())
    params = dict(model.named_parameters())
    own = ft.select_mask({n: torch.rand(params[n].shape, generator=torch.Generator().manual_seed(rank))
                          for n in ft.peft_candidates(model)}, keep=0.1, always_train=ft.always_trainable(model))
    try:
        ft.make_optimizer(model, own)
        refused = ""
    except ValueError as err:
        refused = str(err)
    with open(os.path.join(out, f"own_mask_rank{rank}.txt"), "w") as f:
        f.write(refused)
    dist.barrier()

    # 4. a mask that moves (refresh) in a DDP Trainer: every rank must refresh identically
    model = lora(tiny_bert(), modules_to_save=["classifier"])
    cb = ft.FishCallback(keep=0.1, num_samples=TRAIN_SAMPLES, refresh_every=2, refresh_fraction=0.5)
    args = TrainingArguments(output_dir=os.path.join(out, "moving"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, weight_decay=0.1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train_rows(), callbacks=[cb]).train()
    cb.mask.save(os.path.join(out, f"moving_mask_rank{rank}.safetensors"))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              os.path.join(out, f"moving_weights_rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
