"""Run by tests/test_deepspeed.py under ``torchrun --nproc_per_node 2`` (gloo, ``DS_ACCELERATOR=cpu``): FISH with
DeepSpeed's own engine loop (no Trainer), bf16 ZeRO-3, optimizer offloaded to the CPU, gradient accumulation 2,
clipping. The mask comes from an fp32 Fisher pass before ``deepspeed.initialize``; the same Fisher on the bf16
partitions after it is saved for comparison; the guard is attached to ``engine.optimizer``. Writes the gathered
bf16 LoRA weights before/after, both Fisher scores and the mask to argv[1].
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fish_tuning as ft  # noqa: E402
from fish_tuning.zero3 import gathered  # noqa: E402
from sharded_trainer import FISHER_SAMPLES, KEEP, STEPS, train_rows  # noqa: E402
from test_fsdp import llama_lora  # noqa: E402


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def main(out: str) -> None:
    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    rank = dist.get_rank()
    model = llama_lora()
    rows = train_rows().rows
    mine = rows[rank::2]  # this rank's share of the calibration samples
    calib = [stack(mine[i: i + 4]) for i in range(0, len(mine), 4)]
    scores = ft.compute_fisher(model, calib, num_samples=FISHER_SAMPLES, params=ft.peft_candidates(model),
                               progress=False)
    mask = ft.select_mask(scores, keep=KEEP)
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.01,
           "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                 "stage3_param_persistence_threshold": 50},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}}
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    # The same Fisher on the bf16 ZeRO-3 partitions (no per-sample loop there: the hooks' checks must pass in bf16).
    bf16 = ft.compute_fisher(engine.module, calib, num_samples=FISHER_SAMPLES, params=ft.peft_candidates(model),
                             progress=False)
    save_file({**{f"fp32.{n}": s for n, s in scores.items()}, **{f"bf16.{n}": s for n, s in bf16.items()}},
              os.path.join(out, f"engine_fisher_rank{rank}.safetensors"))
    named = dict(engine.module.named_parameters())
    with gathered([named[n] for n in mask.names]):
        before = {f"before.{n}": named[n].detach().clone() for n in mask.names}
    with ft.MaskGuard(mask, engine.module, params, optimizer=engine.optimizer):
        for step in range(STEPS * 2):  # 2 micro-batches of 2 per rank and optimizer step
            batch = stack(rows[8 * (step // 2) + 4 * (step % 2):][:4][rank::2])
            engine.backward(engine(**batch).loss)
            engine.step()
    with gathered([named[n] for n in mask.names]):
        after = {f"after.{n}": named[n].detach().clone() for n in mask.names}
    mask.save(os.path.join(out, f"engine_mask_rank{rank}.safetensors"))
    save_file({**before, **after}, os.path.join(out, f"engine_rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
