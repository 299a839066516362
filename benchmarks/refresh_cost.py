"""What a mask that moves costs per training step (issue 24: target <= 1.05x averaged over a run).

    python benchmarks/refresh_cost.py            # writes benchmarks/results/refresh_cost.json
    python benchmarks/refresh_cost.py --report   # BENCHMARKS.md's table from that file

MiniLM + LoRA r8 (PiSSA) on q/k/v, SparseAdamW at 1/8 of the LoRA entries, batches of 16 x 64 synthetic tokens.
Two copies of the model train side by side in one process: a fixed mask, and the same mask with
``RefreshSchedule(every=E, window=5)``. Arms alternate in rounds of E steps (one whole refresh cycle: E - 5 plain
steps, 5 steps that read the unkept gradients, one refresh), so a shared, noisy machine slows both alike; the
figure is total time with refresh / total time without, over every round, and its per-round median.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
import fish_tuning as ft  # noqa: E402
from fish_tuning.files import atomic_write  # noqa: E402
from fish_tuning.models import load_model  # noqa: E402
from fish_tuning.refresh import RefreshSchedule  # noqa: E402

RESULTS = HERE / "results/refresh_cost.json"


def build(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, _ = load_model("minilm", task="seq-cls", num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value"],
                                             init_lora_weights="pissa", modules_to_save=["classifier"],
                                             task_type="SEQ_CLS"))
    return model


def batches(n: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
             "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,), generator=g)} for _ in range(n)]


def step(model, opt, batch) -> None:
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def markdown_report(path: str) -> str:
    """BENCHMARKS.md's table from the saved results."""
    data = json.loads(Path(path).read_text())
    lines = [f"{data['machine']}, {data['date']}; k = {data['k']:,} of {data['candidates']:,} LoRA entries",
             "", "| refresh every | window | steps timed (each arm) | refreshes | step, fixed mask | step, moving mask "
             "| ratio over the run | median round |", "|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['every']} | {r['window']} | {r['steps']} | {r['refreshes']} | {r['fixed_step_ms']:.0f} ms "
                     f"| {r['moving_step_ms']:.0f} ms | **{r['ratio_total']:.3f}x** | {r['ratio_median_round']:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, nargs="+", default=[100, 20])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report", action="store_true", help="print the markdown table of the saved results and exit")
    args = ap.parse_args()
    if args.report:
        print(markdown_report(args.out))
        return
    torch.set_num_threads(1)
    base = build()
    names = ft.peft_candidates(base)
    data = batches(8)
    fisher = ft.compute_fisher(base, data[:4], num_samples=64, params=names, progress=False)
    heads = ft.always_trainable(base)
    mask = ft.select_mask({**fisher, **{n: torch.zeros_like(base.get_parameter(n)) for n in heads}},
                          keep=0.125, always_train=[f"^{n}$" for n in heads])
    out = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), 1 torch thread",
           "date": dt.date.today().isoformat(), "k": mask.num_selected, "candidates": mask.num_candidates,
           "results": []}
    for every in args.every:
        fixed_model, moving_model = copy.deepcopy(base), copy.deepcopy(base)
        fixed = ft.SparseAdamW(fixed_model, mask, lr=1e-3)
        moving = ft.SparseAdamW(moving_model, mask, lr=1e-3,
                                refresh=RefreshSchedule(every=every, window=min(5, every), until=10**9))
        for _ in range(3):  # warm-up steps outside the timing
            step(fixed_model, fixed, data[0])
        ratios, totals = [], [0.0, 0.0]
        for r in range(args.rounds):
            times = []
            for model, opt in ((fixed_model, fixed), (moving_model, moving)):
                t0 = time.perf_counter()
                for i in range(every):
                    step(model, opt, data[i % len(data)])
                times.append(time.perf_counter() - t0)
            totals = [totals[0] + times[0], totals[1] + times[1]]
            ratios.append(times[1] / times[0])
            print(f"every={every} round {r}: fixed {times[0]:.1f} s, moving {times[1]:.1f} s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
        refreshes = len(moving.refresher.history)
        out["results"].append({"every": every, "window": min(5, every), "rounds": args.rounds, "steps": every * args.rounds,
                               "refreshes": refreshes, "ratio_total": totals[1] / totals[0],
                               "ratio_median_round": statistics.median(ratios),
                               "fixed_step_ms": 1000 * totals[0] / (every * args.rounds),
                               "moving_step_ms": 1000 * totals[1] / (every * args.rounds)})
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(out, indent=1) + "\n"))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
