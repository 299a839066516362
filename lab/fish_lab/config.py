"""`fish-tune compare` configuration: YAML + ``key=value`` overrides, validated before any training starts."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from fish_tuning.selection import STRATEGIES as MASK_STRATEGIES

from .tasks import GLUE_TASKS, task_spec

MODES = ("fixed_layers", "fixed_proportion")
RUN_STRATEGIES = ("original", *MASK_STRATEGIES)  # every selection strategy of fish_tuning.mask, plus the dense baseline
DEFAULT_STRATEGIES = ("original", "fish", "rand", "rev")
OPTIMIZERS = ("adamw", "adafish")
TASKS = (*GLUE_TASKS, "gsm8k")


@dataclass
class TrainConfig:
    """CPU-scale training length (the paper trains for more epochs on full train sets; see BENCHMARKS.md)."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    max_length: int = 128
    train_examples: int | None = 1000  # random subset per task (None: the whole split)
    dev_examples: int | None = 500  # first rows of the dev (GSM8K: test) split
    # a seeded split of this many train examples is scored instead of dev (for choosing lr etc. without seeing dev);
    # it is taken out of train before the train_examples cap. GLUE tasks only.
    holdout_examples: int | None = None
    group_by_length: bool = False  # batch GLUE examples of similar length together (less padding, same examples)
    fisher_samples: int | None = None  # None: the paper's 128 (256 for generation)
    optimizer: str = "adamw"
    optimizer_kwargs: dict = field(default_factory=dict)
    max_new_tokens: int = 96  # GSM8K greedy generation
    eval_before: bool = False  # also score the dev set before training (the demo shows before -> after)


@dataclass
class CompareConfig:
    """One study: every task x method x budget x seed x strategy is one run (one line of results.jsonl)."""

    model: str = "minilm"
    tasks: list[str] = field(default_factory=lambda: ["sst2"])
    methods: list[str] = field(default_factory=lambda: ["lora"])
    mode: str = "fixed_layers"
    # fixed_layers: fractions of the PEFT entries kept; fixed_proportion: top-N layers of the Original baseline
    budgets: list[float] = field(default_factory=lambda: [0.05])
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rank: int | None = None  # None: 16 (fixed_layers) or 1 (fixed_proportion), as in the paper
    fish_layers: int = 5  # fixed_proportion: FISH / rand / rev adapt the top this-many layers
    fish_rank: int | None = None  # fixed_proportion: rank of the FISH / rand / rev pool (None: the same as rank)
    select_kwargs: dict = field(default_factory=dict)  # per strategy: extra select_mask arguments, {name: {k: v}}
    # named selection arms usable in `strategies`: {name: {strategy, allocation, score, warmup_steps}} (arms.py)
    arms: dict = field(default_factory=dict)
    average_excludes: list[str] = field(default_factory=list)  # tasks shown in reports but left out of averages
    # learning rate per budget ({1: 0.01, 6: 0.003}); every strategy of that budget (Original included) uses it,
    # budgets not named use train.lr. For budgets whose small trainable count wants a larger rate.
    lr_by_budget: dict = field(default_factory=dict)
    # learning rate per strategy / arm, each at its own best rate: {fish: 0.003} or {fish: {1: 0.01, 6: 0.003}};
    # it wins over lr_by_budget and train.lr
    lr_by_arm: dict = field(default_factory=dict)
    target_modules: list[str] | None = None  # None: attention q/k/v of BERT-style or LLaMA-style models
    data_dir: str | None = None
    out_dir: str = "results/compare"
    name: str = "compare"
    progress: bool = True
    show_masks: bool = False  # print the per-layer summary of each FISH mask
    device: str = "cpu"  # where models train ("cuda", "cuda:1"); tokenised batches are moved there once
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def lora_rank(self) -> int:
        """Rank of the Original runs (and of every run in fixed_layers mode)."""
        return self.rank if self.rank is not None else (16 if self.mode == "fixed_layers" else 1)

    def lr_for(self, budget: float, strategy: str | None = None) -> float:
        """Learning rate of ``strategy``'s runs at ``budget`` (the dense Original of fixed_layers mode has budget
        1.0): ``lr_by_arm``, else ``lr_by_budget``, else ``train.lr``."""
        by_arm = self.lr_by_arm.get(strategy)
        if isinstance(by_arm, dict) and budget in by_arm:
            return by_arm[budget]
        if by_arm is not None and not isinstance(by_arm, dict):
            return by_arm
        return self.lr_by_budget.get(budget, self.train.lr)

    @property
    def pool_rank(self) -> int:
        """Rank of the PEFT pool FISH / rand / rev select from."""
        return self.fish_rank if self.fish_rank is not None and self.mode == "fixed_proportion" else self.lora_rank

    def to_dict(self) -> dict:
        return asdict(self)


def _parse_value(item: str, text: str):
    """``key=value`` values are YAML scalars or lists: ``seeds=[0]``, ``train.epochs=1``, ``data_dir=null``."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: {text!r} is not a YAML value ({_yaml_problem(err)}); "
                         "write lists as seeds=[0,1] and quote strings with spaces") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or type(err).__name__}{where}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. seeds=[0] or train.epochs=1)")
        key, value = item.split("=", 1)
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(f"override {item!r} has an empty field name; write key=value (e.g. train.epochs=1)")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(item, value)
    return out


def _build(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"config field {where}{unknown[0]!r} is unknown; valid fields: {sorted(known)}")
    kwargs = dict(raw)
    if cls is CompareConfig and "train" in kwargs:
        if not isinstance(kwargs["train"], dict):
            raise ValueError("config field 'train' must be a mapping (e.g. train: {epochs: 1})")
        kwargs["train"] = _build(TrainConfig, kwargs["train"], "train.")
    return cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                raw: dict | None = None) -> CompareConfig:
    """Read ``path`` (YAML), apply ``overrides``, validate; raises ValueError naming the bad field."""
    if raw is None:
        if path is None:
            raise ValueError("give a config file or a raw dict")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} not found (presets are in configs/: demo.yaml, glue6.yaml, ...)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"config file {p} is not valid YAML ({_yaml_problem(err)}); fix it or start from a "
                             "preset in configs/") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {p} is not UTF-8 text; give a YAML file") from None
        if raw is None:
            raise ValueError(f"config file {p} is empty; give at least the tasks to run, or start from a preset "
                             "in configs/ (demo.yaml, glue6.yaml, ...)")
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a YAML mapping of fields")
    cfg = _build(CompareConfig, apply_overrides(raw, overrides or []), "")
    validate(cfg)
    return cfg


def _as_list(cfg: CompareConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, list):
        setattr(cfg, name, [value])
    if not getattr(cfg, name):
        raise ValueError(f"config field {name!r} is empty; give at least one value")


def validate(cfg: CompareConfig) -> None:
    """Everything checkable without a model: names, ranges and files (model-dependent checks run in the runner
    before the first training step)."""
    from .builders import METHODS  # late: builders imports peft

    for name in ("tasks", "methods", "budgets", "strategies", "seeds"):
        _as_list(cfg, name)
    cfg.tasks = [t.lower() for t in cfg.tasks]
    for task in cfg.tasks:
        if task != "gsm8k":
            try:
                task_spec(task)
            except ValueError:
                raise ValueError(f"config field 'tasks': unknown task {task!r}; choose from {list(TASKS)}") from None
    cfg.tasks = [t if t == "gsm8k" else task_spec(t).name for t in cfg.tasks]
    if "gsm8k" in cfg.tasks and len(cfg.tasks) > 1:
        raise ValueError("config field 'tasks': gsm8k needs a causal LM; put it in its own config (see gsm8k.yaml)")
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"config field 'methods': unknown method {m!r}; available: {sorted(METHODS)}")
    if cfg.mode not in MODES:
        raise ValueError(f"config field 'mode' must be one of {MODES}, got {cfg.mode!r}")
    from .arms import check_arms

    check_arms(cfg)
    for s in cfg.strategies:
        if s not in RUN_STRATEGIES and s not in cfg.arms:
            raise ValueError(f"config field 'strategies': unknown strategy {s!r}; choose from {RUN_STRATEGIES} or "
                             f"an arm defined under 'arms' ({sorted(cfg.arms)})")
    for b in cfg.budgets:
        if cfg.mode == "fixed_layers" and not (isinstance(b, (int, float)) and 0 < b <= 1):
            raise ValueError(f"config field 'budgets': in fixed_layers mode each budget is a keep fraction in (0, 1], "
                             f"got {b!r} (write 5% as 0.05)")
        if cfg.mode == "fixed_proportion":
            if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
                raise ValueError(f"config field 'budgets': in fixed_proportion mode each budget is the number of top "
                                 f"layers of the Original baseline (an integer >= 1), got {b!r}")
            if b > cfg.fish_layers:
                raise ValueError(f"config field 'budgets': Original on {b} layers has a larger budget than the FISH "
                                 f"pool of fish_layers={cfg.fish_layers}; lower the budget or raise fish_layers")
    for name in ("rank", "fish_rank"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"config field {name!r} must be a positive integer or null, got {v!r}")
    if cfg.fish_rank is not None and cfg.mode != "fixed_proportion":
        raise ValueError("config field 'fish_rank' is only used in fixed_proportion mode; remove it or set "
                         "mode: fixed_proportion")
    _check_select_kwargs(cfg)
    if not isinstance(cfg.lr_by_budget, dict):
        raise ValueError(f"config field 'lr_by_budget' must map a budget to a learning rate, got {cfg.lr_by_budget!r}")
    for b, lr in cfg.lr_by_budget.items():
        if b not in cfg.budgets:
            raise ValueError(f"config field 'lr_by_budget': {b!r} is not one of the budgets {cfg.budgets}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
            raise ValueError(f"config field 'lr_by_budget': the rate for budget {b!r} must be a positive number, "
                             f"got {lr!r}")
    if not isinstance(cfg.average_excludes, list) or not all(isinstance(t, str) for t in cfg.average_excludes):
        raise ValueError(f"config field 'average_excludes' must be a list of task names, got {cfg.average_excludes!r}")
    try:
        cfg.average_excludes = [task_spec(t).name for t in cfg.average_excludes]
    except ValueError as err:
        raise ValueError(f"config field 'average_excludes': {err}") from None
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in cfg.seeds):
        raise ValueError(f"config field 'seeds' must be a list of integers >= 0 (random.Random(-1) is Random(1)), "
                         f"got {cfg.seeds!r}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"config field 'seeds' repeats a seed: {cfg.seeds!r}")
    _check_device(cfg.device)
    t = cfg.train
    for name in ("epochs", "batch_size", "max_length", "max_new_tokens"):
        v = getattr(t, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"config field 'train.{name}' must be a positive integer, got {v!r}")
    for name in ("train_examples", "dev_examples", "fisher_samples", "holdout_examples"):
        v = getattr(t, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"config field 'train.{name}' must be a positive integer or null, got {v!r}")
    if not isinstance(t.lr, (int, float)) or t.lr <= 0:
        raise ValueError(f"config field 'train.lr' must be a positive number, got {t.lr!r}")
    if not isinstance(t.weight_decay, (int, float)) or isinstance(t.weight_decay, bool) or t.weight_decay < 0:
        raise ValueError(f"config field 'train.weight_decay' must be a number >= 0, got {t.weight_decay!r}")
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"config field 'train.optimizer' must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.optimizer == "adafish":
        try:
            importlib.import_module("fish_tuning.adafish")
        except ImportError as err:
            raise ValueError("config field 'train.optimizer': adafish needs the fish_tuning.adafish module "
                             f"(make_adafish), which is not available here ({err}); use optimizer: adamw") from err
    if not isinstance(t.group_by_length, bool):
        raise ValueError(f"config field 'train.group_by_length' must be true or false, got {t.group_by_length!r}")
    if t.holdout_examples is not None and "gsm8k" in cfg.tasks:
        raise ValueError("config field 'train.holdout_examples' is for GLUE tasks; set it to null for gsm8k")
    _check_optimizer_kwargs(cfg)
    # data and model names are checked here too, so a typo never costs a training run
    from fish_tuning.models import resolve_model

    from .tasks import local_data_dir

    try:
        data = local_data_dir(cfg.data_dir)
    except FileNotFoundError as err:
        raise ValueError(f"config field 'data_dir': {err}") from None
    if data is None and importlib.util.find_spec("datasets") is None:
        raise ValueError("config field 'data_dir': no local data folder found (../shared/data) and `datasets` is "
                         "not installed for the hub: set data_dir / --data-dir, or pip install 'fish-tuning[hub]'")
    for task in cfg.tasks if data is not None else []:
        folder = data / ("gsm8k" if task == "gsm8k" else f"glue/{GLUE_TASKS[task].folder}")
        if not folder.is_dir():
            raise ValueError(f"config field 'data_dir': {folder} is missing (needed by task {task!r})")
    if cfg.model.lower() != "smollm2":  # smollm2 is converted on first use (~20 s): left to the runner
        try:
            path = resolve_model(cfg.model)
        except (ValueError, ImportError) as err:
            raise ValueError(f"config field 'model': {err}") from None
        _check_loadable(cfg.model, path)


def _check_device(device: object) -> None:
    import torch

    try:
        dev = torch.device(device) if isinstance(device, str) else None
    except RuntimeError:
        dev = None
    if dev is None:
        raise ValueError(f"config field 'device' must be a torch device name such as cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config field 'device': {device!r} but this machine has no CUDA GPU; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"config field 'device': {device!r} but this machine has {torch.cuda.device_count()} GPU(s)")


def _check_select_kwargs(cfg: CompareConfig) -> None:
    """``select_kwargs: {fish_balanced: {alpha: 0.5}}``: each key a masked strategy of the study, each value a mapping
    of arguments that ``fish_tuning.select_mask`` accepts."""
    from fish_tuning.selection import select_mask

    sk = cfg.select_kwargs
    if not isinstance(sk, dict):
        raise ValueError(f"config field 'select_kwargs' must map a strategy to its arguments, got {sk!r}")
    params = inspect.signature(select_mask).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    fixed = {"scores", "keep", "budget", "strategy", "seed", "always_train"}
    for strategy, kwargs in sk.items():
        if strategy not in cfg.strategies or strategy == "original":
            raise ValueError(f"config field 'select_kwargs': {strategy!r} is not a masked strategy of this study "
                             f"(strategies: {cfg.strategies})")
        if not isinstance(kwargs, dict):
            raise ValueError(f"config field 'select_kwargs.{strategy}' must be a mapping, e.g. {{alpha: 0.5}}")
        for key in kwargs:
            if key in fixed or (not open_kwargs and key not in params):
                raise ValueError(f"config field 'select_kwargs.{strategy}': {key!r} is not a select_mask argument "
                                 f"the config may set (accepted: {sorted(set(params) - fixed)})")


def _check_loadable(name: str, path: str) -> None:
    """The model's config must load (local folder, or the HF cache / hub): a cheap stand-in for the model load."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"config field 'model': cannot load {name!r} ({first}); offline, use an alias such as "
                         "'minilm' or a local folder holding config.json and the weights") from None


def _optimizer_signatures(cfg: CompareConfig) -> list[tuple[str, object]]:
    """The optimizer constructors this study will call (masked and / or dense runs) and their names."""
    import torch

    if cfg.train.optimizer == "adafish":
        from fish_tuning.adafish import AdaFish

        return [("AdaFish", AdaFish.__init__)]
    from fish_tuning.optim import make_optimizer

    out = []
    if any(s != "original" for s in cfg.strategies):
        out.append(("fish_tuning.make_optimizer (masked runs)", make_optimizer))
    if "original" in cfg.strategies:
        out.append(("torch.optim.AdamW (dense runs)", torch.optim.AdamW.__init__))
    return out


def _check_optimizer_kwargs(cfg: CompareConfig) -> None:
    kwargs = cfg.train.optimizer_kwargs
    if not isinstance(kwargs, dict):
        raise ValueError(f"config field 'train.optimizer_kwargs' must be a mapping (e.g. {{betas: [0.9, 0.98]}}), "
                         f"got {kwargs!r}")
    for key in kwargs:
        if key in ("lr", "weight_decay"):
            raise ValueError(f"config field 'train.optimizer_kwargs': set {key!r} as train.{key}, not here")
    for label, fn in _optimizer_signatures(cfg):
        params = inspect.signature(fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        accepted = sorted(n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                       inspect.Parameter.KEYWORD_ONLY)
                          and n not in ("self", "params", "model", "mask", "model_or_params", "lr", "weight_decay"))
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"config field 'train.optimizer_kwargs': {unknown[0]!r} is not accepted by {label}; "
                             f"it accepts {accepted}")
