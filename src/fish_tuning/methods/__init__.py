"""Which parameters each PEFT method adds: the FISH candidates, and what stays fully trainable."""

from .peft import always_trainable, check_lora_init, peft_candidates

__all__ = ["always_trainable", "check_lora_init", "peft_candidates"]
