"""What `fish-tune train` and `fish-tune mask` share: their flags, the checks done before any model loads, and
building the (model, tokenised data, collator) a ``Trainer`` / ``SFTTrainer`` needs.

Flags follow ``trl sft`` / the transformers example scripts (``--model_name_or_path``, ``--dataset_name`` or
``--train_file``, ``--text_column`` ...), parsed with ``transformers.HfArgumentParser`` so every
``TrainingArguments`` flag works and ``--config file.yaml`` supplies defaults that the command line overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FishConfig

PEFT_METHODS = ("lora", "dora", "ia3", "prefix")
TASKS = ("auto", "classification", "regression", "causal-lm")
EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
LORA_INITS = ("pissa", "default", "gaussian", "olora", "false", "loftq")  # loftq: --load_in_4bit only
TEXT_NAMES = ("text", "sentence", "sentence1", "question", "content")
LABEL_NAMES = ("label", "labels", "score")


class CommandError(ValueError):
    """A user error: printed as one ``fish-tune: error: ...`` line, exit status 2."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={  # required, but may come from --config
        "help": "Required. Local folder, hub id, or an offline alias (minilm, smollm2)."})
    task: str = field(default="auto", metadata={
        "help": "auto (from the data: prompt/completion or messages -> causal-lm; a label column -> classification, "
                "or regression when the labels are non-integer numbers), classification, regression, causal-lm."})
    max_length: int = field(default=256, metadata={"help": "Tokens per example (longer ones are truncated)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "A hub dataset id (needs the datasets package and internet). Or give --train_file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's config name."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local train data: .csv, .tsv, .json, .jsonl or .parquet."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation data (same formats)."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    validation_split: str | None = field(default=None, metadata={
        "help": "Split of --dataset_name to evaluate on (default: validation, if the dataset has it)."})
    text_column: str | None = field(default=None, metadata={
        "help": f"Input text column (default: the first of {', '.join(TEXT_NAMES)} that exists)."})
    text_pair_column: str | None = field(default=None, metadata={
        "help": "Second text column for sentence-pair tasks (e.g. sentence2)."})
    label_column: str | None = field(default=None, metadata={
        "help": f"Label column (default: the first of {', '.join(LABEL_NAMES)} that exists). Integer or string "
                "labels: classification; other numbers: regression."})
    prompt_column: str = field(default="prompt", metadata={"help": "SFT: prompt column (with --completion_column)."})
    completion_column: str = field(default="completion", metadata={"help": "SFT: completion column."})
    messages_column: str = field(default="messages", metadata={"help": "SFT: chat column (list of role/content)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N train rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})


@dataclass
class PeftArguments:
    peft: str = field(default="lora", metadata={
        "help": f"PEFT method whose new parameters FISH selects from: {', '.join(PEFT_METHODS)}, or any other peft "
                "tuner by its type name (loha, lokr, vera, oft, boft, adalora, fourierft, ...; extra config "
                "arguments through --peft_kwargs)."})
    peft_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object of extra arguments for the peft config, e.g. '{\"n_frequency\": 64}'."})
    lora_r: int = field(default=8, metadata={"help": "LoRA / DoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA / DoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA / DoRA dropout."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt (default: peft's choice for the architecture, e.g. query value)."})
    init_lora_weights: str = field(default="pissa", metadata={
        "help": f"LoRA init: {', '.join(LORA_INITS)}. pissa (the paper's): with 'default' B = 0, so every entry "
                "of A has zero Fisher and FISH can never pick it."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix-Tuning: virtual tokens."})


# field -> flag: TrainingArguments has --seed / --warmup_steps; --fisher_method is the flag users already type
_RENAMED = {"seed": "fish_seed", "warmup_steps": "fish_warmup_steps", "fisher_engine": "fisher_method"}


def _fish_arguments() -> type:
    """FishConfig's fields as flags; ``seed`` / ``warmup_steps`` become ``--fish_seed`` / ``--fish_warmup_steps``
    (``--seed`` and ``--warmup_steps``, the LR warm-up, are TrainingArguments')."""
    hints = typing.get_type_hints(FishConfig)
    out = []
    for f in dataclasses.fields(FishConfig):
        name = _RENAMED.get(f.name, f.name)
        out.append((name, hints[f.name], field(default=f.default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("FishArguments", out)


FishArguments = _fish_arguments()


def fish_config(fish: Any) -> FishConfig:
    """Validate the FISH flags into a FishConfig; errors name the flags."""
    values = dataclasses.asdict(fish)
    for plain, flag in _RENAMED.items():
        values[plain] = values.pop(flag)
    try:
        config = FishConfig(**values)
        config.require_budget()
    except (TypeError, ValueError) as err:
        raise CommandError(str(err).replace("keep=", "--keep").replace("budget=", "--budget")
                           .replace("fisher_engine", "--fisher_method")) from None
    return config


class Parser:
    """HfArgumentParser with one-line errors and ``--config file.yaml`` as defaults under the command line."""

    def __init__(self, prog: str, description: str, dataclass_types: list[type], defaults: dict | None = None):
        from transformers import HfArgumentParser

        class _Hf(HfArgumentParser):
            def error(self, message: str) -> typing.NoReturn:  # argparse would print the usage block first
                print(f"fish-tune: error: {message} (see {prog} --help)", file=sys.stderr)
                raise SystemExit(2)

        self.types = dataclass_types
        self.parser = _Hf(dataclass_types, prog=prog, description=description)
        self.parser.add_argument("--config", default=None, help="YAML file of flag values; command-line flags win.")
        if defaults:
            self.parser.set_defaults(**defaults)

    def parse(self, argv: list[str]) -> tuple:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        known, _ = pre.parse_known_args(argv)
        if known.config:
            self.parser.set_defaults(**read_yaml(known.config, self.parser))
        out = self.parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if out[-1]:
            self.parser.error(f"unrecognized arguments: {' '.join(out[-1])}")
        return tuple(out[: len(self.types)])  # then come a Namespace holding --config, and the remaining strings


def read_yaml(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        import yaml
    except ImportError:
        raise CommandError("--config needs pyyaml: pip install 'fish-tuning[cli]'") from None
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"--config file {path} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise CommandError(f"--config file {path} is not valid YAML ({type(err).__name__}); fix it") from None
    if not isinstance(raw, dict):
        raise CommandError(f"--config file {path} must hold a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CommandError(f"--config file {path}: unknown field {unknown[0]!r}; use the flag names without "
                           "dashes (e.g. learning_rate: 5.0e-4)")
    return raw


# --------------------------------------------------------------------------- data
def check_model_args(model: ModelArguments) -> None:
    if model.max_length < 1:
        raise CommandError(f"--max_length must be a positive number of tokens, got {model.max_length}")


def check_data_args(data: DataArguments) -> None:
    """File names, formats and the one-of rules, before anything is read."""
    if (data.dataset_name is None) == (data.train_file is None):
        raise CommandError("give exactly one of --dataset_name (hub id) or --train_file (local .csv/.tsv/.json/"
                           ".jsonl/.parquet)")
    if data.validation_file and not data.train_file:
        raise CommandError("--validation_file goes with --train_file; with --dataset_name use --validation_split")
    for flag, path in (("--train_file", data.train_file), ("--validation_file", data.validation_file)):
        if path is None:
            continue
        if Path(path).suffix.lower() not in EXTENSIONS:
            raise CommandError(f"{flag} {path}: unsupported format; use one of {', '.join(EXTENSIONS)}")
        if not Path(path).is_file():
            raise CommandError(f"{flag} {path} not found")


def load_data(data: DataArguments) -> dict:
    """{"train": Dataset, "validation": Dataset | None} through ``datasets.load_dataset``."""
    check_data_args(data)
    try:
        import datasets
    except ImportError:
        raise CommandError("reading data needs the datasets package: pip install 'fish-tuning[cli]'") from None
    datasets.disable_progress_bars()
    if data.train_file:
        suffix = Path(data.train_file).suffix.lower()
        if data.validation_file and Path(data.validation_file).suffix.lower() != suffix:
            raise CommandError("--train_file and --validation_file must have the same format")
        return {"train": read_file("--train_file", data.train_file),
                "validation": read_file("--validation_file", data.validation_file) if data.validation_file else None}
    try:
        loaded = datasets.load_dataset(data.dataset_name, data.dataset_config_name)
    except Exception as err:
        raise CommandError(f"could not load --dataset_name {data.dataset_name}: {str(err).splitlines()[0]}") from None
    if data.train_split not in loaded:
        raise CommandError(f"--train_split {data.train_split!r} is not in {data.dataset_name}; splits: "
                           f"{', '.join(loaded)}")
    val = data.validation_split or ("validation" if "validation" in loaded else None)
    if val is not None and val not in loaded:
        raise CommandError(f"--validation_split {val!r} is not in {data.dataset_name}; splits: {', '.join(loaded)}")
    return {"train": loaded[data.train_split], "validation": loaded[val] if val else None}


def read_file(flag: str, path: str):
    """One local data file as a Dataset; an unreadable one is named with its flag and the reader's reason."""
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise CommandError(f"{flag} {path}: unsupported format; use one of {', '.join(EXTENSIONS)}")
    if not Path(path).is_file():
        raise CommandError(f"{flag} {path} not found")
    # TSV has no quoting convention (GLUE's files hold bare quotes inside sentences): read with QUOTE_NONE
    kwargs = {"delimiter": "\t", "quoting": 3} if suffix == ".tsv" else {}
    import logging

    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # its reader logs the parser's traceback before raising; the one line says it
    try:
        return datasets.load_dataset(EXTENSIONS[suffix], data_files={"data": path}, **kwargs)["data"]
    except Exception as err:  # datasets raises many types for malformed files; the cause is often chained
        raise CommandError(f"could not read {flag} {path}: {_reason(err)}") from None
    finally:
        log.setLevel(level)


def _reason(err: BaseException) -> str:
    """The innermost cause's first line (datasets wraps the parser's error in a generic one)."""
    seen = err
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = (str(seen).strip().splitlines() or [""])[0]
    outer = (str(err).strip().splitlines() or [""])[0]
    if seen is err or not text:
        return outer or type(err).__name__
    return f"{outer} ({type(seen).__name__}: {text})" if outer else f"{type(seen).__name__}: {text}"


# --------------------------------------------------------------------------- peft
def _other_tuners() -> dict[str, type]:
    """peft tuner type name (lower case) -> its config class, for every tuner beside the named shortcuts."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(k, "value", k)).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()
            if str(getattr(k, "value", k)).lower() not in ("lora", "ia3", "prefix_tuning")}


def _peft_kwargs(peft: PeftArguments) -> dict:
    if not peft.peft_kwargs:
        return {}
    try:
        value = json.loads(peft.peft_kwargs)
    except json.JSONDecodeError as err:
        raise CommandError(f"--peft_kwargs is not valid JSON ({err.msg}); write e.g. '{{\"r\": 4}}'") from None
    if not isinstance(value, dict):
        raise CommandError("--peft_kwargs must be a JSON object of config arguments, e.g. '{\"r\": 4}'")
    return value


def check_peft_args(peft: PeftArguments) -> None:
    if peft.peft not in PEFT_METHODS and peft.peft not in _other_tuners():
        raise CommandError(f"--peft {peft.peft!r} is not supported; use one of {', '.join(PEFT_METHODS)} or a peft "
                           f"tuner type ({', '.join(sorted(_other_tuners())[:8])}, ...)")
    _peft_kwargs(peft)
    init = peft.init_lora_weights.lower()
    if init not in LORA_INITS and not init.startswith("pissa_niter_"):
        raise CommandError(f"--init_lora_weights {peft.init_lora_weights!r} is unknown; use one of "
                           f"{', '.join(LORA_INITS)} (or pissa_niter_N)")
    if peft.lora_r < 1 or peft.num_virtual_tokens < 1:
        raise CommandError("--lora_r and --num_virtual_tokens must be positive")


def peft_config(peft: PeftArguments, task_type: str):
    import inspect

    from peft import IA3Config, LoraConfig, PrefixTuningConfig

    if peft.peft not in PEFT_METHODS:  # any other peft tuner: its config with the shared flags it accepts
        cls = _other_tuners()[peft.peft]
        accepted = inspect.signature(cls).parameters
        kw = {"task_type": task_type}
        if "target_modules" in accepted and peft.target_modules:
            kw["target_modules"] = peft.target_modules
        if "r" in accepted:
            kw["r"] = peft.lora_r
        if "num_virtual_tokens" in accepted:
            kw["num_virtual_tokens"] = peft.num_virtual_tokens
        kw.update(_peft_kwargs(peft))
        try:
            return cls(**kw)
        except (TypeError, ValueError) as err:
            raise CommandError(f"--peft {peft.peft}: {cls.__name__} refused its arguments ({err}); set them "
                               "with --peft_kwargs") from None
    if peft.peft in ("lora", "dora"):
        init = peft.init_lora_weights.lower()
        init = True if init in ("default", "loftq") else False if init == "false" else init  # loftq: quant_args
        return LoraConfig(r=peft.lora_r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                          target_modules=peft.target_modules, init_lora_weights=init,
                          use_dora=peft.peft == "dora", task_type=task_type)
    if peft.peft == "ia3":
        return IA3Config(target_modules=peft.target_modules, task_type=task_type,
                         feedforward_modules=[] if peft.target_modules else None)
    return PrefixTuningConfig(num_virtual_tokens=peft.num_virtual_tokens, task_type=task_type)


def resolve_model_path(name: str | None) -> str:
    """The model's folder or hub id; its config is read here so a wrong name fails before any weights load."""
    if not name:
        raise CommandError("--model_name_or_path is required (a local folder, hub id, or minilm / smollm2)")
    from transformers import AutoConfig

    from ..models import resolve_model

    try:
        path = resolve_model(name)
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, ImportError) as err:
        hint = "" if "/" in name else " (offline aliases: minilm, smollm2)"
        raise CommandError(f"--model_name_or_path {name}: {str(err).splitlines()[0]}{hint}") from None
    return path


def check_output_dir(path: str | os.PathLike) -> None:
    """Writable before the model loads, so a long run never dies at the save; creates nothing (a failed run
    leaves no empty folder behind)."""
    target = Path(path).absolute()
    existing = next((p for p in (target, *target.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if existing is not None and not existing.is_dir() else "is not writable"
        raise CommandError(f"--output_dir {path}: {existing} {what}; choose another folder")
