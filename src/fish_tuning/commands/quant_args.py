"""`fish-tune train --load_in_4bit`: the base model quantized by bitsandbytes (QLoRA), with TRL's flag names.

With ``--init_lora_weights pissa`` (the default) the adapter is QPiSSA: PiSSA on the full-precision weights, the
residual quantized; the residual base is saved in ``<output_dir>/qpissa_base`` (the adapter applies to it, and
its ``adapter_config.json`` names it). ``--init_lora_weights loftq`` is LoftQ on the ordinary 4-bit base;
``default`` is plain QLoRA (B = 0: A has zero Fisher, and FISH warns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .common import CommandError

RESIDUAL_DIR = "qpissa_base"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class QuantArguments:
    load_in_4bit: bool = field(default=False, metadata={
        "help": "Load the base model in 4 bits (bitsandbytes; pip install 'fish-tuning[qlora]'). LoRA / DoRA only; "
                "with --init_lora_weights pissa the residual after PiSSA is quantized (QPiSSA), loftq: LoftQ."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base model in 8 bits (bitsandbytes LLM.int8). LoRA / DoRA only."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    use_bnb_nested_quant: bool = field(default=False, metadata={
        "help": "Quantize the 4-bit quantization constants too (QLoRA's double quantization)."})
    bnb_4bit_compute_dtype: str = field(default="auto", metadata={
        "help": f"dtype of the 4-bit matmuls: {', '.join(COMPUTE_DTYPES)} (auto: bfloat16 on a CUDA device with "
                "bf16, float32 elsewhere)."})

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit


def check_quant_args(quant: QuantArguments, peft_args, output_dir: str | None, resume) -> None:
    """Flag combinations and the bitsandbytes install, before any model loads; ``output_dir`` None: the run keeps
    no QPiSSA base (fish-tune mask builds it in a temporary folder)."""
    init = peft_args.init_lora_weights.lower()
    if init == "loftq" and not quant.load_in_4bit:
        raise CommandError("--init_lora_weights loftq needs --load_in_4bit (LoftQ fits the adapter to a 4-bit "
                           "base's quantization error)")
    if not quant.quantized:
        return
    flag = "--load_in_4bit" if quant.load_in_4bit else "--load_in_8bit"
    if quant.load_in_4bit and quant.load_in_8bit:
        raise CommandError("give one of --load_in_4bit or --load_in_8bit")
    if peft_args.peft not in ("lora", "dora"):
        raise CommandError(f"{flag} works with --peft lora or dora (the quantized base stays frozen; peft "
                           f"quantizes no other tuner's base layers here), not {peft_args.peft!r}")
    if quant.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise CommandError(f"--bnb_4bit_quant_type {quant.bnb_4bit_quant_type!r} is unknown; use nf4 or fp4")
    if quant.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
        raise CommandError(f"--bnb_4bit_compute_dtype {quant.bnb_4bit_compute_dtype!r} is unknown; use one of "
                           f"{', '.join(COMPUTE_DTYPES)}")
    if init == "loftq" and quant.load_in_8bit:
        raise CommandError("--init_lora_weights loftq is for --load_in_4bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CommandError(f"{flag} needs bitsandbytes: pip install 'fish-tuning[qlora]'") from None
    residual = Path(output_dir) / RESIDUAL_DIR if output_dir is not None else None
    if init.startswith("pissa") and residual is not None and residual.exists() and not resume:
        raise CommandError(f"{residual} holds the QPiSSA base of an earlier run; resume it "
                           "(--resume_from_checkpoint) or choose a new --output_dir")


def check_quant_task(quant: QuantArguments, task: str) -> None:
    if quant.quantized and task != "causal-lm":
        raise CommandError("--load_in_4bit / --load_in_8bit are for causal-LM SFT (a quantized classifier's head "
                           "would be quantized too); train classifiers in full precision")


def quantization_config(quant: QuantArguments):
    from ..methods.quantized import bnb_4bit_config

    if quant.load_in_8bit:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = None if quant.bnb_4bit_compute_dtype == "auto" else quant.bnb_4bit_compute_dtype
    return bnb_4bit_config(quant.bnb_4bit_quant_type, dtype, quant.use_bnb_nested_quant)


def build_peft_model(quant: QuantArguments | None, auto_class, path: str, lora_config, output_dir: str,
                     init: str = "pissa"):
    """The peft model on the full-precision base, or on the quantized one: QPiSSA (``init`` pissa*), LoftQ
    (``init="loftq"``; ``lora_config`` then has peft's plain init) or the plain init."""
    from peft import get_peft_model

    if quant is None or not quant.quantized:
        return get_peft_model(auto_class.from_pretrained(path), lora_config)
    from ..methods.quantized import _plain_init, load_quantized, loftq, qpissa

    bnb = quantization_config(quant)
    init = init.lower()
    residual = os.path.join(output_dir, RESIDUAL_DIR)
    if init.startswith("pissa"):
        if os.path.isdir(residual):  # resuming: the checkpoint restores the adapter; the base is this residual
            return get_peft_model(load_quantized(residual, bnb, auto_class=auto_class), _plain_init(lora_config))
        return qpissa(path, lora_config, bnb, residual_dir=residual, auto_class=auto_class)
    model = get_peft_model(load_quantized(path, bnb, auto_class=auto_class), lora_config)
    return loftq(model, path) if init == "loftq" else model
