"""FishConfig: every FISH setting in one validated dataclass (as peft's configs), shared by the callback, the CLI
and the compare harness, and saved in the mask file's metadata."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .checks import is_int, positive_int, unit_interval
from .mask import _patterns
from .refresh import RefreshSchedule
from .scores import SCORES
from .selection import ALLOCATIONS, DEFAULT_ALPHA, STRATEGIES, check_keep_budget

KINDS = ("empirical", "expected")
ENGINES = ("auto", "vectorized", "loop")


@dataclass
class FishConfig:
    """How a FISH mask is chosen. Give exactly one of ``keep`` / ``budget`` (unless a ready mask is used)."""

    keep: float | None = field(default=None, metadata={
        "help": "Fraction of the PEFT candidate entries to train, in (0, 1] (e.g. 0.05). Exclusive with budget."})
    budget: int | None = field(default=None, metadata={
        "help": "Number of PEFT candidate entries to train (e.g. the count of a smaller PEFT). Exclusive with keep."})
    strategy: str = field(default="fish", metadata={
        "help": f"Selection rule: one of {', '.join(STRATEGIES)}. fish = top-k Fisher (the paper); rand / rev = "
                "controls; fish_balanced / fish_rank1 = allocation-aware variants."})
    allocation: str = field(default="global", metadata={
        "help": "How many entries each tensor gets: global (the paper: one ranking over all tensors), uniform "
                "(the same density in every tensor), mass (~ score mass^alpha), or a mask file (.safetensors) "
                "whose per-tensor counts are kept (with strategy rand: the shuffled control of that mask); "
                "strategy then picks inside."})
    score: str = field(default="fisher", metadata={
        "help": "What is ranked: fisher (the paper), normalized (row/column-normalised Fisher), consistency "
                "(|mean g| - 1.65 SE) or snr ((mean g)^2 / Fisher); all from the same pass."})
    warmup_steps: int = field(default=0, metadata={
        "help": "Train the adapter densely for this many steps, score there, then rewind it to its init and "
                "train masked with a fresh optimizer state (0: score at init, the paper)."})
    refresh_every: int = field(default=0, metadata={
        "help": "Move the mask every this many optimizer steps (0: a fixed mask, the paper): drop the kept entries "
                "that moved least, regrow the unkept ones with the most consistent gradient; exactly k always."})
    refresh_fraction: float = field(default=0.2, metadata={
        "help": "Share of each tensor's kept entries replaced at the first refresh, decaying linearly to 0."})
    refresh_until: int | None = field(default=None, metadata={
        "help": "Last step of the refresh schedule (default: 10 x refresh_every)."})
    alpha: float = field(default=DEFAULT_ALPHA, metadata={
        "help": "allocation=mass (and fish_balanced) only: per-tensor budget ~ (score mass)^alpha, in [0, 1]."})
    num_samples: int = field(default=128, metadata={
        "help": "Calibration samples for the Fisher pass (the paper: 128; 256 for generation)."})
    fisher_kind: str = field(default="empirical", metadata={
        "help": "empirical: gradients at the data labels (Eq. 3); expected: labels sampled from the model (Eq. 2)."})
    fisher_engine: str = field(default="auto", metadata={
        "help": "Per-sample gradient engine: auto (vectorised where exact, else loop), vectorized or loop."})
    exclude: list[str] | None = field(default=None, metadata={
        "help": "Regexes of candidate names left out of the selection; they never train."})
    always_train: list[str] | None = field(default=None, metadata={
        "help": "Regexes of parameters trained fully outside the budget (default: every trainable non-candidate, "
                "e.g. a classifier head)."})
    seed: int | None = field(default=None, metadata={
        "help": "Seed of the calibration subset and of rand (default: the training seed)."})

    def __post_init__(self):
        if self.keep is not None or self.budget is not None:
            self.keep, self.budget = check_keep_budget(self.keep, self.budget)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.alpha = unit_interval(self.alpha, "alpha (the mass allocation's exponent)")
        if self.allocation_file() is not None:
            if not os.path.isfile(self.allocation):
                raise ValueError(f"allocation mask file {self.allocation} not found")
        elif self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, a mask file (.safetensors) or a FishMask "
                             f"(given to FishCallback or select_mask), got {self.allocation!r}")
        if (self.strategy, self.allocation) in (("fish_balanced", "uniform"), ("fish_rank1", "uniform"),
                                                ("fish_rank1", "mass")):
            raise ValueError(f"strategy={self.strategy!r} fixes its own allocation; use strategy='fish' with "
                             f"allocation={self.allocation!r}, or leave allocation at 'global'")
        if not is_int(self.refresh_every) or self.refresh_every < 0:
            raise ValueError(f"refresh_every must be an integer >= 0 (0: no refresh), got {self.refresh_every!r}")
        self.refresh()  # checks the refresh fields
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        self.num_samples = positive_int(self.num_samples, "num_samples")
        if self.fisher_kind not in KINDS:
            raise ValueError(f"fisher_kind must be one of {KINDS}, got {self.fisher_kind!r}")
        if self.fisher_engine not in ENGINES:
            raise ValueError(f"fisher_engine must be one of {ENGINES}, got {self.fisher_engine!r}")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        self.exclude = _patterns(self.exclude, "exclude") or None
        self.always_train = _patterns(self.always_train, "always_train") or None

    def allocation_file(self) -> str | None:
        """The mask file whose per-tensor counts ``allocation`` names, or None for a named allocation."""
        return self.allocation if str(self.allocation).endswith(".safetensors") else None

    def refresh(self) -> RefreshSchedule | None:
        """The refresh schedule these settings ask for (None: a fixed mask)."""
        if not self.refresh_every:
            return None
        return RefreshSchedule(every=self.refresh_every, fraction=self.refresh_fraction, until=self.refresh_until)

    def require_budget(self) -> None:
        """Raise unless exactly one of keep / budget is set (needed whenever a mask is selected)."""
        check_keep_budget(self.keep, self.budget)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
