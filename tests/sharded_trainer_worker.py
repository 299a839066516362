"""Run by tests/test_deepspeed.py and tests/test_fsdp_trainer.py under ``torchrun --nproc_per_node 2`` (gloo,
CPU): FishCallback in a Trainer on a sharded model.

``python sharded_trainer_worker.py ENGINE OUT MODE``; ENGINE ``zero3`` / ``zero2`` (DeepSpeed ZeRO-3 / ZeRO-2,
optimizer offloaded to the CPU, ``DS_ACCELERATOR=cpu``) or ``fsdp2`` (accelerate's FSDP2); MODE
- ``train``: Fisher scores straight from ``compute_fisher`` on the sharded model, then an uninterrupted run
  (checkpoint every step) and a run resumed from its first checkpoint; writes scores, masks, gathered weights
  and per-step gradient checks to OUT.
- ``die``: rank 1 exits after the first step (the launcher must end the run, not hang).
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist
import yaml
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fish_tuning as ft  # noqa: E402
from fish_tuning.integrations.trainer_checks import innermost_optimizer  # noqa: E402
from fish_tuning.sharded import local, local_indices  # noqa: E402
from fish_tuning.zero3 import MasterPartitions, gathered, zero3_optimizer, zero_optimizer  # noqa: E402
from sharded_trainer import FISHER_SAMPLES, KEEP, ROOT, make_trainer, train_rows  # noqa: E402
from test_fsdp import llama_lora  # noqa: E402


class Probe(TrainerCallback):
    """Placed before FishCallback. At train begin: the Fisher of the sharded model straight from compute_fisher.
    At each step, before the optimizer (and before the guard's own step hook): the masked entries of this rank's
    reduced gradient must already be zero: masked in backward, before the reduce-scatter and clipping."""

    def __init__(self, fish, out, die=False):
        self.fish, self.out, self.die = fish, out, die
        self.checked = self.nonzero = self.refused = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kw):
        if state.global_step == 0:
            loader = ft.calibration_loader(train_dataloader.dataset, FISHER_SAMPLES, batch_size=4,
                                           collate_fn=train_dataloader.collate_fn, seed=args.seed)
            scores = ft.compute_fisher(model, loader, num_samples=FISHER_SAMPLES, params=ft.peft_candidates(model),
                                       progress=False)
            save_file({n: s.contiguous() for n, s in scores.items()},
                      os.path.join(self.out, f"fisher_rank{dist.get_rank()}.safetensors"))
        named = dict(model.named_parameters())
        zero = zero_optimizer(optimizer)
        if zero3_optimizer(optimizer) is not None and state.global_step == 0:  # a guard on ZeRO-3 parameters needs ZeRO's optimizer
            params = [p for p in model.parameters() if p.requires_grad]
            try:
                ft.MaskGuard(ft.select_mask(scores, keep=KEEP), model, params).attach(torch.optim.SGD(params, lr=0.1))
            except ValueError as err:
                self.refused += "ZeRO-3" in str(err)

        def check(*_):
            mask = self.fish.mask
            parts = MasterPartitions(zero, [named[n] for n in mask.names]) if zero is not None else None
            for n in mask.names:
                p = named[n]
                if parts is not None:  # ZeRO: this rank's slice of the reduced fp32 gradient
                    grad, idx = parts.grad(p), parts.local_indices(p, mask.indices[n].long())
                    if grad is None and parts.where[p][0] < 0:  # ZeRO-1/2: none of p is in this rank's partition
                        grad = torch.zeros(0)
                else:  # FSDP2: this rank's shard of the reduce-scattered gradient
                    grad, idx = local(p.grad).reshape(-1), local_indices(mask.indices[n], p).long()
                frozen = torch.ones(grad.numel(), dtype=torch.bool)
                frozen[idx] = False
                self.nonzero += int(grad[frozen].count_nonzero())
                self.checked += 1

        (zero.optimizer if zero is not None else innermost_optimizer(optimizer)).register_step_pre_hook(check)

    def on_step_end(self, args, state, control, **kw):
        if self.die and dist.get_rank() == 1:
            os._exit(3)


def gathered_weights(model, names) -> dict[str, torch.Tensor]:
    """Full values of the named parameters on every rank (a collective)."""
    named = dict(model.named_parameters())
    with gathered([named[n] for n in names]):
        return {n: (named[n].full_tensor() if hasattr(named[n], "full_tensor") else named[n]).detach().clone()
                for n in names}


def emulate_gpu_launch(engine: str) -> None:
    """accelerate 1.15 turns DeepSpeed and FSDP on only off the CPU (state.py: PartialState enters DeepSpeed under
    `if not cpu`; AcceleratorState sets FSDP only for MULTI_GPU/NPU/XPU/... and DeepSpeed with `... and not cpu`),
    so on this CPU-only machine a Trainer would silently run DDP. Set the state up as a GPU launch would: gloo over
    the 2 processes, distributed type DEEPSPEED / FSDP (with the FSDP2 plugin); TrainingArguments then reuse it
    (accelerator_config={"use_configured_state": True})."""
    AcceleratorState._reset_state(reset_partial_state=True)
    state = PartialState(cpu=True, backend="gloo", timeout=datetime.timedelta(seconds=60))
    state.distributed_type = DistributedType.DEEPSPEED if engine.startswith("zero") else DistributedType.FSDP
    if engine == "fsdp2":
        acc = AcceleratorState(cpu=True, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
        acc.distributed_type = DistributedType.FSDP
        # the plugin `accelerate launch --config_file configs/accelerate_fsdp2.yaml` builds: from FSDP_* variables
        cfg = yaml.safe_load((ROOT / "configs" / "accelerate_fsdp2.yaml").read_text())["fsdp_config"]
        names = {"fsdp_transformer_layer_cls_to_wrap": "FSDP_TRANSFORMER_CLS_TO_WRAP"}
        os.environ.update({names.get(k, k.upper()): str(v).lower() if isinstance(v, bool) else str(v)
                           for k, v in cfg.items()})
        acc.fsdp_plugin = FullyShardedDataParallelPlugin()
        assert acc.fsdp_plugin.fsdp_version == 2


def run(engine, out, name, resume=None, die=False):
    emulate_gpu_launch(engine)
    fish = ft.FishCallback(keep=KEEP, num_samples=FISHER_SAMPLES)
    probe = Probe(fish, out, die=die)
    trainer = make_trainer(os.path.join(out, name), train_rows(), probe, fish, engine=engine, save=True)
    trainer.train(resume_from_checkpoint=resume)  # FSDP2 shards the model here; before it, weights are plain
    model = trainer.model
    cands = [n for n in dict(model.named_parameters()) if "lora_" in n]
    after = gathered_weights(model, cands)
    rank = dist.get_rank()
    fish.mask.save(os.path.join(out, f"{name}_mask_rank{rank}.safetensors"))
    stats = {"checked": torch.tensor(probe.checked), "masked_grad_nonzero": torch.tensor(probe.nonzero),
             "refused": torch.tensor(probe.refused),
             "from_checkpoint": torch.tensor(int(fish.source == "checkpoint")),
             "world": torch.tensor(dist.get_world_size())}
    before = {n: p.detach() for n, p in llama_lora().named_parameters() if n in after}  # the same seeded init
    save_file({**{f"before.{n}": t for n, t in before.items()}, **{f"after.{n}": t for n, t in after.items()},
               **stats}, os.path.join(out, f"{name}_rank{rank}.safetensors"))


def main(engine: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "die":
        run(engine, out, "die", die=True)
        return
    run(engine, out, "full")
    run(engine, out, "resumed", resume=os.path.join(out, "full", "checkpoint-1"))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
