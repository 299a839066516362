"""Run by tests/test_sharded_paths_audit.py under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python sharded_audit_worker.py ENGINE OUT``; ENGINE ``zero3`` / ``zero2`` / ``fsdp2``. A Trainer run with
FishCallback(mask=...) (the mask selected in one process, OUT/given_mask.safetensors), gradient accumulation 2,
clipping and weight decay, on a model whose candidates shard unevenly (odd numel, dim 0 smaller than the world
size); then ``save_model``. Writes the gathered weights of every rank to OUT/<ENGINE>_rank<r>.safetensors.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fish_tuning as ft  # noqa: E402
from conftest import lora  # noqa: E402
from sharded_trainer import CLIP, FSDP_CONFIG, ROOT, train_rows  # noqa: E402
from sharded_trainer_worker import emulate_gpu_launch, gathered_weights  # noqa: E402

STEPS = 3


def audit_model():
    """Tiny Llama, vocab 65, LoRA r=3 on q_proj and lm_head (lm_head lora_B: 65 x 3 = 195 entries, odd), r=1 on
    v_proj (lora_A: [1, 32], fewer rows than ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        return lora(LlamaForCausalLM(cfg).eval(), targets=("q_proj", "v_proj", "lm_head"), task="CAUSAL_LM", r=3,
                    rank_pattern={"v_proj": 1})
    finally:
        torch.set_num_threads(threads)


def trainer_for(out: str, engine: str | None, mask: ft.FishMask | None, batch: int, accum: int) -> Trainer:
    sharded = {}
    if engine in ("zero3", "zero2"):
        cfg = json.loads((ROOT / "configs" / "ds_zero3_offload.json").read_text())
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 20  # v_proj lora_B (16) stays whole
        cfg["zero_optimization"]["stage"] = 3 if engine == "zero3" else 2
        sharded = {"deepspeed": cfg}
    elif engine == "fsdp2":
        sharded = {"fsdp": "full_shard", "fsdp_config": FSDP_CONFIG}
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=CLIP, optim="adamw_torch", save_strategy="steps",
        save_steps=1, report_to=[], seed=0, disable_tqdm=True, use_cpu=engine is None,
        accelerator_config={"use_configured_state": True} if engine else None, **sharded)
    fish = ft.FishCallback(mask=mask) if mask is not None else ft.FishCallback(keep=0.1)
    return Trainer(model=audit_model(), args=args, train_dataset=train_rows(), callbacks=[fish])


def main(engine: str, out: str, mode: str = "train") -> None:
    """``train``: the run above. ``resume``: on however many ranks torchrun starts, resume the ``train`` run's
    checkpoint-1 with FishCallback(keep=...) (the mask must come back from the checkpoint)."""
    torch.set_num_threads(1)
    emulate_gpu_launch(engine)
    mask = ft.FishMask.load(os.path.join(out, "given_mask.safetensors"))
    if mode == "resume":
        trainer = trainer_for(os.path.join(out, f"{engine}_resume"), engine, None, batch=8 // dist.get_world_size(),
                              accum=1)
        trainer.train(resume_from_checkpoint=os.path.join(out, engine, "checkpoint-1"))
        fish = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ft.FishCallback))
        assert fish.source == "checkpoint" and fish.mask.fingerprint() == mask.fingerprint(), fish.source
    else:
        trainer = trainer_for(os.path.join(out, engine), engine, mask, batch=2, accum=2)
        trainer.train()
    after = gathered_weights(trainer.model, [n for n, _ in trainer.model.named_parameters() if "lora_" in n])
    rank = dist.get_rank()
    save_file({f"after.{n}": t.contiguous() for n, t in after.items()},
              os.path.join(out, f"{engine}_{mode}_rank{rank}.safetensors"))
    if engine == "fsdp2":  # save_model writes nothing under SHARDED_STATE_DICT: gather a full one for the adapter
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(os.path.join(out, engine, f"final_{mode}"))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
