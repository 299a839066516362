"""FishMask: which candidate entries are trained (global top-k of Fisher, Eq. 4-5), and its sparse file format."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

Strategy = Literal["fish", "rand", "rev"]
STRATEGIES = ("fish", "rand", "rev")
_FORMAT = "fish-mask"
_VERSION = 1
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def _patterns(spec: str | Iterable[str] | None) -> list[str]:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str) else list(spec)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def layer_of(name: str) -> int | None:
    """Transformer layer index in a parameter name (``...layer.3.`` / ``layers.3.`` / ``h.3.``), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass
class FishMask:
    """Kept entries of each candidate tensor as sorted flat indices, plus the always-trainable names.

    Indices (not dense bool tensors) are the storage format: a 5% mask costs ~5% of an int32 per entry on disk.
    """

    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, Tensor]
    always_train: list[str] = field(default_factory=list)
    always_train_patterns: list[str] = field(default_factory=list)
    strategy: str = "fish"
    seed: int | None = None
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ counts
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def num_selected(self) -> int:
        """k: the number of kept (trainable) candidate entries."""
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def num_candidates(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def bool_mask(self, name: str, device: torch.device | str | None = None) -> Tensor:
        """Dense bool mask (True = trainable) of one candidate tensor."""
        flat = torch.zeros(math.prod(self.shapes[name]), dtype=torch.bool, device=device)
        flat[self.indices[name].to(device=flat.device, dtype=torch.long)] = True
        return flat.view(self.shapes[name])

    def is_always_train(self, name: str) -> bool:
        return name in self.always_train or _matches(name, self.always_train_patterns)

    def trainable_count(self, model: nn.Module | None = None) -> int:
        """Entries that train: k plus every always-trainable tensor (resolved against ``model`` when given)."""
        if model is None:
            return self.num_selected + int(self.meta.get("always_train_numel", 0))
        extra = sum(p.numel() for n, p in model.named_parameters() if n not in self.shapes and self.is_always_train(n))
        return self.num_selected + extra

    # ------------------------------------------------------------------ analytics
    def per_tensor(self) -> dict[str, tuple[int, int]]:
        """name -> (kept, total)."""
        return {n: (int(self.indices[n].numel()), math.prod(s)) for n, s in self.shapes.items()}

    def per_layer(self) -> dict[int | None, tuple[int, int]]:
        """layer index (None: not in a numbered layer) -> (kept, total), in layer order."""
        out: dict[int | None, list[int]] = {}
        for n, (kept, total) in self.per_tensor().items():
            acc = out.setdefault(layer_of(n), [0, 0])
            acc[0] += kept
            acc[1] += total
        order = sorted(out, key=lambda k: (k is None, k if k is not None else 0))
        return {k: (out[k][0], out[k][1]) for k in order}

    def per_kind(self) -> dict[str, tuple[int, int]]:
        """Short parameter kind (e.g. ``query.lora_A``) -> (kept, total), to see whether A, B, m... are all used."""
        out: dict[str, list[int]] = {}
        for n, (kept, total) in self.per_tensor().items():
            parts = [p for p in n.split(".") if p not in ("weight", "default", "base_layer") and not p.isdigit()]
            acc = out.setdefault(".".join(parts[-2:]), [0, 0])
            acc[0] += kept
            acc[1] += total
        return {k: (v[0], v[1]) for k, v in sorted(out.items())}

    def summary(self, per_tensor: bool = False) -> str:
        """Human-readable per-layer and per-kind (and with ``per_tensor``, per-tensor) counts of kept entries."""
        k, n = self.num_selected, self.num_candidates
        lines = [f"FishMask strategy={self.strategy} kept {k:,} of {n:,} candidate entries ({100 * k / max(n, 1):.3f}%)"]
        lines.append(f"{'layer':>8} {'kept':>10} {'total':>10} {'kept %':>8}")
        for layer, (kept, total) in self.per_layer().items():
            label = "-" if layer is None else str(layer)
            lines.append(f"{label:>8} {kept:>10,} {total:>10,} {100 * kept / max(total, 1):>7.2f}%")
        lines.append(f"{'kind':>24} {'kept':>10} {'total':>10}")
        for kind, (kept, total) in self.per_kind().items():
            lines.append(f"{kind:>24} {kept:>10,} {total:>10,}")
        if per_tensor:
            for name, (kept, total) in self.per_tensor().items():
                lines.append(f"{kept:>10,} / {total:>10,}  {name}")
        if self.always_train:
            lines.append(f"always trainable (outside the budget): {len(self.always_train)} tensors, "
                         f"{int(self.meta.get('always_train_numel', 0)):,} entries")
        return "\n".join(lines)

    # ------------------------------------------------------------------ model checks
    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming the first candidate whose name or shape differs from ``model``'s."""
        named = dict(model.named_parameters())
        for name, shape in self.shapes.items():
            if name not in named:
                raise ValueError(f"mask does not fit this model: candidate '{name}' is not a parameter of the model "
                                 "(was the mask made for another model or PEFT config?)")
            if tuple(named[name].shape) != tuple(shape):
                raise ValueError(f"mask does not fit this model: '{name}' has shape {tuple(named[name].shape)} "
                                 f"in the model but {tuple(shape)} in the mask")

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file + rename): indices per tensor, metadata as JSON."""
        from safetensors.torch import save_file

        tensors = {}
        for name, idx in self.indices.items():
            dtype = torch.int32 if math.prod(self.shapes[name]) < 2**31 else torch.int64
            tensors[name] = idx.to(device="cpu", dtype=dtype).contiguous()
        meta = {
            "format": _FORMAT, "version": _VERSION, "strategy": self.strategy, "seed": self.seed,
            "num_selected": self.num_selected, "shapes": {n: list(s) for n, s in self.shapes.items()},
            "always_train": self.always_train, "always_train_patterns": self.always_train_patterns,
            "meta": self.meta,
        }
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fish_mask.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"fish_mask": json.dumps(meta)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> FishMask:
        """Read a mask file; with ``model``, also check names and shapes against it."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"mask file not found: {path}")
        try:
            with safe_open(path, framework="pt") as f:
                raw = (f.metadata() or {}).get("fish_mask")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = json.loads(raw) if raw else None
        except Exception as err:  # safetensors raises several types for damaged headers/bodies
            raise ValueError(f"corrupt mask file {path}: {err}. Recreate it with select_mask(...).save()") from err
        if not meta or meta.get("format") != _FORMAT:
            raise ValueError(f"corrupt mask file {path}: no fish-mask metadata (not written by FishMask.save)")
        shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        if set(shapes) != set(tensors):
            raise ValueError(f"corrupt mask file {path}: index tensors do not match the recorded candidates")
        indices = {}
        for name in shapes:
            idx = tensors[name].to(torch.long)
            numel = math.prod(shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel or bool((idx[1:] <= idx[:-1]).any())):
                raise ValueError(f"corrupt mask file {path}: indices of '{name}' are out of range or unsorted")
            indices[name] = idx
        mask = cls(shapes=shapes, indices=indices, always_train=list(meta.get("always_train", [])),
                   always_train_patterns=list(meta.get("always_train_patterns", [])),
                   strategy=meta.get("strategy", "fish"), seed=meta.get("seed"), meta=dict(meta.get("meta", {})))
        if mask.num_selected != meta.get("num_selected"):
            raise ValueError(f"corrupt mask file {path}: {mask.num_selected} indices but header says "
                             f"{meta.get('num_selected')}")
        if model is not None:
            mask.check(model)
        return mask


def select_mask(
    scores: Mapping[str, Tensor],
    keep: float | None = None,
    budget: int | None = None,
    strategy: Strategy = "fish",
    seed: int = 0,
    exclude: str | Iterable[str] | None = None,
    always_train: str | Iterable[str] | None = None,
) -> FishMask:
    """Keep exactly k entries of all candidates globally (Eq. 4-5).

    ``fish`` keeps the top-k scores, ``rev`` the bottom-k (Eq. 15), ``rand`` a seeded uniform k. Ties are broken
    by position (candidate order, then flat index), so the same scores always give the same mask. Names matching a
    regex in ``exclude`` are not candidates; names matching ``always_train`` leave the budget and train fully.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    excl, always = _patterns(exclude), _patterns(always_train)
    always_names = [n for n in scores if _matches(n, always)]
    cand = {n: s for n, s in scores.items() if not _matches(n, excl) and n not in always_names}
    if not cand:
        raise ValueError("no candidate parameters left to select from (scores empty, or all excluded / always_train)")
    n_total = sum(s.numel() for s in cand.values())
    k = _resolve_k(n_total, keep, budget)

    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in cand.values()])
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, s in cand.items() if not bool(torch.isfinite(s).all()))
        raise ValueError(f"Fisher scores of '{bad}' contain NaN/inf; recompute them")
    if strategy == "rand":
        chosen = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:k]
    else:  # stable sort: equal scores keep their positional order, so ties resolve deterministically
        chosen = torch.sort(flat, descending=(strategy == "fish"), stable=True).indices[:k]
    keep_flat = torch.zeros(n_total, dtype=torch.bool)
    keep_flat[chosen] = True

    shapes, indices, offset = {}, {}, 0
    for name, s in cand.items():
        shapes[name] = tuple(s.shape)
        indices[name] = keep_flat[offset: offset + s.numel()].nonzero().view(-1)
        offset += s.numel()
    always_numel = sum(scores[n].numel() for n in always_names)
    meta = {"k": k, "keep": k / n_total, "always_train_numel": always_numel}
    return FishMask(shapes=shapes, indices=indices, always_train=always_names, always_train_patterns=always,
                    strategy=strategy, seed=seed if strategy == "rand" else None, meta=meta)


def _resolve_k(n_total: int, keep: float | None, budget: int | None) -> int:
    if (keep is None) == (budget is None):
        raise ValueError("give exactly one of keep= (fraction in (0, 1]) or budget= (number of entries)")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 < budget <= n_total:
            raise ValueError(f"budget must be an integer in [1, {n_total:,}] (the number of candidates), got {budget!r}")
        return budget
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}; use budget= for an entry count")
    return max(1, min(n_total, round(keep * n_total)))
