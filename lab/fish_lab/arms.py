"""Named selection arms of a study: a score, an allocation, a strategy inside tensors, and an optional warm-up.

A study's ``strategies`` may name the built-in strategies (``fish``, ``rand``, ...) or arms defined in the config::

    arms:
      shuffled: {strategy: rand, allocation: fish}          # FISH's per-tensor counts, random positions
      uniform_norm: {allocation: uniform, score: normalized}
      warm_uniform_norm: {allocation: uniform, score: normalized, warmup_steps: 50}
      uniform_norm_refresh: {allocation: uniform, score: normalized, refresh_every: 20, refresh_fraction: 0.3}

``allocation: fish`` means the per-tensor counts of the paper's global top-k Fisher mask of the same run (the
shuffled control when the strategy is ``rand``). ``warmup_steps: W`` trains the whole adapter densely for W steps
(AdamW at the run's rate), scores there, then rewinds every trainable tensor to its init and trains the masked
run from scratch with a fresh optimizer (lottery-ticket late rewinding, as LT-SFT does); the W warm-up steps are
extra compute, reported in the run's record. ``refresh_every: N`` (with ``refresh_fraction``, ``refresh_until``)
moves the mask during training (:mod:`fish_tuning.refresh`); the run's record gets the refresh history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fish_tuning.fisher import GradientMoments
from fish_tuning.integrations.warmup import WarmUp
from fish_tuning.mask import FishMask
from fish_tuning.refresh import RefreshSchedule
from fish_tuning.scores import SCORES, score
from fish_tuning.selection import ALLOCATIONS, STRATEGIES, select_mask

ARM_ALLOCATIONS = (*ALLOCATIONS, "fish")
ARM_FIELDS = ("strategy", "allocation", "score", "warmup_steps", "alpha", "refresh_every", "refresh_fraction",
              "refresh_until", "regrow_state")


@dataclass(frozen=True)
class Arm:
    strategy: str = "fish"
    allocation: str = "global"
    score: str = "fisher"
    warmup_steps: int = 0
    alpha: float | None = None
    refresh_every: int = 0  # > 0: the mask moves during training (fish_tuning.refresh)
    refresh_fraction: float = 0.2
    refresh_until: int | None = None
    regrow_state: str | None = None  # None: the schedule's default ("zero"); "stats": the window's statistics

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if not self.refresh_every:  # records of arms without refresh read as before refresh existed
            for key in ("refresh_every", "refresh_fraction", "refresh_until", "regrow_state"):
                out.pop(key, None)
        return out

    def refresh(self) -> RefreshSchedule | None:
        if not self.refresh_every:
            return None
        extra = {} if self.regrow_state is None else {"regrow_state": self.regrow_state}
        return RefreshSchedule(every=self.refresh_every, fraction=self.refresh_fraction, until=self.refresh_until,
                               **extra)


def parse_arm(name: str, raw: object) -> Arm:
    """One ``arms`` entry of a config, checked; ValueError naming the field otherwise."""
    where = f"config field 'arms.{name}'"

    def field(f: str) -> str:
        return f"config field 'arms.{name}.{f}'"

    if name in STRATEGIES or name == "original":
        raise ValueError(f"{where}: {name!r} is a built-in strategy; give the arm another name")
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, e.g. {{strategy: rand, allocation: fish}}")
    unknown = sorted(set(raw) - set(ARM_FIELDS))
    if unknown:
        raise ValueError(f"{where}: {unknown[0]!r} is unknown; valid fields: {list(ARM_FIELDS)}")
    arm = Arm(**raw)
    if arm.strategy not in ("fish", "rand", "rev"):
        raise ValueError(f"{field('strategy')} must be fish, rand or rev, got {arm.strategy!r}")
    if arm.allocation not in ARM_ALLOCATIONS:
        raise ValueError(f"{field('allocation')} must be one of {ARM_ALLOCATIONS}, got {arm.allocation!r}")
    if arm.score not in SCORES:
        raise ValueError(f"{field('score')} must be one of {SCORES}, got {arm.score!r}")
    if isinstance(arm.warmup_steps, bool) or not isinstance(arm.warmup_steps, int) or arm.warmup_steps < 0:
        raise ValueError(f"{field('warmup_steps')} must be an integer >= 0, got {arm.warmup_steps!r}")
    try:
        arm.refresh()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return arm


def check_arms(cfg) -> None:
    """The config's ``arms`` and ``lr_by_arm`` fields (a CompareConfig), checked before any model loads."""
    if not isinstance(cfg.arms, dict):
        raise ValueError(f"config field 'arms' must map an arm name to its fields, got {cfg.arms!r}")
    for name, raw in cfg.arms.items():
        parse_arm(name, raw)
    if not isinstance(cfg.lr_by_arm, dict):
        raise ValueError(f"config field 'lr_by_arm' must map a strategy or arm to a rate, got {cfg.lr_by_arm!r}")
    for arm, lr in cfg.lr_by_arm.items():
        if arm not in cfg.strategies:
            raise ValueError(f"config field 'lr_by_arm': {arm!r} is not one of the strategies {cfg.strategies}")
        for b, v in (lr.items() if isinstance(lr, dict) else [(None, lr)]):
            if b is not None and b not in cfg.budgets:
                raise ValueError(f"config field 'lr_by_arm.{arm}': {b!r} is not one of the budgets {cfg.budgets}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"config field 'lr_by_arm.{arm}': a rate must be a positive number, got {v!r}")


def arm_of(strategy: str, arms: dict[str, Arm]) -> Arm:
    """The arm a run's ``strategy`` names: a defined arm, or a built-in strategy with the global allocation."""
    return arms[strategy] if strategy in arms else Arm(strategy=strategy)


def select_for_arm(arm: Arm, moments: GradientMoments | None, cand: dict[str, tuple], heads: dict[str, tuple],
                   k: int, seed: int, extra: dict | None = None) -> tuple[FishMask, FishMask | None]:
    """(the arm's mask, the paper's global top-k Fisher mask of the same moments; None without moments).

    ``cand`` / ``heads``: shapes of the candidates and of the always-trained tensors (a classifier head)."""
    head_scores = {n: torch.zeros(s) for n, s in heads.items()}
    always = [f"^{n}$" for n in heads] or None
    paper = None
    if moments is not None:
        paper = select_mask({**moments.fisher, **head_scores}, budget=k, strategy="fish", always_train=always)
    if moments is None or (arm.strategy == "rand" and arm.allocation == "global"):
        scores = {n: torch.zeros(s) for n, s in cand.items()}  # positions are random; nothing is ranked
    else:
        scores = score(moments, arm.score)
    allocation = paper if arm.allocation == "fish" else arm.allocation
    extra = dict(extra or {}) | ({} if arm.alpha is None else {"alpha": arm.alpha})
    mask = select_mask({**scores, **head_scores}, budget=k, strategy=arm.strategy, seed=seed, always_train=always,
                       allocation=allocation, **extra)
    return mask, paper


def jaccard(a: FishMask, b: FishMask) -> float:
    """|a ∩ b| / |a ∪ b| of the kept candidate entries (same candidates)."""
    inter = union = 0
    for name in a.shapes:
        x, y = set(a.indices[name].tolist()), set(b.indices.get(name, torch.zeros(0)).tolist())
        inter += len(x & y)
        union += len(x | y)
    return inter / union if union else 1.0


def warm_up(model: torch.nn.Module, batches: list[dict], steps: int, lr: float, weight_decay: float) -> WarmUp:
    """Train every trainable tensor densely for ``steps`` batches; returns the init snapshot (``.rewind(model)``)."""
    snapshot = WarmUp(model, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):  # the masked run then sees the dropout draws of a run without warm-up
        for i in range(steps):
            loss = model(**batches[i % len(batches)]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.train(was_training)
    return snapshot
