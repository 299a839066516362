"""Write the "AdaFish vs AdamW (issue 7)" section of BENCHMARKS.md from the saved results of adafish_bench.py.

    PYTHONPATH=src python benchmarks/adafish_report.py   # reads benchmarks/results/adafish_*.json, rewrites the section
    python benchmarks/adafish_report.py --print    # print the section instead
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adafish_bench import best_lr  # noqa: E402

HEADING = "## AdaFish vs AdamW (issue 7)"
CLAIM = 0.6  # the paper's "about half the epochs", with some slack
ROOT = Path(__file__).resolve().parents[1]


def first_reach(curve: list[dict], target: float) -> int | None:
    return next((c["step"] for c in curve if c["loss"] <= target), None)


def majority_score(task: str, dev_limit: int) -> float:
    """Dev score of always predicting the most frequent dev label (same subset as the benchmark)."""
    from fish_tuning.experiments.tasks import load_glue

    labels = [e["label"] for e in load_glue(task, "dev", limit=dev_limit, seed=0)]
    major = max(set(labels), key=labels.count)
    acc = labels.count(major) / len(labels)
    if task != "mrpc":
        return acc
    f1 = 2 * labels.count(1) / (len(labels) + labels.count(1)) if major == 1 else 0.0
    return (f1 + acc) / 2


def mean_sd(xs: list[float], fmt: str = "{:.4f}") -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def task_section(task: str, runs: list[dict], config: dict) -> list[str]:
    score = "(F1 + acc) / 2" if task == "mrpc" else "accuracy"
    seeds = sorted({r["seed"] for r in runs})
    grid_seed = seeds[0]
    lines = [f"### {task.upper()} (dev score: {score})", "",
             f"Learning-rate grid on seed {grid_seed} (final dev loss / final dev score; **bold** = chosen):", "",
             "| optimizer | " + " | ".join(f"lr {lr:g}" for lr in config["lrs"]) + " |",
             "|---|" + "---|" * len(config["lrs"])]
    best = {}
    for opt in ("adamw", "adafish"):
        grid = {r["lr"]: r for r in runs if r["optimizer"] == opt and r["seed"] == grid_seed}
        if not grid:
            continue
        best[opt] = best_lr(runs, task, opt, grid_seed)
        cells = []
        for lr in config["lrs"]:
            if lr not in grid:
                cells.append("not run")
                continue
            end = grid[lr]["curve"][-1]
            cell = f"{end['loss']:.4f} / {end['score']:.4f}"
            cells.append(f"**{cell}**" if lr == best[opt] else cell)
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    lines.append("")
    if set(best) != {"adamw", "adafish"}:
        return lines + ["(incomplete: not every grid run finished)", ""]

    pick = {opt: {r["seed"]: r for r in runs if r["optimizer"] == opt and r["lr"] == best[opt]} for opt in best}
    paired = [s for s in seeds if s in pick["adamw"] and s in pick["adafish"]]
    lines += [f"Best rates on seeds {', '.join(map(str, paired))}. Target = AdamW's final dev loss on the same seed; "
              "steps = first evaluation (every "
              f"{config['eval_every']} steps) at or below it.", "",
              "| seed | AdamW final dev loss | AdamW steps to it | AdaFish steps to it | ratio | "
              "AdaFish final dev loss | AdamW / AdaFish final score |", "|---|---|---|---|---|---|---|"]
    ratios = []
    for s in paired:
        a, f = pick["adamw"][s], pick["adafish"][s]
        target = a["curve"][-1]["loss"]
        sa, sf = first_reach(a["curve"], target), first_reach(f["curve"], target)
        ratio = sf / sa if sf is not None else math.inf
        ratios.append(ratio)
        lines.append(f"| {s} | {target:.4f} | {sa} | {sf if sf is not None else 'not reached'} | "
                     f"{ratio:.2f} | {f['curve'][-1]['loss']:.4f} | "
                     f"{a['curve'][-1]['score']:.4f} / {f['curve'][-1]['score']:.4f} |")
    lines += ["", "| optimizer | lr | final dev loss | final dev score | time / step (s) | optimizer.step (ms) |",
              "|---|---|---|---|---|---|"]
    for opt in ("adamw", "adafish"):
        rs = [pick[opt][s] for s in paired]
        lines.append(f"| {opt} | {best[opt]:g} | {mean_sd([r['curve'][-1]['loss'] for r in rs])} | "
                     f"{mean_sd([r['curve'][-1]['score'] for r in rs])} | "
                     f"{statistics.median(r['step_s_median'] for r in rs):.3f} | "
                     f"{1000 * statistics.median(r['opt_step_s_median'] for r in rs):.1f} |")
    base = majority_score(task, config["dev_limit"])
    all_runs = [r for r in runs if math.isfinite(r["curve"][-1]["score"])]
    flat = sum(abs(r["curve"][-1]["score"] - base) < 1e-9 for r in all_runs)
    lines += ["", f"Majority-class predictor on this dev subset scores {base:.4f}; {flat} of {len(all_runs)} runs "
              "of this task end exactly there (the classifier has not left the majority class: dev loss is then "
              "the only signal)."]
    met = sum(r <= CLAIM for r in ratios)
    finite = [r for r in ratios if math.isfinite(r)]
    lines += ["", f"Claim \"AdaFish needs <= {CLAIM}x AdamW's steps\": met on {met} of {len(ratios)} seeds "
              f"(ratios {', '.join(f'{r:.2f}' for r in ratios)}"
              + (f"; median {statistics.median(finite):.2f}" if finite else "") + ").", ""]
    return lines


def render(files: list[Path]) -> str:
    blocks, configs, machines = [], [], set()
    for path in files:
        res = json.loads(path.read_text())
        configs.append(res["config"])
        machines.add(res["machine"])
        for task in sorted({r["task"] for r in res["runs"]}, key=lambda t: ("sst2", "mrpc").index(t)):
            blocks += task_section(task, [r for r in res["runs"] if r["task"] == task], res["config"])
    c = configs[0]
    cmd = ("PYTHONPATH=src python benchmarks/adafish_bench.py --tasks TASK --out benchmarks/results/adafish_TASK.json "
           f"--steps {c['steps']} --eval-every {c['eval_every']} --dev-limit {c['dev_limit']} "
           f"--max-length-mrpc {c['max_length_mrpc']}")
    head = [HEADING, "",
            "MiniLM (all-MiniLM-L6-v2) + LoRA (PiSSA init, r=8, alpha=8, q/k/v), classification head trained by "
            "AdamW's rule in both runs, so only the LoRA factors' update differs. AdaFish uses its defaults "
            "(betas (0.9, 0.999), damping 1e-3, exponent 0.5); weight decay 0 for both. "
            f"Scaled down for a CPU: {c['train_limit']} train examples (seeded subsample), batch {c['batch_size']}, "
            f"{c['steps']} steps (10% warm-up, linear decay), max length {c['max_length_sst2']} (SST-2) / "
            f"{c['max_length_mrpc']} (MRPC), dev capped at {c['dev_limit']} examples, evaluated every "
            f"{c['eval_every']} steps; grid {', '.join(f'{x:g}' for x in c['lrs'])} for both optimizers, chosen "
            "by final dev loss on seed 0.", "",
            f"Machine: {'; '.join(sorted(machines))}. Times are medians of wall time per training step "
            "(forward, backward, clip, step) on a machine with other jobs running; compare them only with each "
            "other.", "",
            f"Produced by (one process per task): `{cmd}`. Regenerate this section: "
            "`PYTHONPATH=src python benchmarks/adafish_report.py`.", ""]
    return "\n".join(head + blocks).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--print", action="store_true", help="print the section, do not touch BENCHMARKS.md")
    args = ap.parse_args()
    files = args.files or sorted((ROOT / "benchmarks" / "results").glob("adafish_*.json"),
                                 key=lambda p: ("sst2" not in p.name, p.name))
    if not files:
        raise SystemExit("no results: run benchmarks/adafish_bench.py first")
    section = render(files)
    if args.print:
        print(section)
        return
    md = args.benchmarks_md
    text = md.read_text() if md.is_file() else "# Benchmarks\n\n"
    if HEADING in text:
        start = text.index(HEADING)
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
        text = text.replace(section + "## ", section + "\n## ")
    else:
        text = text.rstrip() + "\n\n" + section
    md.write_text(text)
    print(f"wrote {HEADING!r} in {md}")


if __name__ == "__main__":
    main()
