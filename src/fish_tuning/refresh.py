"""A mask that moves: drop and regrow kept entries during training, exactly k at every step (SpIEL / RigL style).

Every ``every`` optimizer steps until ``until``, per candidate tensor (its count stays fixed): drop the
``fraction_t`` of kept entries that moved least since they were selected (|θ − θ_selected|), and regrow as many
unkept entries with the best score over the last ``window`` steps' gradients: the lower confidence bound
|mean g| − z·SE (``score="consistency"``, SpIEL's) or mean g² (``"fisher"``). ``fraction_t`` decays linearly from
``fraction`` to 0 at ``until``.

- The gradients of unkept entries are seen through the guard's gradient hook *before* it zeroes them, and only in
  the ``window`` steps before a refresh: outside the window a step stays O(k). No extra forward or backward.
- An entry moves in a step only if it is kept in that step: dropped entries keep their value and never move
  again unless regrown; never-kept entries stay bit-identical to their init.
- The optimizer's state follows: :class:`~fish_tuning.SparseAdamW` keeps the moments of entries that stay and
  starts new ones at zero (``regrow_state="zero"``) or from the window's statistics (``"stats"``: mean g and
  mean g²); a dense optimizer (``MaskedOptimizer``'s, the Trainer's) gets every state tensor of the parameter's
  shape zeroed at dropped and regrown entries (or set from the statistics for ``exp_avg`` / ``exp_avg_sq``).
- Under DDP the window's gradients are averaged over ranks each step (one all-reduce per window step), so every
  rank refreshes identically. FSDP2 and ZeRO are refused (``NotImplementedError``).

The whole state (step count, history, values at selection, ever-kept flags, an unfinished window) is a dict of
tensors and lists, :meth:`MaskRefresher.state` / :meth:`MaskRefresher.load`, that rides in the optimizer's state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import is_int
from .dist import world_size
from .guard import MaskGuard, optimizer_chain
from .mask import FishMask

REFRESH_KEY = "fish_tuning_refresh"  # the refresher's state in the optimizer's first param group


@dataclass(frozen=True)
class RefreshSchedule:
    """When and how much the mask moves. ``until`` defaults to ``every * 10``, ``window`` to ``min(5, every)``."""

    every: int
    fraction: float = 0.2
    until: int | None = None
    window: int | None = None  # default: min(5, every)
    score: str = "consistency"
    regrow_state: str = "zero"
    z: float = 1.65

    def __post_init__(self):
        if not is_int(self.every) or self.every < 1:
            raise ValueError(f"refresh_every must be a positive number of optimizer steps, got {self.every!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"refresh_fraction must be in (0, 1], got {self.fraction!r}")
        if self.until is None:
            object.__setattr__(self, "until", self.every * 10)
        if not is_int(self.until) or self.until < self.every:
            raise ValueError(f"refresh_until must be an integer >= refresh_every ({self.every}), got {self.until!r}")
        if self.window is None:
            object.__setattr__(self, "window", min(5, self.every))
        if not is_int(self.window) or not 1 <= self.window <= self.every:
            raise ValueError(f"refresh_window must be an integer in [1, refresh_every={self.every}], got "
                             f"{self.window!r}")
        if self.score not in ("consistency", "fisher"):
            raise ValueError(f"refresh score must be 'consistency' or 'fisher', got {self.score!r}")
        if self.regrow_state not in ("zero", "stats"):
            raise ValueError(f"regrow_state must be 'zero' or 'stats', got {self.regrow_state!r}")

    def fraction_at(self, step: int) -> float:
        return self.fraction * max(0.0, 1 - step / self.until)

    def refreshes_at(self, step: int) -> bool:
        return step % self.every == 0 and 0 < step < self.until

    def observes(self, step: int) -> bool:
        """Whether the gradients of optimizer step ``step`` (1-based) feed the next refresh."""
        nxt = math.ceil(step / self.every) * self.every
        return self.refreshes_at(nxt) and step > nxt - self.window


class MaskRefresher:
    """Moves ``guard``'s mask on ``optimizer``'s steps (a step post-hook on it); see the module docstring."""

    def __init__(self, guard: MaskGuard, optimizer: torch.optim.Optimizer, schedule: RefreshSchedule):
        if not guard.attached:
            raise ValueError("MaskRefresher needs an attached MaskGuard (its gradient hooks see the gradients)")
        guard.check_movable()
        self.guard, self.optimizer, self.schedule = guard, optimizer, schedule
        names = guard.local_mask.names
        self.by_name = {names[p]: p for p in guard.local_mask.entries if names[p] in guard.mask.shapes}
        self.step, self.history = 0, []
        self.selected = {n: p.detach().reshape(-1)[guard.kept(p).long()].clone() for n, p in self.by_name.items()}
        self.ever = {n: self._flags(n) for n in self.by_name}
        self.first = {n: guard.kept(p).long().cpu().clone() for n, p in self.by_name.items()}  # the selection
        self._buf: dict[str, Tensor] = {}  # this step's gradient (masked entries), during a window
        self._sums: dict[str, tuple[Tensor, Tensor]] = {}  # Σ g and Σ g² over the window's steps
        self._handles = [optimizer.register_step_post_hook(lambda *_: self.after_step()),
                         optimizer.register_state_dict_pre_hook(lambda *_: self._publish()),
                         optimizer.register_load_state_dict_post_hook(lambda *_: self._restore())]
        self._restore()  # a resumed run: the optimizer state loaded before this refresher existed (Trainer)

    def _flags(self, name: str) -> Tensor:
        flags = torch.zeros(self.by_name[name].numel(), dtype=torch.bool)
        flags[self.guard.kept(self.by_name[name]).long().cpu()] = True
        return flags

    # ------------------------------------------------------------------ the step
    def _arm_tap(self) -> None:
        self.guard.set_tap(self._tap if self.schedule.observes(self.step + 1) else None)

    def _tap(self, p: Tensor, grad: Tensor) -> None:
        name = self.guard.local_mask.names.get(p)
        if name not in self.by_name:
            return
        buf = self._buf.get(name)
        if buf is None:
            buf = self._buf[name] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        buf.add_(grad.detach().reshape(-1).float())  # masked entries: zeroed after each backward, so a sum of
        # micro-batches; kept entries are never scored for regrowth, so their running sums do not matter

    @torch.no_grad()
    def after_step(self) -> None:
        self.step += 1
        if self.schedule.observes(self.step):
            self._fold()
        if self.schedule.refreshes_at(self.step):
            self._refresh()
        self._arm_tap()

    def _fold(self) -> None:
        names = list(self._buf)
        if world_size() > 1 and names:
            flat = torch.cat([self._buf[n] for n in names])
            torch.distributed.all_reduce(flat)
            flat /= world_size()
            for n, part in zip(names, torch.split(flat, [self._buf[n].numel() for n in names])):
                self._buf[n].copy_(part)
        for n in names:
            g = self._buf.pop(n)
            if n not in self._sums:
                self._sums[n] = (torch.zeros_like(g), torch.zeros_like(g))
            s, s2 = self._sums[n]
            s.add_(g)
            s2.addcmul_(g, g)

    def _regrow_score(self, name: str) -> Tensor:
        s, s2 = self._sums[name]
        n = self.schedule.window
        mean, sq = s / n, s2 / n
        if self.schedule.score == "fisher" or n < 2:
            return sq if self.schedule.score == "fisher" else mean.abs()
        var = (sq - mean.square()).clamp_min(0) * n / (n - 1)
        return mean.abs() - self.schedule.z * (var / n).sqrt()

    def _refresh(self) -> None:
        frac = self.schedule.fraction_at(self.step)
        indices, dropped_total, regrown_total, changed = dict(self.guard.mask.indices), 0, 0, []
        for name, p in self.by_name.items():
            idx = self.guard.kept(p).long()
            count = idx.numel()
            n = min(round(frac * count), p.numel() - count)
            if n <= 0 or name not in self._sums:
                continue
            flat = p.detach().reshape(-1)
            change = (flat[idx] - self.selected[name]).abs()
            drop_pos = torch.sort(change, stable=True).indices[:n]
            stay = torch.ones(count, dtype=torch.bool, device=idx.device)
            stay[drop_pos] = False
            score = self._regrow_score(name)  # a new tensor: the sums stay as they are
            score[idx] = -math.inf  # kept entries (those just dropped included) are not regrown now
            grow = torch.sort(score, descending=True, stable=True).indices[:n]
            new = torch.sort(torch.cat([idx[stay], grow.to(idx.device)])).values
            self._migrate(p, idx, new, stay, grow, name)
            selected = torch.empty(new.numel(), dtype=self.selected[name].dtype, device=flat.device)
            selected[torch.searchsorted(new, idx[stay])] = self.selected[name][stay]
            selected[torch.searchsorted(new, grow.to(new.device))] = flat[grow.to(flat.device)]
            self.selected[name] = selected
            self.ever[name][grow.cpu()] = True
            indices[name] = new.cpu()
            changed.append(name)
            dropped_total, regrown_total = dropped_total + n, regrown_total + n
        self.history.append({"step": self.step, "fraction": frac, "dropped": dropped_total, "regrown": regrown_total})
        mask = dataclasses.replace(self.guard.mask, indices=indices,
                                   meta={**self.guard.mask.meta, "refresh": self.history_record(indices)})
        for name in changed:
            self.guard.set_kept(self.by_name[name], indices[name])
        self.guard.mask = mask
        self._sums.clear()

    def _migrate(self, p: Tensor, old: Tensor, new: Tensor, stay: Tensor, grown: Tensor, name: str) -> None:
        """Carry the optimizer state of ``p`` over to its new kept entries (see the module docstring); ``stay``:
        which of the ``old`` kept entries remain kept."""
        dropped = old[~stay]
        stats = self.schedule.regrow_state == "stats"
        mean_g = sq_g = None
        if stats:
            s, s2 = self._sums[name]
            mean_g, sq_g = s / self.schedule.window, s2 / self.schedule.window
        for opt in optimizer_chain(self.optimizer):
            state = getattr(opt, "state", {}).get(p)
            if not state:
                continue
            compact = p in getattr(getattr(opt, "local_mask", None), "entries", ())  # SparseAdamW's k moments
            for key, t in state.items():
                if not isinstance(t, Tensor) or t.dim() == 0:
                    continue
                if compact and t.numel() == old.numel():  # SparseAdamW: moments aligned with the kept indices
                    out = torch.zeros(new.numel(), dtype=t.dtype, device=t.device)
                    out[torch.searchsorted(new, old[stay])] = t[stay.to(t.device)]
                    if stats and key in ("exp_avg", "exp_avg_sq"):
                        src = mean_g if key == "exp_avg" else sq_g
                        out[torch.searchsorted(new, grown.to(new.device))] = src[grown].to(t.dtype)
                    state[key] = out
                elif t.shape == p.shape:  # a dense state tensor
                    flat = t.view(-1)
                    flat[dropped.to(t.device)] = 0
                    flat[grown.to(t.device)] = 0
                    if stats and key in ("exp_avg", "exp_avg_sq"):
                        flat[grown.to(t.device)] = (mean_g if key == "exp_avg" else sq_g)[grown].to(t.dtype)

    # ------------------------------------------------------------------ reporting and state
    def ever_kept(self) -> float:
        """Fraction of candidate entries ever trained (the budget must not leak: it grows by regrowth only)."""
        total = sum(f.numel() for f in self.ever.values())
        return sum(int(f.sum()) for f in self.ever.values()) / max(total, 1)

    def moved(self, indices: dict[str, Tensor] | None = None) -> list[int]:
        """Per candidate (in the mask's order): entries kept in ``indices`` (default: the mask in force) that were
        not kept at the first selection."""
        now = self.guard.mask.indices if indices is None else indices
        return [int((~torch.isin(now[n].long().cpu(), self.first[n])).sum()) if n in self.first else 0
                for n in self.guard.mask.names]

    def history_record(self, indices: dict[str, Tensor] | None = None) -> dict:
        return {"schedule": dataclasses.asdict(self.schedule), "history": list(self.history),
                "ever_kept": self.ever_kept(), "moved": self.moved(indices)}

    @property
    def mask(self) -> FishMask:
        """The mask in force now."""
        return self.guard.mask

    def state(self) -> dict:
        return {"step": self.step, "history": list(self.history), "mask": self.guard.mask.to_state(),
                "selected": {n: t.cpu().clone() for n, t in self.selected.items()},
                "ever": {n: f.clone() for n, f in self.ever.items()},
                "first": {n: t.clone() for n, t in self.first.items()},
                "sums": {n: [s.cpu().clone(), s2.cpu().clone()] for n, (s, s2) in self._sums.items()},
                "schedule": dataclasses.asdict(self.schedule)}

    def load(self, state: dict) -> None:
        """Continue from :meth:`state`: its mask in force goes back into the guard, then the schedule resumes."""
        if state.get("schedule") != dataclasses.asdict(self.schedule):
            raise ValueError(f"this run's refresh schedule {dataclasses.asdict(self.schedule)} differs from the "
                             f"checkpoint's {state.get('schedule')}; resume with the same refresh settings")
        mask = FishMask.from_state(state["mask"])
        if set(mask.shapes) != set(self.by_name):
            raise ValueError("the saved refresh state is for other candidate tensors; resume with the same model")
        for name, p in self.by_name.items():
            self.guard.set_kept(p, mask.indices[name])
        self.guard.mask = mask
        self.step, self.history = int(state["step"]), list(state["history"])
        self.selected = {n: t.to(self.by_name[n].device) for n, t in state["selected"].items()}
        self.ever = {n: f.clone() for n, f in state["ever"].items()}
        self.first = {n: t.clone() for n, t in state["first"].items()}
        self._sums = {n: (s.to(self.by_name[n].device), s2.to(self.by_name[n].device))
                      for n, (s, s2) in state["sums"].items()}
        self._arm_tap()

    def _publish(self) -> None:
        """Put the state where the optimizer's state_dict carries it (its first param group, as the mask)."""
        self.optimizer.param_groups[0][REFRESH_KEY] = self.state()

    def _restore(self) -> None:
        saved = self.optimizer.param_groups[0].get(REFRESH_KEY)
        if saved is not None and int(saved["step"]) != self.step:
            self.load(saved)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.guard.set_tap(None)

