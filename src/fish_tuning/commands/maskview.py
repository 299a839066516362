"""Where a FISH mask's budget goes: a layers x modules grid (A / B and other kinds as separate columns), the
table `fish-tune mask` prints, the JSON summary it writes, and the PNG heat map.

The grid is what tells a user whether FISH concentrated the budget (top layers, value over query, B over A) or
spread it; the per-layer / per-kind totals alone hide which module of which layer took the entries.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..mask import FishMask, atomic_write, layer_of, module_of


def grid(mask: FishMask) -> dict[str, Any]:
    """{"layers": [...], "kinds": [...], "kept": [[...]], "total": [[...]]}; layer None is shown as "-"."""
    cells: dict[tuple[int | None, str], list[int]] = {}
    for name, (kept, total) in mask.per_tensor().items():
        acc = cells.setdefault((layer_of(name), module_of(name)), [0, 0])
        acc[0] += kept
        acc[1] += total
    layers = sorted({k[0] for k in cells}, key=lambda v: (v is None, v or 0))
    kinds = sorted({k[1] for k in cells})
    kept = [[cells.get((lay, kind), [0, 0])[0] for kind in kinds] for lay in layers]
    total = [[cells.get((lay, kind), [0, 0])[1] for kind in kinds] for lay in layers]
    return {"layers": ["-" if lay is None else lay for lay in layers], "kinds": kinds, "kept": kept, "total": total}


def moved_grid(mask: FishMask) -> dict[str, Any] | None:
    """For a mask that moved during training (``meta["refresh"]``): the grid of :func:`grid` with ``kept`` = kept
    entries not kept at the first selection and ``total`` = kept entries (so a cell's % is the share that moved);
    None for a mask that never moved."""
    moved = (mask.meta.get("refresh") or {}).get("moved")
    if moved is None or len(moved) != len(mask.names):
        return None
    counts = dict(zip(mask.names, moved))
    shifted = FishMask(shapes=mask.shapes, indices={n: torch.zeros(counts[n]) for n in mask.names})
    base, now = grid(mask), grid(shifted)
    return {**base, "kept": now["kept"], "total": base["kept"]}


def summary_dict(mask: FishMask, model: Any = None) -> dict[str, Any]:
    """JSON-ready counts: totals, per layer, per kind, the grid, and the recorded FISH settings / Fisher totals."""
    k, n = mask.num_selected, mask.num_candidates
    return {
        "strategy": mask.strategy, "num_selected": k, "num_candidates": n, "keep": k / max(n, 1),
        "trainable": mask.trainable_count(model), "fingerprint": mask.fingerprint(),
        "per_layer": [["-" if lay is None else lay, kept, total] for lay, (kept, total) in mask.per_layer().items()],
        "per_kind": {module: [kept, total] for module, (kept, total) in mask.per_module().items()},
        "grid": grid(mask), "always_train": list(mask.always_train), "frozen": list(mask.excluded),
        "fish_config": mask.meta.get("fish_config"), "fisher": mask.meta.get("fisher"),
        "refresh": mask.meta.get("refresh"), "moved_grid": moved_grid(mask),
    }


def write_summary(mask: FishMask, path: str | os.PathLike, model: Any = None) -> dict[str, Any]:
    """Write :func:`summary_dict` as JSON atomically; returns it."""
    data = summary_dict(mask, model)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    atomic_write(path, write)
    return data


def grid_table(g: dict[str, Any]) -> str:
    """The grid as text: one row per layer, one column per module kind, cells = kept entries (% of the cell)."""
    width = max([10, *(len(k) + 1 for k in g["kinds"])])
    lines = [f"{'layer':>6}" + "".join(f"{k:>{width}}" for k in g["kinds"])]
    for lay, kept_row, total_row in zip(g["layers"], g["kept"], g["total"]):
        cells = [f"{kept:,} ({100 * kept / total:.0f}%)" if total else "" for kept, total in zip(kept_row, total_row)]
        lines.append(f"{lay!s:>6}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def check_png_support() -> None:
    """Called before any model loads when a PNG is wanted."""
    import importlib.util

    from .common import CommandError

    if importlib.util.find_spec("matplotlib") is None:
        raise CommandError("the PNG heat map needs matplotlib: pip install 'fish-tuning[cli]', or pass --png none")


def draw_heatmap(g: dict[str, Any], path: str | os.PathLike, title: str = "") -> str:
    """Layers (rows) x module kinds (columns); colour = share of the whole budget k in the cell, text = kept
    entries and the share of the cell's own entries kept. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    kept = np.asarray(g["kept"], dtype=float).reshape(len(g["layers"]), len(g["kinds"]))
    total = np.asarray(g["total"], dtype=float).reshape(kept.shape)
    share = kept / max(kept.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(g["kinds"]), 1.2 + 0.45 * len(g["layers"])))
    im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(g["kinds"])), g["kinds"], rotation=30, ha="right")
    ax.set_yticks(range(len(g["layers"])), [str(lay) for lay in g["layers"]])
    ax.set_ylabel("layer")
    for i in range(kept.shape[0]):
        for j in range(kept.shape[1]):
            if total[i, j]:
                ax.text(j, i, f"{int(kept[i, j]):,}\n{100 * kept[i, j] / total[i, j]:.0f}%", ha="center",
                        va="center", fontsize=7, color="white" if share[i, j] < 0.6 * share.max() else "black")
    fig.colorbar(im, ax=ax, label="share of the budget k")
    ax.set_title(title or "FISH mask: kept entries per layer and module (cell text: count, % of cell)", fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
