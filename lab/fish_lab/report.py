"""`python -m fish_lab report`: the paper-style table and plots, rebuilt from a results.jsonl file alone."""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from pathlib import Path

from fish_tuning.files import atomic_write, atomic_write_text

from .results import read_results
from .stats import mask_table, paired_table

STRATEGY_ORDER = {"original": 0, "fish": 1, "rand": 2, "rev": 3}
LABEL = {"original": "Original", "fish": "FISH", "rand": "rand", "rev": "rev"}
TASK_NAME = {"cola": "CoLA (MCC)", "mrpc": "MRPC (F1+acc)/2", "rte": "RTE (acc)", "sst2": "SST-2 (acc)",
             "stsb": "STS-B (P+S)/2", "wnli": "WNLI (acc)", "gsm8k": "GSM8K (EM)"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _order(strategy: str) -> int:
    return STRATEGY_ORDER.get(strategy, len(STRATEGY_ORDER))


def _row_label(method: str, mode: str, budget: float, strategy: str, rank: int | None = None) -> str:
    name = f"{method.upper()} {LABEL.get(strategy, strategy)}"
    if mode == "fixed_layers":
        return name + (" (dense)" if strategy == "original" else f" keep {100 * budget:g}%")
    r = f" r{rank}" if rank is not None else ""
    return name + (f"{r} top-{budget:g} layers" if strategy == "original" else f"{r} pool = top-{budget:g} budget")


def _labeler(records: list[dict]):
    """label((method, budget, strategy)) for the paired and mask tables, with the mode and rank of those runs."""
    info = {(r["method"], r["budget"], r["strategy"]): (r["mode"], r.get("rank")) for r in records}
    return lambda key: _row_label(key[0], info[key][0], key[1], key[2], info[key][1])


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["mode"], r["budget"], r["strategy"])].append(r)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3] != "original", -kv[0][2],
                                                          _order(kv[0][3]))))


def _counted(records: list[dict], tasks: list[str]) -> list[str]:
    """Tasks that enter the average: all but the config's ``average_excludes`` (e.g. WNLI)."""
    excluded = set(records[-1].get("config", {}).get("average_excludes") or [])
    return [t for t in tasks if t not in excluded] or tasks


def _trivial_row(records: list[dict], tasks: list[str], n_cols: int) -> str | None:
    """Score of the input-blind prediction (majority class / constant) on the same evaluation examples."""
    cells = []
    for t in tasks:
        vals = [r["trivial"]["score"] for r in records if r["task"] == t and isinstance(r.get("trivial"), dict)
                and isinstance(r["trivial"].get("score"), (int, float))]
        cells.append(f"{100 * statistics.fmean(vals):.2f}" if vals else "-")
    if all(c == "-" for c in cells):
        return None
    row = ["trivial baseline (majority class / constant)", "0", "-", "-", *cells]
    return "| " + " | ".join(row + ["-"] * (n_cols - len(row))) + " |"


def table(records: list[dict], value: str = "score") -> str:
    """Markdown table like the paper's Tables 1/3/9: per-task mean +- std over seeds (x100), and the average."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    scale = 1.0 if value == "dev_loss" else 100.0
    names = [TASK_NAME.get(t, t) if value == "score" else f"{t} dev loss" for t in tasks]
    head = ["method", "trainable PEFT", "% of model", "head (always)", *names]
    counted = _counted(records, tasks)
    if len(tasks) > 1:
        head.append("Avg" if counted == tasks else f"Avg (without {', '.join(sorted(set(tasks) - set(counted)))})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    trivial = _trivial_row(records, tasks, len(head)) if value == "score" else None
    if trivial:
        lines.append(trivial)
    for (method, mode, budget, strategy), recs in _groups(records).items():
        by_task = defaultdict(dict)
        for r in recs:
            by_task[r["task"]][r["seed"]] = r["score"] if value == "score" else r["epochs"][-1]["dev_loss"]
        peft = statistics.fmean(r["trainable"]["peft"] for r in recs)
        prop = statistics.fmean(r["trainable"]["proportion"] for r in recs)
        heads = sorted({r["trainable"]["always_train"] for r in recs})
        cells = [_row_label(method, mode, budget, strategy, recs[0].get("rank")), f"{peft:,.0f}", f"{100 * prop:.4f}%",
                 "/".join(f"{h:,}" for h in heads)]
        for t in tasks:
            vals = [v * scale for v in by_task[t].values()]
            cells.append(f"{_mean_std(vals)[0]:.2f} ± {_mean_std(vals)[1]:.2f}" if vals else "-")
        if len(tasks) > 1:
            seeds = (set.intersection(*(set(by_task[t]) for t in counted)) if all(by_task[t] for t in counted)
                     else set())
            if seeds:  # std over seeds of the per-seed average across tasks
                avg = [statistics.fmean(by_task[t][s] * scale for t in counted) for s in sorted(seeds)]
                cells.append(f"{_mean_std(avg)[0]:.2f} ± {_mean_std(avg)[1]:.2f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _atomic_savefig(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _axes(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def plot_score_vs_proportion(records: list[dict], path: Path) -> None:
    """Paper Fig. 4/5: dev score against the proportion of trainable PEFT parameters, one line per strategy."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    plt, fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
        lines: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
        for r in records:
            if r["task"] == task:
                lines[(r["method"], r["strategy"])][100 * r["trainable"]["proportion"]].append(100 * r["score"])
        for (method, strategy), pts in sorted(lines.items(), key=lambda kv: _order(kv[0][1])):
            xs = sorted(pts)
            means = [_mean_std(pts[x])[0] for x in xs]
            stds = [_mean_std(pts[x])[1] for x in xs]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3,
                        label=f"{method.upper()} {LABEL.get(strategy, strategy)}")
        ax.set_xscale("log")
        ax.set_title(TASK_NAME.get(task, task))
        ax.set_xlabel("trainable PEFT parameters (% of model)")
        ax.set_ylabel("dev score x100")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    _atomic_savefig(fig, path)
    plt.close(fig)


def plot_epochs(records: list[dict], path: Path) -> None:
    """Paper Fig. 6/7: dev score after each epoch, mean over seeds, one line per strategy and budget."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    plt, fig, axes = _axes(len(tasks))
    for ax, task in zip(axes, tasks):
        curves: dict[tuple, list[list[float]]] = defaultdict(list)
        for r in records:
            if r["task"] == task:
                curves[(r["method"], r["mode"], r["budget"], r["strategy"])].append(
                    [100 * e["dev_score"] for e in r["epochs"]])
        for key, runs in sorted(curves.items(), key=lambda kv: (kv[0][2], _order(kv[0][3]))):
            n = min(len(c) for c in runs)
            mean = [statistics.fmean(c[i] for c in runs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, marker="o", label=_row_label(*key))
        ax.set_title(TASK_NAME.get(task, task))
        ax.set_xlabel("epoch")
        ax.set_ylabel("dev score x100")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _atomic_savefig(fig, path)
    plt.close(fig)


def _lr_note(cfg: dict) -> str:
    per = cfg.get("lr_by_budget") or {}
    return f" (by budget: {', '.join(f'{b}: {lr}' for b, lr in per.items())})" if per else ""


def _paired_section(records: list[dict]) -> list[str]:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    label = _labeler(records)
    out = []
    if len({r["seed"] for r in records}) > 1:
        out += ["Paired differences a − b over seeds (x100): mean [95% t interval] and on how many seeds a is ahead. "
                "The average column averages the tasks per seed first.", "",
                paired_table(records, label, tasks, TASK_NAME, _counted(records, tasks)), "",
                "The same for the loss after the last epoch (lower is better, so a is ahead where the difference is "
                "negative); it ranks runs that all sit at the trivial score:", "",
                paired_table(records, label, tasks, TASK_NAME, _counted(records, tasks), value="dev_loss"), ""]
    masks = mask_table(records, label)
    if masks:
        out += ["Where the masks put the budget (mean over tasks and seeds): share of the kept entries per layer; "
                "top-8 concentration = share of each tensor's kept entries in its 8 most-kept rows / columns "
                "(even spread: the same share if every row / column kept alike).", "", masks, ""]
    return out


def _wall_time(records: list[dict]) -> str:
    total = sum(r.get("wall_seconds", 0) for r in records) / 60
    times = [r["finished"] for r in records if isinstance(r.get("finished"), (int, float))]
    span = ""
    if len(times) > 1:
        span = f" (first to last finished run: {(max(times) - min(times)) / 3600:.1f} h, all sessions together)"
    per = f"; {total / len(records):.1f} min per run" if records else ""
    devices: dict[str, list[float]] = {}
    for r in records:
        devices.setdefault(str(r.get("device", "unrecorded")), []).append(r.get("wall_seconds", 0) / 60)
    split = "" if len(devices) < 2 else "; by machine: " + ", ".join(  # a minute of GPU is not a minute of CPU
        f"{d} {sum(m):.1f} min over {len(m)} runs" for d, m in sorted(devices.items()))
    return f"Wall time: {total:.1f} min over all runs{per}{span}{split}."


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>_score_vs_proportion.png`` and ``<stem>_epochs.png`` beside the results."""
    results = Path(results)
    if not results.is_file():
        raise FileNotFoundError(f"results file {results} not found (run fish-tune compare CONFIG first)")
    records = read_results(results)
    if not records:
        raise ValueError(f"results file {results} holds no runs")
    out = Path(out_dir) if out_dir else results.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / f"{results.stem}.md", "proportion_plot": out / f"{results.stem}_score_vs_proportion.png",
             "epoch_plot": out / f"{results.stem}_epochs.png"}
    mask_plot = out / f"{results.stem}_mask_layers.png"
    for path in (*paths.values(), mask_plot):  # never write the report over the runs it is made from
        if path.exists() and path.resolve() == results.resolve():
            raise ValueError(f"the report's {path.name} would overwrite the results file {results}; name the results "
                             "file *.jsonl or pass --out-dir another folder")
    cfg = records[-1].get("config", {})
    train = cfg.get("train", {})
    seeds = sorted({r["seed"] for r in records})
    holdout = train.get("holdout_examples")
    scored = (f"Scores x100 on a held-out split of {holdout} train examples (not dev)" if holdout
              else "Dev scores x100")
    text = "\n".join([
        f"# {results.stem}: {len(records)} runs, model {records[-1].get('model')}, seeds {seeds}",
        "",
        f"{scored}, mean ± std over seeds. Train subset of at most {train.get('train_examples')} "
        f"examples per task{' (after the held-out split)' if holdout else ''}, "
        f"{train.get('epochs')} epoch(s), max_length {train.get('max_length')}, lr {train.get('lr')}{_lr_note(cfg)}, "
        f"optimizer {train.get('optimizer')} (masked runs of adamw use SparseAdamW, the same update on the kept "
        "entries only). 'trainable PEFT' is counted from the masks; the head "
        "(modules_to_save) trains fully in every run and is not part of the budget.",
        "",
        table(records),
        "",
        f"{'Held-out' if holdout else 'Dev'} loss after the last epoch (mean ± std over seeds):",
        "",
        table(records, value="dev_loss"),
        "",
        *_paired_section(records),
        _wall_time(records),
        "",
    ])
    atomic_write_text(paths["table"], text)
    plot_score_vs_proportion(records, paths["proportion_plot"])
    plot_epochs(records, paths["epoch_plot"])
    if draw_run_layers(records, out / f"{results.stem}_mask_layers.png"):
        paths["mask_plot"] = mask_plot
    return paths


def draw_run_layers(records: list[dict], path: str | os.PathLike) -> str | None:
    """`report`: the per-layer summary each compare run recorded (``record["mask"]["per_layer"]``) as a
    heat map, one row per task / method / budget / strategy (mean over seeds), one column per layer; colour and
    text = the share of the run's kept entries in that layer. None (nothing drawn) when no run has a mask."""
    groups: dict[str, list[dict[str, float]]] = {}
    for r in records:
        per_layer = (r.get("mask") or {}).get("per_layer")
        if not per_layer:
            continue
        k = sum(kept for _, kept, _ in per_layer) or 1
        label = f"{r.get('task')} {r.get('method')} {r.get('strategy')} {r.get('budget'):g}"
        groups.setdefault(label, []).append({"-" if lay is None else str(lay): kept / k for lay, kept, _ in per_layer})
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted({lay for runs in groups.values() for run in runs for lay in run},
                    key=lambda v: (v == "-", int(v) if v != "-" else 0))
    share = np.array([[float(np.mean([run.get(lay, 0.0) for run in runs])) for lay in layers]
                      for runs in groups.values()])
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * len(layers), 1.0 + 0.32 * len(groups)))
    im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(groups)), list(groups), fontsize=7)
    ax.set_xlabel("layer")
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if share[i, j] < 0.6 * share.max() else "black")
    fig.colorbar(im, ax=ax, label="share of kept entries (%, mean over seeds)")
    ax.set_title("Where each run's mask put its budget, per layer", fontsize=9)
    fig.tight_layout()
    path = os.fspath(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
