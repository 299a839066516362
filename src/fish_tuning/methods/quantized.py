"""A 4-bit (bitsandbytes) base model with a LoRA adapter whose factors are both non-zero, so FISH can rank A and B.

QLoRA's usual init (B = 0) gives every entry of A zero Fisher. peft refuses PiSSA on a quantized base, so the two
inits that work on a 4-bit base are built here:

- **QPiSSA** (PiSSA's authors; peft ``examples/pissa_finetuning``): PiSSA on the full-precision weights
  (A, B = the top-r singular directions), then the *residual* W - BA is quantized. The residual has no large
  singular values left, so its 4-bit error is smaller than that of W itself. The adapter applies to that residual
  base: keep the residual folder (``residual_dir``) to load the adapter again.
- **LoftQ** (one step): the base is W quantized as usual; A, B are the top-r SVD of the quantization error
  W - deq(Q(W)). The adapter applies to the ordinary 4-bit base.

Neither changes anything in the FISH core: candidates are the adapter's A / B (a ``Linear4bit`` weight is
never a candidate: it does not require grad), and the hooked per-sample rule for LoRA's ``nn.Linear`` factors
stays on.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compat import keep_cpu_4bit_trainable

QLORA_EXTRA = "pip install 'fish-tuning[qlora]'"
PISSA_INITS = ("pissa",)


def require_bitsandbytes() -> Any:
    """The bitsandbytes module, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError(f"a 4-bit / 8-bit base needs bitsandbytes: {QLORA_EXTRA}") from None
    return bitsandbytes


def bnb_4bit_config(quant_type: str = "nf4", compute_dtype: torch.dtype | str | None = None,
                    nested: bool = False):
    """transformers' ``BitsAndBytesConfig`` for a 4-bit base (QLoRA's nf4 by default).

    ``compute_dtype=None`` picks bfloat16 on a CUDA device with bf16 and float32 elsewhere (a CPU's bf16 matmuls
    are slow and the Fisher probe then runs in float32 anyway).
    """
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if compute_dtype is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        compute_dtype = torch.bfloat16 if bf16 else torch.float32
    if isinstance(compute_dtype, str):
        compute_dtype = _dtype(compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=nested)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown compute dtype {name!r}; use float32, bfloat16 or float16")
    return value


def quantized_bits(model: nn.Module) -> int | None:
    """4 or 8 when ``model`` (or the base under a peft model) holds bitsandbytes layers, else None."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            return 4
        if kind == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
            return 8
    return None


def quantization_error(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> float:
    """Relative Frobenius error ||W - deq(Q(W))|| / ||W|| of bitsandbytes' 4-bit round trip of ``weight``."""
    bnb = require_bitsandbytes()
    w = weight.detach().float()
    q, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize)
    deq = bnb.functional.dequantize_4bit(q, state).float()
    return float((w - deq).norm() / w.norm())


def load_quantized(path: str | os.PathLike, quantization_config, auto_class=None, **kwargs) -> nn.Module:
    """``auto_class.from_pretrained(path, quantization_config=...)`` (AutoModelForCausalLM by default), with
    bitsandbytes' CPU inference repacking turned off (:func:`keep_cpu_4bit_trainable`)."""
    require_bitsandbytes()
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    model = auto_class.from_pretrained(os.fspath(path), quantization_config=quantization_config, **kwargs)
    keep_cpu_4bit_trainable(model)
    return model


def _plain_init(lora_config):
    out = copy.deepcopy(lora_config)
    out.init_lora_weights = True  # the factors are written right after; peft refuses PiSSA on a 4-bit base
    return out


def qpissa(base: str | os.PathLike | nn.Module, lora_config, quantization_config, *,
           residual_dir: str | os.PathLike | None = None, auto_class=None, dtype: torch.dtype = torch.float32,
           **load_kwargs) -> nn.Module:
    """QPiSSA: PiSSA on the full-precision base, then the residual base quantized; returns the peft model.

    ``base`` is a model folder / hub id (loaded in ``dtype``) or a full-precision model (its weights become the
    residual: it is modified in place). ``lora_config`` must use ``init_lora_weights="pissa"`` or
    ``"pissa_niter_N"``. The residual model is saved to ``residual_dir`` (written to a temporary folder first,
    then renamed) and loaded from there in 4-bit; without ``residual_dir`` it goes through a temporary folder that
    is removed, so keep ``residual_dir`` if you want to load the trained adapter again later: the adapter applies
    to the residual base, not to the original one.

    Cost: the full-precision model in memory once, one SVD per target matrix (full SVD, or randomised with
    ``pissa_niter_N``), and one save + 4-bit load of the residual model (disk: the model's size in ``dtype``).
    """
    require_bitsandbytes()
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    init = str(lora_config.init_lora_weights).lower()
    if not init.startswith(PISSA_INITS):
        raise ValueError(f"qpissa needs LoraConfig(init_lora_weights='pissa' or 'pissa_niter_N'), got {init!r}")
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    if isinstance(base, nn.Module):
        if quantized_bits(base):
            raise ValueError("qpissa needs the full-precision base (PiSSA runs before quantization); pass its folder "
                             "or the model loaded without quantization_config")
        model = base
    else:
        model = auto_class.from_pretrained(os.fspath(base), dtype=dtype, **load_kwargs)
    peft_model = get_peft_model(model, copy.deepcopy(lora_config))
    factors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    residual = peft_model.unload()  # the LoRA layers go, the base keeps W - scale * B A
    temporary = residual_dir is None
    target = Path(tempfile.mkdtemp(prefix="fish-qpissa-")) if temporary else Path(residual_dir)
    try:
        _save_atomically(residual, target)
        del residual, model, peft_model
        quantized = load_quantized(target, quantization_config, auto_class=auto_class, **load_kwargs)
    finally:
        if temporary:
            shutil.rmtree(target, ignore_errors=True)
    out = get_peft_model(quantized, _plain_init(lora_config))
    result = set_peft_model_state_dict(out, factors)
    if result.unexpected_keys:
        raise RuntimeError(f"qpissa: adapter entries did not map onto the 4-bit model: {result.unexpected_keys[:3]}")
    return out


def _save_atomically(model: nn.Module, target: Path) -> None:
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"residual_dir {target} is not empty; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def loftq(peft_model: nn.Module, model_path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """LoftQ (one step) on a 4-bit peft LoRA model, in place: per LoRA ``Linear4bit``, A and B become the rank-r
    SVD of W - deq(Q(W)), with W read from ``model_path``'s safetensors (the full-precision base).

    peft's ``replace_lora_weights_loftq`` does the same on CUDA / XPU only and leaves out the ``lora_alpha / r``
    scale; this runs on the weights' own device and divides the scale out, so scale * B A is the SVD term.
    """
    bnb = require_bitsandbytes()
    from peft.tuners.lora.bnb import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition, _SafetensorLoader

    loader = _SafetensorLoader(peft_model, os.fspath(model_path))
    prefix, found = "base_model.model.", 0
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit) or adapter_name not in module.lora_A:
                continue
            found += 1
            qweight = module.get_base_layer().weight
            weight = loader.get_tensor(name[len(prefix):] + ".weight").to(qweight.device, torch.float32)
            deq = bnb.functional.dequantize_4bit(qweight.data, qweight.quant_state).float()
            out = _low_rank_decomposition(weight - deq, reduced_rank=module.r[adapter_name])
            root = math.sqrt(module.scaling[adapter_name])
            a, b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            a.copy_((out["R"] / root).to(a.dtype))
            b.copy_((out["L"] / root).to(b.dtype))
    if not found:
        raise ValueError("loftq found no LoRA layer over a bitsandbytes 4-bit Linear; load the base with "
                         "bnb_4bit_config() and add the LoRA adapter first")
    return peft_model


def loftq_model(path: str | os.PathLike, lora_config, quantization_config, *, auto_class=None,
                **load_kwargs) -> nn.Module:
    """The 4-bit base from ``path`` + ``lora_config``'s adapter, initialised by :func:`loftq`."""
    from peft import get_peft_model

    model = load_quantized(path, quantization_config, auto_class=auto_class, **load_kwargs)
    return loftq(get_peft_model(model, _plain_init(lora_config)), path)
