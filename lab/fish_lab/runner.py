"""`fish-tune compare`: Original PEFT vs FISH vs rand vs rev at the same trainable budget, resumable.

Budget modes (paper Sec. 4):
- ``fixed_proportion``: Original = PEFT (rank ``rank``, default 1) on the top ``b`` layers, trained densely; FISH /
  rand / rev = the same PEFT at rank ``fish_rank`` (default: ``rank``) on the top ``fish_layers`` layers, masked to
  exactly Original's number of PEFT entries. With ``b`` = every layer and ``fish_rank`` > ``rank`` the Original is
  "the same method over all layers at a lower rank" (LoRA r1 over 6 layers = 1/8 of LoRA r8 over 6 layers).
- ``fixed_layers``: PEFT (rank 16) on every layer; FISH / rand / rev keep a fraction ``b`` of its entries; Original is
  the dense PEFT reference (one run per seed, budget 1.0).
The classification head (``modules_to_save``) trains fully in every run and is counted separately.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fish_tuning import FishMask, always_trainable, peft_candidates
from fish_tuning.files import append_record
from fish_tuning.fisher import GradientMoments, gradient_moments
from fish_tuning.models import load_model
from fish_tuning.optim import make_optimizer as masked_optimizer

from .analysis import mask_record, trivial_baseline
from .arms import Arm, arm_of, jaccard, parse_arm, select_for_arm, warm_up
from .builders import METHODS, PeftSpec, default_targets, layer_indices
from .config import CompareConfig
from .results import check_writable, read_results
from .tasks import GLUE_TASKS, glue_batches, load_glue, load_gsm8k, local_data_dir
from .train import evaluate, train

logger = logging.getLogger("fish_lab")  # progress lines; `python -m fish_lab compare` shows them on stdout
ModelFactory = Callable[[str, int], tuple]  # (task kind "seq-cls" / "causal-lm", num_labels) -> (model, tokenizer)
DATA_SEED = 1234  # the train subset is the same for every seed: seeds vary init, Fisher sample and order


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    mode: str
    budget: float
    strategy: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}|{self.method}|{self.mode}|{self.budget:g}|{self.strategy}|{self.seed}"


def plan_runs(cfg: CompareConfig) -> list[Run]:
    """Every run of the study, seed by seed (a study stopped half-way has every task for its first seeds), with the
    runs that share a model and a Fisher pass adjacent."""
    runs = []
    for seed in cfg.seeds:
        for task in cfg.tasks:
            for method in cfg.methods:
                if cfg.mode == "fixed_layers" and "original" in cfg.strategies:
                    runs.append(Run(task, method, cfg.mode, 1.0, "original", seed))
                for budget in cfg.budgets:
                    for strategy in cfg.strategies:
                        if strategy == "original" and cfg.mode == "fixed_layers":
                            continue
                        runs.append(Run(task, method, cfg.mode, budget, strategy, seed))
    return runs


def setup_fingerprint(cfg: CompareConfig) -> str:
    """Hash of everything that changes a run's result besides its id (a resumed file must match it)."""
    later = {"holdout_examples": None, "group_by_length": False}  # fields added later: left out at their defaults
    train = {k: v for k, v in asdict(cfg.train).items() if not (k in later and v == later[k])}
    keys = {"model": cfg.model, "rank": cfg.lora_rank, "fish_layers": cfg.fish_layers,
            "target_modules": cfg.target_modules, "train": train}
    if cfg.pool_rank != cfg.lora_rank:  # keys added later only when used, so older results files still resume
        keys["fish_rank"] = cfg.pool_rank
    if cfg.select_kwargs:
        keys["select_kwargs"] = cfg.select_kwargs
    if cfg.lr_by_budget:
        keys["lr_by_budget"] = {f"{b:g}": lr for b, lr in sorted(cfg.lr_by_budget.items())}
    # arms and lr_by_arm are not here: each record states its arm and rate, checked on resume (_check_resumed),
    # so a study can gain arms later
    if cfg.device != "cpu":  # float sums differ by device: GPU and CPU runs never share a results file
        keys["device"] = torch.device(cfg.device).type
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]


def results_path(cfg: CompareConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.name}.jsonl"


def optimizer_for_run(model: torch.nn.Module, mask: FishMask | None, cfg: CompareConfig,
                      lr: float | None = None, refresh=None) -> torch.optim.Optimizer:
    """The one place that picks the optimizer: masked runs get SparseAdamW (moments for the k kept entries only).
    ``lr``: this run's learning rate (default ``train.lr``); ``refresh``: a RefreshSchedule (a mask that moves)."""
    t = cfg.train
    lr = t.lr if lr is None else lr
    if t.optimizer == "adafish":
        from fish_tuning.adafish import make_adafish  # optional module; validate() already checked it imports

        return make_adafish(model, mask=mask, lr=lr, weight_decay=t.weight_decay, **t.optimizer_kwargs)
    if mask is not None:
        return masked_optimizer(model, mask, lr=lr, weight_decay=t.weight_decay, refresh=refresh,
                                **t.optimizer_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, **t.optimizer_kwargs)


def _holdout_split(task: str, rows: list[dict], holdout: int, cap: int | None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) from one seeded permutation of the train split; the cap applies to what is left."""
    import random

    if holdout >= len(rows):
        raise ValueError(f"config field 'train.holdout_examples': {holdout} leaves no {task} train examples "
                         f"(train has {len(rows)}); lower it")
    order = random.Random(DATA_SEED).sample(range(len(rows)), len(rows))
    held, rest = [rows[i] for i in order[:holdout]], [rows[i] for i in order[holdout:]]
    if cap is not None and cap < len(rest):
        rest = random.Random(DATA_SEED).sample(rest, cap)
    return rest, held


class _TaskData:
    """Examples and tokenised batches of one task, built once per study."""

    def __init__(self, task: str, cfg: CompareConfig, tokenizer):
        t, data_dir = cfg.train, local_data_dir(cfg.data_dir)  # None: the hub
        self.task, self.generative, self.eval_split = task, task == "gsm8k", "dev"
        if self.generative:
            from .gsm8k import lm_batches

            train_ex = load_gsm8k("train", data_dir)
            if t.train_examples is not None and t.train_examples < len(train_ex):
                import random

                train_ex = random.Random(DATA_SEED).sample(train_ex, t.train_examples)
            self.dev_ex = load_gsm8k("test", data_dir, limit=t.dev_examples)
            self.metric, self.num_labels = "exact_match", 0
            self.fisher_n = t.fisher_samples or 256
            self.make = lambda ex, shuffle=False, seed=0, bs=t.batch_size: lm_batches(
                ex, tokenizer, bs, t.max_length, shuffle=shuffle, seed=seed)
        else:
            spec = GLUE_TASKS[task]
            if t.holdout_examples is None:
                train_ex = load_glue(task, "train", data_dir, limit=t.train_examples, seed=DATA_SEED)
                self.dev_ex = load_glue(task, "dev", data_dir, limit=t.dev_examples)
            else:
                train_ex, self.dev_ex = _holdout_split(task, load_glue(task, "train", data_dir), t.holdout_examples,
                                                       t.train_examples)
            self.eval_split = "dev" if t.holdout_examples is None else "holdout"
            self.metric, self.num_labels = spec.metric, spec.num_labels
            self.fisher_n = t.fisher_samples or 128
            self.make = lambda ex, shuffle=False, seed=0, bs=t.batch_size: glue_batches(
                ex, tokenizer, bs, t.max_length, shuffle=shuffle, seed=seed, group_by_length=t.group_by_length)
        device, make = torch.device(cfg.device), self.make
        if device.type != "cpu":  # tokenised once, moved once: a step then copies nothing from the host
            self.make = lambda *a, **kw: [{k: v.to(device) for k, v in b.items()} for b in make(*a, **kw)]
        if not train_ex or not self.dev_ex:
            raise ValueError(f"task {task}: the train or dev split is empty")
        self.train_ex = train_ex
        self.dev = self.make(self.dev_ex, bs=max(t.batch_size, 32))
        self.trivial = None if self.generative else trivial_baseline(
            self.metric, [e["label"] for e in train_ex], [e["label"] for e in self.dev_ex])
        self._train_batches: tuple[int, list[dict]] | None = None

    def train_batches(self, seed: int) -> list[dict]:
        """Tokenised, seed-shuffled train batches; kept for the runs of one seed (they share data order)."""
        if self._train_batches is None or self._train_batches[0] != seed:
            self._train_batches = (seed, self.make(self.train_ex, shuffle=True, seed=seed))
        return self._train_batches[1]

    def fisher_batches(self, seed: int) -> list[dict]:
        import random

        n = min(self.fisher_n, len(self.train_ex))
        return self.make(random.Random(seed + 1000).sample(self.train_ex, n), bs=8 if self.generative else 32)

    def evaluate(self, model, cfg: CompareConfig) -> dict:
        if not self.generative:
            return evaluate(model, self.dev, self.metric)
        from .gsm8k import answer_loss, exact_match

        return {"loss": answer_loss(model, self.dev),
                "score": exact_match(model, self.tokenizer, self.dev_ex, cfg.train.max_new_tokens,
                                     progress=cfg.progress)}


class Study:
    """Runs a :class:`CompareConfig`, appending one JSON line per finished run; finished runs are skipped."""

    def __init__(self, cfg: CompareConfig, model_factory: ModelFactory | None = None,
                 log: Callable[[str], object] | None = None):
        self.cfg, self.log = cfg, log or logger.info
        self.factory = model_factory or (lambda kind, n: load_model(cfg.model, task=kind, num_labels=max(n, 1)))
        self.path = results_path(cfg)
        self.fingerprint = setup_fingerprint(cfg)
        self._data: dict[str, _TaskData] = {}
        self._moments: dict[tuple, tuple[GradientMoments, float]] = {}
        self.arms = {name: parse_arm(name, raw) for name, raw in cfg.arms.items()}
        self._original_count: dict[tuple, int] = {}

    # -------------------------------------------------------------- models and budgets
    def _base(self, task: str, seed: int):
        torch.manual_seed(seed)
        kind = "causal-lm" if task == "gsm8k" else "seq-cls"
        num_labels = 0 if task == "gsm8k" else GLUE_TASKS[task].num_labels
        return self.factory(kind, num_labels)

    def _peft(self, task: str, method: str, seed: int, n_layers: int | None, rank: int):
        model, tok = self._base(task, seed)
        spec = PeftSpec(rank=rank, layers=layer_indices(model, n_layers),
                        target_modules=self.cfg.target_modules or default_targets(model),
                        task_type="CAUSAL_LM" if task == "gsm8k" else "SEQ_CLS")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pissa.*", category=UserWarning)
            model = METHODS[method](model, spec)  # PiSSA's SVD runs on the CPU, so every device starts alike
        return model.to(self.cfg.device), tok

    def _rank_for(self, run: Run) -> int:
        return self.cfg.lora_rank if run.strategy == "original" else self.cfg.pool_rank

    def _layers_for(self, run: Run) -> int | None:
        if run.mode == "fixed_layers":
            return None
        return int(run.budget) if run.strategy == "original" else self.cfg.fish_layers

    def _original_budget(self, run: Run) -> int:
        key = (run.task, run.method, run.budget)
        if key not in self._original_count:
            model, _ = self._peft(run.task, run.method, 0, int(run.budget), self.cfg.lora_rank)
            self._original_count[key] = sum(model.get_parameter(n).numel() for n in peft_candidates(model))
        return self._original_count[key]

    def check(self) -> None:
        """Model-dependent checks (layers, targets, budgets) for every planned run, before any training."""
        seen = set()
        for run in plan_runs(self.cfg):
            key = (run.task, run.method, self._layers_for(run), self._rank_for(run),
                   run.strategy == "original" or run.budget)
            if key in seen:
                continue
            seen.add(key)
            model, _ = self._peft(run.task, run.method, 0, self._layers_for(run), self._rank_for(run))
            if run.strategy != "original" and run.mode == "fixed_proportion":
                pool = sum(model.get_parameter(n).numel() for n in peft_candidates(model))
                if self._original_budget(run) > pool:
                    raise ValueError(f"config field 'budgets': Original on {run.budget:g} layers trains "
                                     f"{self._original_budget(run):,} entries, more than the FISH pool ({pool:,})")

    # -------------------------------------------------------------- one run
    def _data_for(self, task: str, tokenizer) -> _TaskData:
        if task not in self._data:
            self._data[task] = _TaskData(task, self.cfg, tokenizer)
            self._data[task].tokenizer = tokenizer
        return self._data[task]

    def execute(self, run: Run) -> dict:
        cfg, start = self.cfg, time.time()
        model, tok = self._peft(run.task, run.method, run.seed, self._layers_for(run), self._rank_for(run))
        data = self._data_for(run.task, tok)
        names, heads = peft_candidates(model), always_trainable(model)
        params = dict(model.named_parameters())
        n_cand = sum(params[n].numel() for n in names)
        head_numel = sum(params[n].numel() for n in heads)
        base_numel = sum(p.numel() for n, p in params.items() if n not in set(names) and n not in set(heads))
        before = data.evaluate(model, cfg) if cfg.train.eval_before else None
        mask, paper, arm, fisher_s = None, None, None, 0.0
        if run.strategy != "original":
            k = (self._original_budget(run) if run.mode == "fixed_proportion"
                 else max(1, min(n_cand, round(run.budget * n_cand))))
            arm = arm_of(run.strategy, self.arms)
            shapes = ({n: tuple(params[n].shape) for n in names}, {n: tuple(params[n].shape) for n in heads})
            if arm.warmup_steps:  # the paper's mask it is compared with is the one at init, without warm-up
                _, paper = select_for_arm(Arm(), self._moments_for(run, Arm(), model, data, names)[0], *shapes, k,
                                          run.seed)
            moments, fisher_s = self._moments_for(run, arm, model, data, names)
            mask, warm_paper = select_for_arm(arm, moments, *shapes, k, run.seed, cfg.select_kwargs.get(run.strategy, {}))
            paper = paper if arm.warmup_steps else warm_paper
            if cfg.show_masks and run.strategy == "fish":
                self.log(mask.summary())
        opt = optimizer_for_run(model, mask, cfg, cfg.lr_for(run.budget, run.strategy),
                                arm.refresh() if arm is not None else None)
        epochs = []

        def on_epoch_end(epoch: int, loss: float) -> None:
            ev = data.evaluate(model, cfg)
            epochs.append({"epoch": epoch + 1, "train_loss": loss, "dev_loss": ev["loss"], "dev_score": ev["score"]})

        batches = data.train_batches(run.seed)
        train(model, batches, opt, epochs=cfg.train.epochs, on_epoch_end=on_epoch_end, progress=cfg.progress)
        peft_trainable = n_cand if mask is None else mask.num_selected
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
        return {
            "id": run.id, **asdict(run), "fingerprint": self.fingerprint, "model": cfg.model,
            "metric": data.metric, "rank": self._rank_for(run), "layers": self._layers_for(run),
            "eval_split": data.eval_split, "trivial": data.trivial, "lr": cfg.lr_for(run.budget, run.strategy),
            "select_kwargs": cfg.select_kwargs.get(run.strategy, {}),
            **({"arm": arm.to_dict()} if run.strategy in self.arms else {}),
            "mask": mask_record(mask) if mask is not None else None,
            **({"jaccard_fish": jaccard(mask, paper)} if paper is not None and run.strategy != "fish" else {}),
            **({"refresh": opt.refresher.history_record()} if getattr(opt, "refresher", None) else {}),
            "trainable": {"peft": peft_trainable, "candidates": n_cand, "always_train": head_numel,
                          "base_params": base_numel, "proportion": peft_trainable / max(1, base_numel)},
            "epochs": epochs, "score": epochs[-1]["dev_score"], "before": before,
            "train_examples": len(data.train_ex), "dev_examples": len(data.dev_ex),
            "fisher_seconds": fisher_s, "wall_seconds": time.time() - start, "finished": time.time(),
            "peak_memory_mb": {"process_rss_high_water": rss, "cuda": peak},
            "device": torch.cuda.get_device_name(cfg.device) if cfg.device.startswith("cuda") else "cpu",
            "config": cfg.to_dict(),
        }

    def _moments_for(self, run: Run, arm: Arm, model, data: _TaskData, names: list[str]
                     ) -> tuple[GradientMoments, float]:
        """The per-sample gradient moments this run's arm scores with (cached per task / seed / pool, and per
        warm-up length and rate), and the seconds they took; a warm-up is rewound before returning."""
        lr = self.cfg.lr_for(run.budget, run.strategy)
        key = (run.task, run.method, run.seed, self._layers_for(run), self._rank_for(run), arm.warmup_steps,
               lr if arm.warmup_steps else None)
        if key not in self._moments:
            t0, init = time.time(), None
            if arm.warmup_steps:
                init = warm_up(model, data.train_batches(run.seed), arm.warmup_steps, lr, self.cfg.train.weight_decay)
            moments = gradient_moments(model, data.fisher_batches(run.seed), data.fisher_n, params=names,
                                       seed=run.seed, progress=self.cfg.progress)
            if init is not None:
                init.rewind(model)
            self._moments[key] = (moments, time.time() - t0)
        return self._moments[key]

    # -------------------------------------------------------------- the study
    def _check_resumed(self, existing: list[dict], runs: list[Run]) -> None:
        """A finished run counts only if it ran the arm and rate this config asks for."""
        planned = {r.id: r for r in runs}
        for rec in existing:
            run = planned.get(rec["id"])
            if run is None:
                continue
            arm = self.arms[run.strategy].to_dict() if run.strategy in self.arms else None
            lr = self.cfg.lr_for(run.budget, run.strategy)
            if rec.get("arm") != arm or ("lr" in rec and rec["lr"] != lr):
                raise ValueError(f"{self.path}: run {rec['id']} was made with arm {rec.get('arm')} at lr "
                                 f"{rec.get('lr')}, but this config asks for {arm} at lr {lr}; rename the arm or "
                                 "change 'name' to start a new results file")

    def run(self) -> list[dict]:
        """Execute every planned run not yet in the results file; returns all records of this study."""
        existing = read_results(self.path)
        for rec in existing:
            if rec.get("fingerprint") not in (None, self.fingerprint):
                raise ValueError(f"{self.path} holds runs made with a different setup (model / rank / train "
                                 f"settings); change 'name' or 'out_dir' to start a new results file")
        done = {rec["id"] for rec in existing}
        runs = plan_runs(self.cfg)
        self._check_resumed(existing, runs)
        todo = [r for r in runs if r.id not in done]
        self.log(f"compare: {len(runs)} runs planned, {len(runs) - len(todo)} already in {self.path}, "
                 f"{len(todo)} to do")
        if todo:
            check_writable(self.path.parent, self.path)  # before any model loads: never lose a trained run
            self.check()
        records = list(existing)
        bar = tqdm(todo, desc="compare", disable=not self.cfg.progress, file=sys.stderr)
        for run in bar:
            bar.set_postfix_str(run.id)
            rec = self.execute(run)
            append_record(self.path, rec)
            records.append(rec)
            t = rec["trainable"]
            before = f"{rec['before']['score']:.4f} -> " if rec["before"] else ""
            self.log(f"{run.id:<40} trainable {t['peft']:>9,} PEFT + {t['always_train']:,} head "
                     f"({100 * t['proportion']:.4f}% of the model)  dev {rec['metric']} {before}"
                     f"{rec['score']:.4f}  {rec['wall_seconds']:.0f} s")
        return records
