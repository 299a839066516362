"""Checks `fish-tune train` makes before any model weights load, for failures that otherwise come late (after the
model loads, after the Fisher pass, or at the save) or as raw tracebacks: reporters that are not installed, a hub
push without a hub, a checkpoint to resume that is damaged or was trained with other PEFT flags, and a FISH budget
the PEFT candidates cannot hold (counted on a weightless copy of the model)."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

from .common import CommandError

_PIP = {"azure_ml": "azureml-core", "flyte": "flytekit", "comet_ml": "comet_ml"}
_AVAILABLE = {"azure_ml": "azureml", "comet_ml": "comet"}  # is_<x>_available where x differs from the name


def check_reporters(report_to: list[str] | str | None) -> None:
    """Every ``--report_to`` integration is known to transformers and its package is installed."""
    from transformers.integrations import integration_utils as iu

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in iu.INTEGRATION_TO_CALLBACK:
            raise CommandError(f"--report_to {name} is not a transformers integration; use one of "
                               f"{', '.join(sorted(iu.INTEGRATION_TO_CALLBACK))} or none")
        available = getattr(iu, f"is_{_AVAILABLE.get(name, name)}_available", None)
        if available is not None and not available():
            raise CommandError(f"--report_to {name} needs the {name} package, which is not installed: pip install "
                               f"{_PIP.get(name, name)} (or --report_to none)")


def check_push_to_hub(targs: Any) -> None:
    """``--push_to_hub`` needs the hub: refused offline or without a token, before training (not at its end)."""
    if not targs.push_to_hub:
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise CommandError("--push_to_hub with HF_HUB_OFFLINE set: the hub cannot be reached; unset it, or drop "
                           "--push_to_hub and upload the output_dir later (hf upload)")
    if targs.hub_token is None and get_token() is None:
        raise CommandError("--push_to_hub needs a hub login: run `hf auth login` (or give --hub_token), or drop "
                           "--push_to_hub and upload the output_dir later")
    try:
        from huggingface_hub import HfApi

        HfApi().whoami(token=targs.hub_token)
    except Exception as err:  # no network, a bad token: the same for the user
        raise CommandError(f"--push_to_hub: the hub is not reachable or refused the token "
                           f"({type(err).__name__}); check the connection and `hf auth whoami`, or drop "
                           "--push_to_hub") from None


# --------------------------------------------------------------------------- checkpoints
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _damage(folder: Path) -> str | None:
    """What is wrong with a Trainer checkpoint folder (None: it looks whole)."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the save was cut short)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its trainer_state.json is not valid JSON"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    for path in weights:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            size = path.stat().st_size
            with open(path, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + header + end > size or not keys:
                return f"its {path.name} is truncated"
        except Exception:
            return f"its {path.name} is truncated or corrupt"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        path = folder / name
        if path.is_file():
            try:
                with zipfile.ZipFile(path) as z:
                    if z.testzip() is not None:
                        return f"its {name} is corrupt"
            except (zipfile.BadZipFile, OSError, EOFError):
                return f"its {name} is truncated or corrupt"
    return None


def checkpoints(output_dir: str) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, in step order."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def check_resume(resume: str | None, output_dir: str, peft: Any) -> None:
    """The checkpoint ``--resume_from_checkpoint`` names (``true``: the last in output_dir) exists, is whole, and
    was trained with these PEFT flags; a damaged one is named with the last whole one before it."""
    if resume is None or str(resume).lower() == "false":
        return
    if str(resume).lower() == "true":
        found = checkpoints(output_dir)
        if not found:
            raise CommandError(f"--resume_from_checkpoint true: no checkpoint-N folder in {output_dir}; train "
                               "without it, or name a checkpoint folder")
        folder, flag = found[-1], "the last checkpoint"
    else:
        folder, flag = Path(resume), "--resume_from_checkpoint"
        if not folder.is_dir():
            raise CommandError(f"--resume_from_checkpoint {resume}: no such folder")
    problem = _damage(folder)
    if problem is not None:
        match = _CHECKPOINT.match(folder.name)
        step = int(match.group(1)) if match else None  # a folder named otherwise: any checkpoint beside it
        siblings = [p for p in checkpoints(str(folder.parent))
                    if p != folder and (step is None or int(p.name.split("-")[1]) < step)]
        good = next((p for p in reversed(siblings) if _damage(p) is None), None)
        fix = (f"resume from the previous whole one: --resume_from_checkpoint {good}" if good is not None
               else "no earlier whole checkpoint exists: start again")
        raise CommandError(f"{flag} {folder} is damaged: {problem}; {fix} (and delete {folder.name})")
    _check_same_peft(folder, peft)


def _check_same_peft(folder: Path, peft: Any) -> None:
    config_path = next(iter(sorted(folder.glob("**/adapter_config.json"))), None)
    if config_path is None:
        return
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    method = str(saved.get("peft_type", "")).lower()
    wanted = {"lora": "lora", "dora": "lora", "ia3": "ia3", "prefix": "prefix_tuning"}.get(peft.peft, peft.peft)
    if method and method != wanted:
        raise CommandError(f"checkpoint {folder} holds a {method} adapter, not --peft {peft.peft}; resume with the "
                           "flags it was trained with, or train into a new --output_dir")
    checks = []
    if method == "lora":
        checks = [("r", peft.lora_r, "--lora_r"), ("lora_alpha", peft.lora_alpha, "--lora_alpha"),
                  ("use_dora", peft.peft == "dora", "--peft dora")]
    elif method == "prefix_tuning":
        checks = [("num_virtual_tokens", peft.num_virtual_tokens, "--num_virtual_tokens")]
    for key, value, flag in checks:
        if key in saved and saved[key] != value:
            shown = saved[key] if flag != "--peft dora" else ("dora" if saved[key] else "lora")
            raise CommandError(f"checkpoint {folder} was trained with {flag.split()[0]} {shown}, not {value}; resume "
                               f"with {flag.split()[0]} {shown}, or train into a new --output_dir")


# --------------------------------------------------------------------------- the FISH budget
def check_budget(config: Any, path: str, info: dict, peft: Any, num_labels: int) -> None:
    """``--budget`` within the PEFT candidates and ``--exclude`` leaving some, counted on the model built on the
    meta device (shapes, no weights). Skipped silently where that build is not possible; the selection then
    raises the same error later."""
    if config.budget is None and not config.exclude:
        return
    total = _candidate_count(path, info, peft, num_labels, [*(config.exclude or []), *(config.always_train or [])])
    if total is None:
        return
    if total == 0:
        raise CommandError(f"--exclude {' '.join(config.exclude or [])} leaves no PEFT entry to select from; narrow "
                           "the pattern")
    if config.budget is not None and config.budget > total:
        raise CommandError(f"--budget {config.budget:,} is above the {total:,} PEFT candidate entries of this "
                           f"model{' (after --exclude)' if config.exclude else ''}; lower it or use --keep")


def _candidate_count(path: str, info: dict, peft: Any, num_labels: int, exclude) -> int | None:
    try:
        sizes = candidate_sizes(path, info["task"], peft, num_labels)
    except Exception:  # an architecture that does not build on meta: the selection checks it later
        return None
    patterns = list(exclude or [])
    return sum(n for name, n in sizes.items() if not any(re.search(p, name) for p in patterns))


def candidate_sizes(path: str, task: str, peft: Any, num_labels: int | None = None) -> dict[str, int]:
    """Entries of each PEFT candidate, counted on the peft model built on the meta device (shapes, no weights)."""
    import dataclasses
    import warnings

    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..methods import peft_candidates
    from .common import peft_config

    config = AutoConfig.from_pretrained(path)
    if task != "causal-lm" and num_labels is not None:
        config.num_labels = num_labels
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    flags = dataclasses.replace(peft, init_lora_weights="default")  # PiSSA's SVD needs values
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = get_peft_model(auto.from_config(config),
                               peft_config(flags, "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"))
    params = dict(model.named_parameters())
    return {n: params[n].numel() for n in peft_candidates(model)}


# --------------------------------------------------------------------------- outputs that would replace inputs
WRITTEN = ("README.md", "adapter_config.json", "adapter_model.safetensors", "fish_mask.safetensors", "fish_mask.json",
           "train_results.json", "eval_results.json", "test_results.json", "all_results.json", "trainer_state.json",
           "label_config.json", "predict_results.tsv", "training_args.bin")


def check_outputs_spare_inputs(output_dir: str, model_path: str, data_files: dict[str, str | None]) -> None:
    """``output_dir`` is not the model's own folder, and no data file is one of the files a run writes there."""
    out = Path(output_dir).resolve()
    if Path(model_path).is_dir() and Path(model_path).resolve() == out:
        raise CommandError(f"--output_dir {output_dir} is the model's own folder: the run would replace its README.md "
                           "and tokenizer files with the adapter's; choose another --output_dir")
    for flag, path in data_files.items():
        if path and Path(path).resolve().parent == out and Path(path).name in WRITTEN:
            raise CommandError(f"{flag} {path} would be overwritten by the run's own {Path(path).name} in "
                               "--output_dir; move the data or choose another --output_dir")
