"""FishMask: which candidate entries are trained (global top-k of Fisher, Eq. 4-5), and its sparse file format."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from . import allocation
from .checks import is_int, unit_interval
from .files import atomic_write
from .maskfile import check_fingerprint, read_mask_file, saved_names
from .names import adapter_of, agnostic_names, insert_adapter
from .zero3 import full_numel, full_shape

Strategy = Literal["fish", "rand", "rev", "fish_balanced", "fish_rank1"]
STRATEGIES = ("fish", "rand", "rev", "fish_balanced", "fish_rank1")
DEFAULT_ALPHA = 0.5  # fish_balanced's exponent; see BENCHMARKS.md (allocation study) for how it was measured
_FORMAT = "fish-mask"
_VERSION = 1
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def _patterns(spec: str | Iterable[str] | None, arg: str = "pattern") -> list[str]:
    """Regexes of ``spec``, each compiled once here so a bad one is reported under the argument's name."""
    if spec is None:
        return []
    out = [spec] if isinstance(spec, str) else list(spec)
    for pattern in out:
        if not isinstance(pattern, str):
            raise TypeError(f"{arg} must be a regex string or a list of them, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{arg}: {pattern!r} is not a valid regular expression ({err}); escape dots and "
                             r"brackets, e.g. r'layer\.0\.'") from None
    return out


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

    FILE_NAME: ClassVar[str] = "fish_mask.safetensors"  # its name beside a peft adapter / in a checkpoint

    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, Tensor]
    always_train: list[str] = field(default_factory=list)
    always_train_patterns: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # excluded candidates: never trained, not in the budget
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
        """Entries that train: k plus every always-trainable tensor (resolved against ``model`` when given).

        Only parameters that require grad count: an always-train pattern may also match frozen copies (e.g. peft's
        ``classifier.original_module``), which never train.
        """
        if model is None:
            return self.num_selected + int(self.meta.get("always_train_numel", 0))
        skip = set(self.shapes) | set(self.frozen)
        extra = sum(full_numel(p) for n, p in model.named_parameters()
                    if p.requires_grad and n not in skip and self.is_always_train(n))
        return self.num_selected + extra

    def fingerprint(self) -> str:
        """A short hash of the candidates, their shapes and kept indices: equal iff the same entries train."""
        h = hashlib.sha256()
        for name in sorted(self.shapes):
            h.update(f"{name}:{list(self.shapes[name])};".encode())
            h.update(self.indices[name].to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
        h.update(json.dumps(sorted(self.frozen)).encode())
        return h.hexdigest()[:16]

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

    def concentration(self, top: int = 8) -> tuple[float | None, float | None]:
        """Share of each 2-D tensor's kept entries in its ``top`` most-kept lines along the larger (hidden) dimension
        (LoRA A ``[r, d_in]``: columns; B ``[d_out, r]``: rows), pooled over tensors, and the same share for an even
        spread. High values mean the budget sits on a few hidden dimensions. ``(None, None)`` if nothing is 2-D."""
        in_top = kept = 0
        even = 0.0
        for name, shape in self.shapes.items():
            idx = self.indices[name].long()
            if len(shape) != 2 or idx.numel() == 0:
                continue
            axis = 0 if shape[0] >= shape[1] else 1
            lines = idx // shape[1] if axis == 0 else idx % shape[1]
            counts = torch.bincount(lines, minlength=shape[axis])
            in_top += int(counts.topk(min(top, shape[axis])).values.sum())
            kept += idx.numel()
            even += idx.numel() * min(top, shape[axis]) / shape[axis]
        return (None, None) if not kept else (in_top / kept, even / kept)

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
        conc, even = self.concentration()
        if conc is not None:
            lines.append(f"concentration: {100 * conc:.1f}% of kept entries in each tensor's 8 most-kept hidden lines "
                         f"(even spread: {100 * even:.1f}%)")
        if self.always_train:
            lines.append(f"always trainable (outside the budget): {len(self.always_train)} tensors, "
                         f"{int(self.meta.get('always_train_numel', 0)):,} entries")
        return "\n".join(lines)

    # ------------------------------------------------------------------ model checks
    def check(self, model: nn.Module) -> None:
        """Raise ValueError naming the first candidate whose name or shape differs from ``model``'s."""
        named = dict(model.named_parameters())
        for name in self.frozen:
            if name not in named:
                raise ValueError(f"mask does not fit this model: excluded candidate '{name}' is not a parameter of "
                                 "the model (was the mask made for another model or PEFT config?)")
        for name, shape in self.shapes.items():
            if name not in named:
                raise ValueError(f"mask does not fit this model: candidate '{name}' is not a parameter of the model "
                                 "(was the mask made for another model or PEFT config?)")
            if tuple(full_shape(named[name])) != tuple(shape):
                raise ValueError(f"mask does not fit this model: '{name}' has shape {tuple(full_shape(named[name]))} "
                                 f"in the model but {tuple(shape)} in the mask")

    # ------------------------------------------------------------------ in-memory form
    def to_state(self) -> dict:
        """Plain dict of tensors / lists / strings (``torch.load(weights_only=True)`` reads it back)."""
        return {"format": _FORMAT, "version": _VERSION, "shapes": {n: list(s) for n, s in self.shapes.items()},
                "indices": {n: i.to(device="cpu", dtype=torch.int64) for n, i in self.indices.items()},
                "always_train": list(self.always_train), "always_train_patterns": list(self.always_train_patterns),
                "frozen": list(self.frozen), "strategy": self.strategy, "seed": self.seed,
                "meta": json.dumps(self.meta)}

    @classmethod
    def from_state(cls, state: dict) -> FishMask:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a FishMask state (FishMask.to_state() output expected)")
        return cls(shapes={n: tuple(s) for n, s in state["shapes"].items()},
                   indices={n: torch.as_tensor(i, dtype=torch.long) for n, i in state["indices"].items()},
                   always_train=list(state["always_train"]), always_train_patterns=list(state["always_train_patterns"]),
                   frozen=list(state["frozen"]), strategy=state["strategy"], seed=state["seed"],
                   meta=json.loads(state["meta"]))

    # ------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike, model: nn.Module | None = None) -> None:
        """Write a safetensors file atomically (temp file + rename): indices per tensor, metadata as JSON.

        With a peft ``model``, names are stored without the adapter name (``...lora_A.weight``, as peft's own
        state dicts), so the file loads into the same PEFT config under any adapter name.
        """
        from safetensors.torch import save_file

        if model is not None:
            self.check(model)
        rename, adapter = agnostic_names([*self.shapes, *self.always_train, *self.frozen], adapter_of(model))
        tensors = {}
        for name, idx in self.indices.items():
            dtype = torch.int32 if math.prod(self.shapes[name]) < 2**31 else torch.int64
            tensors[rename[name][0]] = idx.to(device="cpu", dtype=dtype).contiguous()
        meta = {
            "format": _FORMAT, "version": _VERSION, "strategy": self.strategy, "seed": self.seed,
            "num_selected": self.num_selected, "shapes": {rename[n][0]: list(s) for n, s in self.shapes.items()},
            "always_train": [rename[n][0] for n in self.always_train],
            "always_train_patterns": self.always_train_patterns, "frozen": [rename[n][0] for n in self.frozen],
            "adapter": None if adapter is None else {"name": adapter, "pos": {a: i for a, i in rename.values()}},
            "fingerprint": self.fingerprint(), "meta": self.meta,
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fish_mask": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None,
             adapter_name: str | None = None) -> FishMask:
        """Read a mask file; with ``model``, also check names and shapes against it. A file whose entries differ
        from its recorded fingerprint is refused (ValueError), as it would train other entries.

        A file saved with adapter-agnostic names gets the adapter name back: ``adapter_name``, else the
        ``model``'s active adapter, else the name it was saved under.
        """
        path = os.fspath(path)
        meta, tensors = read_mask_file(path, _FORMAT)
        adapter = meta.get("adapter")
        target = adapter_name or adapter_of(model) or (adapter or {}).get("name")

        def name_of(stored: str) -> str:
            return stored if adapter is None else insert_adapter(stored, target, adapter["pos"].get(stored, -1))

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
        saved = saved_names(meta)  # the fingerprint was taken under these names, before any adapter remap
        check_fingerprint(path, meta, cls(shapes={saved[n]: s for n, s in shapes.items()},
                                          indices={saved[n]: i for n, i in indices.items()},
                                          frozen=[saved[n] for n in meta.get("frozen", [])]).fingerprint())
        mask = cls(shapes={name_of(n): s for n, s in shapes.items()},
                   indices={name_of(n): i for n, i in indices.items()},
                   always_train=[name_of(n) for n in meta.get("always_train", [])],
                   always_train_patterns=list(meta.get("always_train_patterns", [])),
                   frozen=[name_of(n) for n in meta.get("frozen", [])],
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
    alpha: float = DEFAULT_ALPHA,
) -> FishMask:
    """Keep exactly k entries of all candidates globally (Eq. 4-5).

    ``fish`` keeps the top-k scores, ``rev`` the bottom-k (Eq. 15), ``rand`` a seeded uniform k. Beyond the
    paper (:mod:`fish_tuning.allocation`): ``fish_balanced`` gives each tensor a share of k proportional to its
    Fisher mass to the power ``alpha`` and keeps its top entries; ``fish_rank1`` keeps whole LoRA rank-1
    components by mean Fisher. Ties are broken by position (candidate order, then flat index), so the same scores
    always give the same mask; scores are ranked in their own precision (float64 stays float64). Names matching a
    regex in ``exclude`` are not candidates and never train (``mask.frozen``); names matching ``always_train``
    leave the budget and train fully.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    alpha = unit_interval(alpha, "alpha (fish_balanced's exponent)")
    if strategy == "rand" and not is_int(seed):
        raise ValueError(f"strategy='rand' needs an integer seed (the same seed gives the same mask), got {seed!r}")
    excl, always = _patterns(exclude, "exclude"), _patterns(always_train, "always_train")
    always_names = [n for n in scores if _matches(n, always)]
    excluded = [n for n in scores if _matches(n, excl) and n not in always_names]
    cand = {n: s for n, s in scores.items() if n not in excluded and n not in always_names}
    if not cand:
        raise ValueError("no candidate parameters left to select from (scores empty, or all excluded / always_train)")
    n_total = sum(s.numel() for s in cand.values())
    if n_total == 0:
        raise ValueError(f"every candidate tensor is empty (0 entries: {list(cand)[:3]}); nothing can be selected")
    k = resolve_k(n_total, keep, budget)

    dtype = torch.float32
    for t in cand.values():
        dtype = torch.promote_types(dtype, t.dtype if t.is_floating_point() else torch.float64)
    flat = torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=dtype) for t in cand.values()])
    if not bool(torch.isfinite(flat).all()):
        bad = next(n for n, t in cand.items() if not bool(torch.isfinite(t).all()))
        raise ValueError(f"Fisher scores of '{bad}' contain NaN/inf; recompute them")
    if strategy == "fish_balanced":
        sizes = [t.numel() for t in cand.values()]
        keep_flat = allocation.balanced(list(torch.split(flat, sizes)), k, float(alpha))
    elif strategy == "fish_rank1":
        sizes = [t.numel() for t in cand.values()]
        keep_flat = allocation.rank1({n: f.view(t.shape) for (n, t), f in zip(cand.items(), torch.split(flat, sizes))},
                                     k)
    else:
        if strategy == "rand":
            chosen = torch.randperm(n_total, generator=torch.Generator().manual_seed(int(seed)))[:k]
        else:  # stable sort: equal scores keep their positional order, so ties resolve deterministically
            chosen = torch.sort(flat, descending=(strategy == "fish"), stable=True).indices[:k]
        keep_flat = torch.zeros(n_total, dtype=torch.bool)
        keep_flat[chosen] = True

    shapes, indices, offset = {}, {}, 0
    for name, t in cand.items():
        shapes[name] = tuple(t.shape)
        indices[name] = keep_flat[offset: offset + t.numel()].nonzero().view(-1)
        offset += t.numel()
    always_numel = sum(scores[n].numel() for n in always_names)
    meta = {"k": k, "keep": k / n_total, "always_train_numel": always_numel}
    if strategy == "fish_balanced":
        meta["alpha"] = float(alpha)
    return FishMask(shapes=shapes, indices=indices, always_train=always_names, always_train_patterns=always,
                    frozen=excluded, strategy=strategy, seed=int(seed) if strategy == "rand" else None, meta=meta)


def check_keep_budget(keep: object, budget: object) -> tuple[float | None, int | None]:
    """Validate ``keep`` / ``budget`` before any work: exactly one, keep a fraction in (0, 1], budget >= 1.

    Accepts numpy scalars and 0-d tensors; returns them as a Python float / int.
    """
    if (keep is None) == (budget is None):
        raise ValueError("give exactly one of keep= (fraction in (0, 1]) or budget= (number of entries)")
    if budget is not None:
        value = budget.item() if isinstance(budget, Tensor) and budget.dim() == 0 else budget
        if not is_int(value) or int(value) < 1:
            raise ValueError(f"budget must be a positive integer (a number of entries), got {budget!r}")
        return None, int(value)
    value = keep.item() if isinstance(keep, Tensor) and keep.dim() == 0 else keep
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}; use budget= for an entry count")
    return float(value), None


def resolve_k(n_total: int, keep: float | None, budget: int | None) -> int:
    """The exact number of entries to keep among ``n_total`` candidates."""
    keep, budget = check_keep_budget(keep, budget)
    if budget is not None:
        if budget > n_total:
            raise ValueError(f"budget must be an integer in [1, {n_total:,}] (the number of candidates), got {budget}")
        return budget
    return max(1, min(n_total, round(keep * n_total)))
