"""`fish-tune compare`'s own flags (arms, seeds, budgets, holdout, per-arm rates) and their parsing: each value is
checked here, before any data is read or model loads."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from .common import CommandError

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
