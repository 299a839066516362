"""What a calibration batch holds: its samples, which of them carry a label, and whether rows are packed.

:func:`~fish_tuning.compute_fisher` squares each *sample's* gradient, so a row must be one sample. A padding-free
collator (``transformers.DataCollatorWithFlattening``, TRL ``padding_free=True``) concatenates several examples
into one row; squaring that row's gradient is the squared gradient of a sum of examples, the wrong quantity, and
nothing in the gradients shows it. The collator's own markers do: position ids that restart at 0 inside a row,
flash-attention ``cu_seq_lens_*`` boundaries or ``seq_idx``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

IGNORE_INDEX = -100  # a label the model's own loss (CrossEntropyLoss, the Trainer) ignores
CU_SEQ_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


def batch_size_of(batch: Mapping[str, object]) -> int:
    """Rows (samples) of a batch; raises if it has no labels or its rows are packed examples."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"compute_fisher needs batches that are dicts with a 'labels' entry (got {keys}). "
            "Add labels to each batch (e.g. a DataCollator that sets 'labels'); the Fisher is the gradient of "
            "log p(labels | inputs)."
        )
    check_not_packed(batch)
    return int(torch.as_tensor(labels).shape[0])


def slice_batch(batch: Mapping[str, object], start: int, stop: int, size: int, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            value = value[start:stop] if value.dim() > 0 and value.shape[0] == size else value
            value = value.to(device)
        out[key] = value
    return out


def packed_reason(batch: Mapping[str, object]) -> str | None:
    """Why a row of ``batch`` holds several examples, or None.

    Position ids are read only at attended tokens (``attention_mask``), so a left-padded row whose padding sits
    at position 0 or 1 is not mistaken for a restart. One example per flattened batch (``cu_seq_lens`` of two
    entries) is a single sample and passes.
    """
    for key in CU_SEQ_KEYS:
        cu = batch.get(key)
        if isinstance(cu, Tensor) and cu.numel() > 2:
            return f"'{key}' marks {cu.numel() - 1} sequences in one flattened batch"
    seq_idx = batch.get("seq_idx")
    if isinstance(seq_idx, Tensor) and seq_idx.dim() >= 1 and seq_idx.numel():
        rows = seq_idx.reshape(-1, seq_idx.shape[-1])
        if bool((rows != rows[:, :1]).any()):
            return "'seq_idx' changes inside a row"
    pos = batch.get("position_ids")
    if isinstance(pos, Tensor) and pos.dim() in (1, 2) and pos.shape[-1] > 1:
        pos = pos.reshape(-1, pos.shape[-1])
        mask = batch.get("attention_mask")
        real = (torch.as_tensor(mask).reshape(pos.shape) != 0 if isinstance(mask, Tensor) and mask.numel() ==
                pos.numel() else torch.ones_like(pos, dtype=torch.bool))
        restart = (pos == 0) & real & (real.long().cumsum(1) > 1)  # position 0 after a row's first real token
        if bool(restart.any()):
            row = int(restart.any(1).nonzero()[0])
            return (f"'position_ids' restart at 0 inside row {row} ({int(restart[row].sum()) + 1} examples in "
                    "one row)")
    return None


def check_not_packed(batch: Mapping[str, object]) -> None:
    why = packed_reason(batch)
    if why is None:
        return
    raise ValueError(
        f"compute_fisher got a packed (padding-free) batch: {why}. Each such row concatenates several examples "
        "(transformers' DataCollatorWithFlattening, TRL padding_free=True or packing), so its gradient is the "
        "gradient of a sum of examples and its square is not the per-sample Fisher. Calibrate with a padding "
        "collator (DataCollatorWithPadding, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq) or the "
        "unpacked dataset. FishCallback batches its calibration examples with the Trainer's own collator: "
        "compute the mask first (ft.compute_fisher on padded batches, then ft.select_mask) and pass "
        "FishCallback(mask=...)."
    )


def labelled_rows(labels: object) -> Tensor | None:
    """Which rows carry a label, for class-index labels ``[B]`` (-100: none, as CrossEntropyLoss's
    ``ignore_index``); None where every row is a sample (sequence labels, regression, multi-label)."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
        return labels != IGNORE_INDEX
    return None


def probe_row(labels: object, rows: int) -> int:
    """The last row with any label that is not -100 (the grouping probe compares a row that has a gradient)."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 0 or labels.is_floating_point() or labels.shape[0] != rows:
        return rows - 1
    some = (labels.reshape(rows, -1) != IGNORE_INDEX).any(1).nonzero()
    return int(some[-1]) if some.numel() else rows - 1
