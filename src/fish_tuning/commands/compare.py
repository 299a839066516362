"""`fish-tune compare` on your own data: does FISH (or another selection) beat plain LoRA at my budget, on my data?
(The paper's study presets are the lab's, outside the package: ``python -m fish_lab compare demo``.)

    fish-tune compare --model_name_or_path minilm --train_file train.csv --validation_file dev.csv \\
        --text_column review --label_column sentiment --arms original,fish,rand --seeds 0,1 --max_steps 50

Every run is one `fish-tune train` run (the same flags, the same Trainer); per seed and budget each arm gets its own
output folder under ``--output_dir``, and one line in ``<output_dir>/results.jsonl``. Finished runs are skipped, so
the same command resumes an interrupted comparison. The report (``compare.md``) pairs the arms over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write
from .columns import infer_task
from .common import (
    CommandError,
    Parser,
    check_data_args,
    check_model_args,
    check_output_dir,
    check_peft_args,
    fish_config,
    load_data,
    resolve_model_path,
)

# arm -> the FISH flags it sets (strategy / allocation / score, and a refresh); "original" is dense LoRA
ARMS: dict[str, dict[str, str]] = {
    "original": {},
    "fish": {"strategy": "fish"},
    "rand": {"strategy": "rand"},
    "rev": {"strategy": "rev"},
    "shuffled": {"strategy": "rand", "allocation": "<fish>"},  # rand at the fish mask's per-tensor counts
    "uniform": {"strategy": "fish", "allocation": "uniform"},
    "uniform_rand": {"strategy": "rand", "allocation": "uniform"},
    "uniform_norm": {"strategy": "fish", "allocation": "uniform", "score": "normalized"},
    "uniform_norm_refresh": {"strategy": "fish", "allocation": "uniform", "score": "normalized",
                             "refresh_every": "20"},
    "fish_balanced": {"strategy": "fish_balanced"},
    "fish_rank1": {"strategy": "fish_rank1"},
}
SET_PER_RUN = ("seed", "output_dir", "keep", "budget", "strategy", "allocation", "score")
HOLDOUT_REPLACES = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "train_split",
                    "validation_split")


@dataclass
class CompareArguments:
    arms: str = field(default="original,fish,rand", metadata={
        "help": f"Comma list of arms: {', '.join(ARMS)}. original = dense LoRA (rank 1, or the rank of an rN "
                "budget); shuffled = rand at the fish mask's per-tensor counts (needs fish)."})
    seeds: str = field(default="0,1,2", metadata={"help": "Comma list of training seeds; arms are paired by seed."})
    budgets: str | None = field(default=None, metadata={
        "help": "Comma list of budgets for the masked arms: rN (the count of dense LoRA rank N on the targeted "
                "modules; original runs at rank N), an entry count, or a fraction of the --lora_r pool. Default: "
                "r1, or --keep / --budget when given."})
    holdout: float | None = field(default=None, metadata={
        "help": "Score on a seeded part of train (a fraction < 1 or a row count) instead of the validation data: "
                "for choosing (rates, arms) without touching the validation set."})
    arm_learning_rates: str | None = field(default=None, metadata={
        "help": "Comma list arm=rate (e.g. original=1e-2,fish=3e-3): each named arm at its own learning rate, "
                "chosen with --holdout; the other arms use --learning_rate. Sparse masks often want 3-10x the "
                "dense adapter's rate."})


def parser() -> Parser:
    from transformers import TrainingArguments

    from .common import DataArguments, FishArguments, ModelArguments, PeftArguments
    from .train import DEFAULT_LR

    return Parser("fish-tune compare", __doc__.split("\n\n")[0],
                  [ModelArguments, DataArguments, PeftArguments, FishArguments, CompareArguments, TrainingArguments],
                  defaults={"learning_rate": DEFAULT_LR})


def split_argv(argv: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """(values of the single-valued flags ``names``, the rest of ``argv``): compare sets those per run."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in names:
        pre.add_argument(f"--{name}")
    known, rest = pre.parse_known_args(argv)
    return {k: v for k, v in vars(known).items() if v is not None}, rest


def parse_list(text: str, flag: str, kind=str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise CommandError(f"{flag} is empty; give a comma list")
    try:
        out = [kind(t) for t in items]
    except ValueError:
        raise CommandError(f"{flag} {text!r}: every item must be {kind.__name__}") from None
    if len(set(out)) != len(out):
        raise CommandError(f"{flag} {text!r} names an item twice")
    return out


@dataclass(frozen=True)
class Budget:
    label: str  # "r1", "2304", "0.05"
    rank: int | None  # the dense LoRA rank whose count it is (original runs at it), else None


def parse_budgets(cmp: CompareArguments, keep: float | None, budget: int | None) -> list[Budget]:
    if cmp.budgets is not None and (keep is not None or budget is not None):
        raise CommandError("give --budgets or one of --keep / --budget, not both")
    if cmp.budgets is None:
        return [Budget(str(keep if keep is not None else budget), None)] if keep or budget else [Budget("r1", 1)]
    out = []
    for token in parse_list(cmp.budgets, "--budgets"):
        if token[:1] == "r" and token[1:].isdigit() and int(token[1:]) > 0:
            out.append(Budget(token, int(token[1:])))
            continue
        try:
            value = float(token)
        except ValueError:
            value = -1.0
        if not ((token.isdigit() and int(token) > 0) or (not token.isdigit() and 0 < value <= 1)):
            raise CommandError(f"--budgets item {token!r}: use rN (dense LoRA rank N's count), an entry count or a "
                               "fraction in (0, 1] written with a point (0.05, 1.0)")
        out.append(Budget(token, None))
    return out


def lora_count(path: str, task: str, peft_args, rank: int) -> int:
    """Entries of LoRA rank ``rank`` on the targeted modules, counted on a meta-device model (no weights load)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from ..methods import peft_candidates
    from .common import peft_config

    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    args = dataclasses.replace(peft_args, lora_r=rank, init_lora_weights="default")  # PiSSA needs real weights
    with torch.device("meta"):
        model = get_peft_model(auto.from_config(AutoConfig.from_pretrained(path)),
                               peft_config(args, "CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS"))
    named = dict(model.named_parameters())
    return sum(named[n].numel() for n in peft_candidates(model))


def write_holdout(data: dict, share: float, folder: Path) -> tuple[str, str, int]:
    """Split train into (rest, held out) with a fixed seed, as jsonl files in ``folder``; the validation data is
    never read. The same split for every seed and arm, so runs stay paired."""
    train = data["train"]
    n = int(share) if share >= 1 else round(share * len(train))
    if share <= 0 or not 1 <= n < len(train) or (share >= 1 and not float(share).is_integer()):
        raise CommandError(f"--holdout {share:g}: give a fraction in (0, 1) or a row count below the {len(train)} "
                           "train rows")
    order = list(range(len(train)))
    random.Random(0).shuffle(order)
    paths = []
    for name, rows in (("train", sorted(order[n:])), ("holdout", sorted(order[:n]))):
        path = folder / f"{name}.jsonl"  # atomic_write makes the folder
        atomic_write(path, lambda tmp, rows=rows: train.select(rows).to_json(tmp, lines=True))
        paths.append(str(path))
    return paths[0], paths[1], n


def trivial_fallback(data: dict, info: dict) -> float | None:
    """Majority-class accuracy on the scored data (used when the run's eval_results.json has no trivial score)."""
    val = data.get("validation")
    if info["task"] != "classification" or val is None or not len(val):
        return None
    labels = data["train"][info["label"]]
    top = max(set(labels), key=labels.count)
    return sum(v == top for v in val[info["label"]]) / len(val)


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write; that run runs again
    return out


def append_record(path: Path, record: dict) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    with open(path, "a", encoding="utf-8") as f:
        if text and not text.endswith("\n"):
            f.write("\n")  # a torn last line stays alone
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


@dataclass
class Study:
    """Everything checked and counted before any run: what to run, the flags every run shares, where it goes."""

    arms: list[str]
    seeds: list[int]
    budgets: list[Budget]
    counts: dict[str, int | None]  # budget label -> entries (None: a fraction of a pool counted by the run)
    forwarded: list[str]  # `fish-tune train` flags shared by every run
    out: Path
    info: dict
    scored: str
    trivial: float | None
    lora_r: int
    lora_alpha: int
    learning_rate: float
    rates: dict[str, float] = field(default_factory=dict)  # arm -> its own learning rate (--arm_learning_rates)

    @property
    def tag(self) -> str:
        """Fingerprint of the shared flags: results of other flags are never mixed into one file (arms, seeds
        and budgets may grow: only the new runs run)."""
        shared = json.dumps([self.forwarded, sorted(self.rates.items())] if self.rates else self.forwarded)
        return hashlib.sha256(shared.encode()).hexdigest()[:12]

    def rate(self, arm: str) -> float:
        return self.rates.get(arm, self.learning_rate)

    def plan(self) -> list[tuple[str, Budget, int]]:
        originals = sorted({b.rank for b in self.budgets if b.rank}) or [1]
        out = []
        for seed in self.seeds:
            out += [("original", Budget(f"r{r}", r), seed) for r in originals if "original" in self.arms]
            for b in self.budgets:
                out += [(arm, b, seed) for arm in self.arms if arm != "original"]
        return out


def check_flags(argv: list[str]) -> tuple:
    """Parse and check every flag (no data read): the train flag groups, the compare flags, the shared argv."""
    model_args, data_args, peft_args, fish_args, cmp, targs = parser().parse(argv)
    given, forwarded = split_argv(argv, ("arms", "seeds", "budgets", "holdout", "arm_learning_rates", "config",
                                         *SET_PER_RUN))
    if "config" in given:
        raise CommandError("fish-tune compare takes flags on the command line, not --config (a study YAML goes "
                           "first: fish-tune compare CONFIG.yaml)")
    for flag in ("strategy", "allocation", "score"):
        if flag in given:
            raise CommandError(f"--{flag} is set per arm by --arms ({', '.join(ARMS)}); leave it out")
    arms = parse_list(cmp.arms, "--arms")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise CommandError(f"--arms: unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    if "shuffled" in arms and "fish" not in arms:
        raise CommandError("the shuffled arm takes the fish mask's per-tensor counts: add fish to --arms")
    seeds = parse_list(cmp.seeds, "--seeds", int)
    if any(s < 0 for s in seeds):
        raise CommandError("--seeds must be non-negative integers")
    budgets = parse_budgets(cmp, fish_args.keep, fish_args.budget)
    fish_config(dataclasses.replace(fish_args, keep=None, budget=1))  # the other FISH flags
    check_peft_args(peft_args)
    check_model_args(model_args)
    check_data_args(data_args)
    check_output_dir(targs.output_dir)
    if peft_args.peft not in ("lora", "dora") and ("original" in arms or any(b.rank for b in budgets)):
        raise CommandError(f"the original arm and rN budgets are dense LoRA / DoRA; with --peft {peft_args.peft} "
                           "give --budgets as entry counts or fractions and leave original out")
    rates = parse_rates(cmp.arm_learning_rates, arms)
    arms = sorted(arms, key=list(ARMS).index)  # fish runs before shuffled, which reads its mask
    return model_args, data_args, peft_args, cmp, targs, arms, seeds, budgets, forwarded, rates


def parse_rates(text: str | None, arms: list[str]) -> dict[str, float]:
    """``arm=rate,...`` -> {arm: rate}; every arm must be one of --arms and every rate a positive number."""
    rates: dict[str, float] = {}
    for item in parse_list(text, "--arm_learning_rates") if text is not None else []:
        arm, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if arm.strip() not in arms or not rate > 0 or arm.strip() in rates:
            raise CommandError(f"--arm_learning_rates item {item!r}: write arm=rate with an arm of --arms "
                               f"({', '.join(arms)}), each once, and a positive rate (fish=3e-3)")
        rates[arm.strip()] = rate
    return rates


def budget_counts(path: str, task: str, peft_args, budgets: list[Budget]) -> dict[str, int | None]:
    """Entries per budget, each checked against the --lora_r pool (LoRA / DoRA; other methods count in the run)."""
    pool = lora_count(path, task, peft_args, peft_args.lora_r) if peft_args.peft in ("lora", "dora") else None
    counts: dict[str, int | None] = {}
    for b in budgets:
        if b.rank:
            counts[b.label] = lora_count(path, task, peft_args, b.rank)
        elif b.label.isdigit():  # an entry count
            counts[b.label] = int(b.label)
        else:  # a fraction of the pool
            counts[b.label] = None if pool is None else max(1, round(float(b.label) * pool))
        if pool is not None and counts[b.label] is not None and counts[b.label] > pool:
            raise CommandError(f"budget {b.label} is {counts[b.label]:,} entries, more than the --lora_r "
                               f"{peft_args.lora_r} pool ({pool:,}); raise --lora_r or lower the budget")
    return counts


def prepare(argv: list[str]) -> Study:
    """Every check that needs no model weights: flags, data, columns, budgets, the results file."""
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv):
        argv = [*argv, "--output_dir", "fish-compare"]
    model_args, data_args, peft_args, cmp, targs, arms, seeds, budgets, forwarded, rates = check_flags(argv)
    path = resolve_model_path(model_args.model_name_or_path)
    out = Path(targs.output_dir)
    data = load_data(data_args if cmp.holdout is None else dataclasses.replace(data_args, validation_file=None))
    if cmp.holdout is not None:
        forwarded = split_argv(forwarded, HOLDOUT_REPLACES)[1]
        rest, held, n = write_holdout(data, cmp.holdout, out / "holdout")
        forwarded += ["--train_file", rest, "--validation_file", held]
        data = load_data(dataclasses.replace(data_args, dataset_name=None, train_file=rest, validation_file=held))
        scored = f"held-out train ({n:,} rows, seeded; the validation data is not used)"
    elif data["validation"] is None:
        raise CommandError("compare scores every run: give validation data (--validation_file, or "
                           "--validation_split), or --holdout to score on a held-out part of train")
    else:
        scored = "the validation data"
    info = infer_task(model_args, data_args, data["train"])
    counts = budget_counts(path, info["task"], peft_args, budgets)
    study = Study(arms, seeds, budgets, counts, forwarded, out, info, scored, trivial_fallback(data, info),
                  peft_args.lora_r, peft_args.lora_alpha, targs.learning_rate, rates)
    other = [r for r in read_records(out / "results.jsonl") if r.get("study") != study.tag]
    if other:
        raise CommandError(f"{out / 'results.jsonl'} holds runs made with other flags ({other[0].get('key')}); use "
                           "another --output_dir, or the flags of those runs")
    return study


def original_alpha(study: Study, rank: int) -> int:
    """The original's lora_alpha at the pool's scale alpha / r: a fixed alpha would give rank 1 an update scale
    --lora_r times the pool's (at 16 / 1 vs 16 / 8, in effect an 8x higher learning rate), not an equal footing."""
    return max(1, round(study.lora_alpha * rank / study.lora_r))


def run_flags(study: Study, arm: str, b: Budget, seed: int, folder: Path) -> list[str]:
    """The per-run `fish-tune train` flags after the shared ones (argparse: the last value of a flag wins)."""
    flags = ["--seed", str(seed), "--output_dir", str(folder)]
    if arm in study.rates:
        flags += ["--learning_rate", str(study.rates[arm])]
    if arm == "original":  # dense LoRA: the mask keeps every entry (its 1-sample Fisher pass decides nothing)
        return flags + ["--lora_r", str(b.rank), "--lora_alpha", str(original_alpha(study, b.rank)), "--keep", "1.0",
                        "--num_samples", "1", "--strategy", "fish"]
    count = study.counts[b.label]
    flags += ["--budget", str(count)] if count is not None else ["--keep", b.label]
    for name, value in ARMS[arm].items():
        if value == "<fish>":
            value = str(study.out / "runs" / f"fish_{b.label}_s{seed}" / "fish_mask.safetensors")
        flags += [f"--{name}", value]
    return flags


def run_one(study: Study, arm: str, b: Budget, seed: int) -> dict:
    """One `fish-tune train` run, in this process; its record (metrics, mask placement, wall time)."""
    from . import train

    key, folder = f"{arm}/{b.label}/s{seed}", study.out / "runs" / f"{arm}_{b.label}_s{seed}"
    start = time.perf_counter()
    rc = train.run([*study.forwarded, *run_flags(study, arm, b, seed, folder)])
    if rc != 0:
        raise CommandError(f"run {key} failed (exit {rc}); its output is in {folder}")
    summary = _json(folder / "fish_mask.json")
    return {"key": key, "study": study.tag, "arm": arm, "budget": b.label, "seed": seed,
            "lora_r": b.rank if arm == "original" else study.lora_r,
            "lora_alpha": original_alpha(study, b.rank) if arm == "original" else study.lora_alpha,
            "task": study.info["task"],
            "entries": summary.get("num_selected"), "candidates": summary.get("num_candidates"),
            "trainable": summary.get("trainable"), "per_layer": summary.get("per_layer"),
            "eval": _json(folder / "eval_results.json"), "train": _json(folder / "train_results.json"),
            "wall_s": round(time.perf_counter() - start, 2), "trivial_fallback": study.trivial,
            "learning_rate": study.rate(arm), "scored_on": study.scored}


def run(argv: list[str]) -> int:
    from .compare_report import report

    study = prepare(argv)
    results = study.out / "results.jsonl"
    finished = {r["key"] for r in read_records(results)}
    todo = [p for p in study.plan() if f"{p[0]}/{p[1].label}/s{p[2]}" not in finished]
    print(f"fish-tune compare: {len(study.plan())} runs ({len(todo)} to do) of {', '.join(study.arms)} x "
          f"{len(study.seeds)} seeds; {study.info['task']} scored on {study.scored}", flush=True)
    for arm, b, seed in todo:
        record = run_one(study, arm, b, seed)
        append_record(results, record)
        print(f"fish-tune compare: {record['key']} done ({record['wall_s']:.1f} s)", flush=True)
    text = report(read_records(results))
    atomic_write(study.out / "compare.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"\n{text}\nresults: {results}\nreport:  {study.out / 'compare.md'}")
    return 0


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except (CommandError, ValueError, OSError, ImportError) as err:
        print(f"fish-tune: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
