"""`fish-tune compare` on your own data: does FISH (or another selection) beat plain LoRA at my budget, on my data?
(The paper's study presets are the lab's, outside the package: ``python -m fish_lab compare demo``.)

    fish-tune compare --model_name_or_path minilm --train_file train.csv --validation_file dev.csv \\
        --text_column review --label_column sentiment --arms original,fish,rand --seeds 0,1 --max_steps 50

Every run is one `fish-tune train` run (the same flags, the same Trainer); per seed and budget each arm gets its own
output folder under ``--output_dir``, and one line in ``<output_dir>/results.jsonl``. Finished runs are skipped, so
the same command resumes an interrupted comparison. The report (``compare.md``) pairs the arms over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..files import append_record, atomic_write
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
from .compare_args import ARMS, Budget, CompareArguments, parse_budgets, parse_list, parse_rates, split_argv
from .quant_args import check_quant_args, check_quant_task

SET_PER_RUN = ("seed", "output_dir", "keep", "budget", "strategy", "allocation", "score")
HOLDOUT_REPLACES = ("train_file", "validation_file", "dataset_name", "dataset_config_name", "train_split",
                    "validation_split")


def parser() -> Parser:
    from transformers import TrainingArguments

    from .common import DataArguments, FishArguments, ModelArguments, PeftArguments
    from .quant_args import QuantArguments
    from .train import DEFAULT_LR

    return Parser("fish-tune compare", __doc__.split("\n\n")[0],
                  [ModelArguments, DataArguments, PeftArguments, FishArguments, CompareArguments, TrainingArguments,
                   QuantArguments], defaults={"learning_rate": DEFAULT_LR})


def lora_count(path: str, task: str, peft_args, rank: int) -> int:
    """Entries of LoRA rank ``rank`` on the targeted modules, counted on a meta-device model (no weights load)."""
    from .preflight import candidate_sizes

    return sum(candidate_sizes(path, task, dataclasses.replace(peft_args, lora_r=rank)).values())


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
    model_args, data_args, peft_args, fish_args, cmp, targs, quant = parser().parse(argv)
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
    check_quant_args(quant, peft_args, None, None)  # each run keeps its QPiSSA base in its own folder
    if peft_args.peft not in ("lora", "dora") and ("original" in arms or any(b.rank for b in budgets)):
        raise CommandError(f"the original arm and rN budgets are dense LoRA / DoRA; with --peft {peft_args.peft} "
                           "give --budgets as entry counts or fractions and leave original out")
    rates = parse_rates(cmp.arm_learning_rates, arms)
    arms = sorted(arms, key=list(ARMS).index)  # fish runs before shuffled, which reads its mask
    return model_args, data_args, peft_args, cmp, targs, arms, seeds, budgets, forwarded, rates, quant


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
    model_args, data_args, peft_args, cmp, targs, arms, seeds, budgets, forwarded, rates, quant = check_flags(argv)
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
    check_quant_task(quant, info["task"])
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
