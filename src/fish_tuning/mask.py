"""FishMask: which candidate entries are trained, and its sparse file format (selection: :mod:`fish_tuning.selection`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .files import atomic_write
from .names import adapter_of, agnostic_names, insert_adapter
from .zero3 import full_numel, full_shape

_FORMAT = "fish-mask"
_VERSION = 1
# Files and to_state() keep excluded candidates under the key "frozen": renaming it would leave every saved mask
# (and every checkpoint carrying one) unreadable.
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


def module_of(name: str) -> str:
    """Short module + parameter of a candidate, e.g. ``query.lora_A`` (whatever the adapter's name: the one after a
    peft parameter, ``lora_A.<adapter>.weight``, is dropped): where a mask puts its budget, per module."""
    parts = [p for p in name.split(".") if p not in ("weight", "base_layer") and not p.isdigit()]
    for i, part in enumerate(parts):
        if part.startswith(("lora_", "ia3_")):
            return f"{parts[i - 1]}.{part}" if i else part
    parts = [p for p in parts if p != "default"]
    return ".".join(parts[-2:])


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
    excluded: list[str] = field(default_factory=list)  # candidates left out of selection: never trained
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
        skip = set(self.shapes) | set(self.excluded)
        extra = sum(full_numel(p) for n, p in model.named_parameters()
                    if p.requires_grad and n not in skip and self.is_always_train(n))
        return self.num_selected + extra

    def fingerprint(self) -> str:
        """A short hash of the candidates, their shapes and kept indices: equal iff the same entries train."""
        h = hashlib.sha256()
        for name in sorted(self.shapes):
            h.update(f"{name}:{list(self.shapes[name])};".encode())
            h.update(self.indices[name].to(device="cpu", dtype=torch.int64).contiguous().numpy().tobytes())
        h.update(json.dumps(sorted(self.excluded)).encode())
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

    def per_module(self) -> dict[str, tuple[int, int]]:
        """:func:`module_of` (e.g. ``query.lora_A``) -> (kept, total), to see whether A, B, m... are all used."""
        out: dict[str, list[int]] = {}
        for n, (kept, total) in self.per_tensor().items():
            acc = out.setdefault(module_of(n), [0, 0])
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
        """Human-readable per-layer and per-module (and with ``per_tensor``, per-tensor) counts of kept entries."""
        k, n = self.num_selected, self.num_candidates
        lines = [f"FishMask strategy={self.strategy} kept {k:,} of {n:,} candidate entries ({100 * k / max(n, 1):.3f}%)"]
        lines.append(f"{'layer':>8} {'kept':>10} {'total':>10} {'kept %':>8}")
        for layer, (kept, total) in self.per_layer().items():
            label = "-" if layer is None else str(layer)
            lines.append(f"{label:>8} {kept:>10,} {total:>10,} {100 * kept / max(total, 1):>7.2f}%")
        lines.append(f"{'module':>24} {'kept':>10} {'total':>10}")
        for module, (kept, total) in self.per_module().items():
            lines.append(f"{module:>24} {kept:>10,} {total:>10,}")
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
        for name in self.excluded:
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
                "frozen": list(self.excluded), "strategy": self.strategy, "seed": self.seed,
                "meta": json.dumps(self.meta)}

    @classmethod
    def from_state(cls, state: dict) -> FishMask:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError("not a FishMask state (FishMask.to_state() output expected)")
        return cls(shapes={n: tuple(s) for n, s in state["shapes"].items()},
                   indices={n: torch.as_tensor(i, dtype=torch.long) for n, i in state["indices"].items()},
                   always_train=list(state["always_train"]), always_train_patterns=list(state["always_train_patterns"]),
                   excluded=list(state["frozen"]), strategy=state["strategy"], seed=state["seed"],
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
        rename, adapter = agnostic_names([*self.shapes, *self.always_train, *self.excluded], adapter_of(model))
        tensors = {}
        for name, idx in self.indices.items():
            dtype = torch.int32 if math.prod(self.shapes[name]) < 2**31 else torch.int64
            tensors[rename[name][0]] = idx.to(device="cpu", dtype=dtype).contiguous()
        meta = {
            "format": _FORMAT, "version": _VERSION, "strategy": self.strategy, "seed": self.seed,
            "num_selected": self.num_selected, "shapes": {rename[n][0]: list(s) for n, s in self.shapes.items()},
            "always_train": [rename[n][0] for n in self.always_train],
            "always_train_patterns": self.always_train_patterns, "frozen": [rename[n][0] for n in self.excluded],
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
        meta, tensors = _read_file(path, _FORMAT)
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
        saved = _saved_names(meta)  # the fingerprint was taken under these names, before any adapter remap
        _check_fingerprint(path, meta, cls(shapes={saved[n]: s for n, s in shapes.items()},
                                           indices={saved[n]: i for n, i in indices.items()},
                                           excluded=[saved[n] for n in meta.get("frozen", [])]).fingerprint())
        mask = cls(shapes={name_of(n): s for n, s in shapes.items()},
                   indices={name_of(n): i for n, i in indices.items()},
                   always_train=[name_of(n) for n in meta.get("always_train", [])],
                   always_train_patterns=list(meta.get("always_train_patterns", [])),
                   excluded=[name_of(n) for n in meta.get("frozen", [])],
                   strategy=meta.get("strategy", "fish"), seed=meta.get("seed"), meta=dict(meta.get("meta", {})))
        if mask.num_selected != meta.get("num_selected"):
            raise ValueError(f"corrupt mask file {path}: {mask.num_selected} indices but header says "
                             f"{meta.get('num_selected')}")
        if model is not None:
            mask.check(model)
        return mask


def _read_file(path: str, fmt: str) -> tuple[dict, dict[str, Tensor]]:
    """The ``fish_mask`` metadata and index tensors of a safetensors file; every unreadable case is a clear error
    (a folder, a missing file, a damaged file, a file not written by ``FishMask.save``)."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; pass the mask file inside it "
                                "(e.g. os.path.join(folder, 'fish_mask.safetensors'))")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("fish_mask")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        meta = json.loads(raw) if raw else None
    except Exception as err:  # safetensors raises several types for damaged headers/bodies
        raise ValueError(f"corrupt mask file {path}: {err}. Recreate it with select_mask(...).save()") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise ValueError(f"corrupt mask file {path}: no fish-mask metadata (not written by FishMask.save)")
    return meta, tensors


def _check_fingerprint(path: str, meta: dict, actual: str) -> None:
    """Refuse a file whose entries are not the ones it was saved with: range / order / count checks miss an index
    moved to a free neighbour, which would silently train other entries. Files without a fingerprint load."""
    recorded = meta.get("fingerprint")
    if recorded is not None and recorded != actual:
        raise ValueError(f"corrupt mask file {path}: fingerprint {actual} of its entries does not match the recorded "
                         f"{recorded} (damaged or edited); re-create or re-download it")


def _saved_names(meta: dict) -> dict[str, str]:
    """Stored (adapter-agnostic) name -> the name the mask had when saved, under which its fingerprint was taken."""
    adapter = meta.get("adapter")
    stored = [*meta["shapes"], *meta.get("frozen", [])]
    if adapter is None:
        return {n: n for n in stored}
    return {n: insert_adapter(n, adapter["name"], adapter["pos"].get(n, -1)) for n in stored}
