"""AdaFish vs AdamW on MiniLM + LoRA (PiSSA, r=8, q/k/v): dev-loss curves, final dev score, time per step.

Protocol (issue 7): for each task, both optimizers run a learning-rate grid on seed 0; the rate with the lowest
final dev loss is then run on the other seeds. Results are appended to a JSON file after every run and finished
runs are skipped on restart, so an interrupted run resumes. ``benchmarks/adafish_report.py`` turns the file into
the BENCHMARKS.md section.

    PYTHONPATH=src python benchmarks/adafish_bench.py --out benchmarks/results/adafish.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import fish_tuning as ft
from fish_tuning.experiments.tasks import glue_batches, load_glue, task_spec
from fish_tuning.models import load_model


def build_model(seed: int, rank: int):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model("minilm", num_labels=2)
    torch.manual_seed(seed)  # the classification head is the only random part (PiSSA init is an SVD)
    torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "key", "value"], init_lora_weights="pissa",
                     task_type="SEQ_CLS", lora_dropout=0.0)
    return get_peft_model(model, cfg), tok


def make_optimizer(name: str, model, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    if name == "adafish":
        return ft.make_adafish(model, lr=lr, weight_decay=weight_decay)
    raise ValueError(name)


@torch.no_grad()
def evaluate(model, batches, metric: str) -> dict:
    model.eval()
    losses, preds, labels = [], [], []
    for batch in batches:
        out = model(**batch)
        losses.append(out.loss.item() * len(batch["labels"]))
        preds += out.logits.argmax(-1).tolist()
        labels += batch["labels"].tolist()
    model.train()
    acc = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    res = {"loss": sum(losses) / len(labels), "acc": acc}
    if metric == "f1_acc":
        tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
        f1 = 2 * tp / max(1, sum(preds) + sum(labels))
        res.update(f1=f1, score=(f1 + acc) / 2)
    else:
        res["score"] = acc
    return res


def run_one(task: str, opt_name: str, lr: float, seed: int, args, data) -> dict:
    model, tok = build_model(seed, args.rank)
    train_ex, dev_ex = data
    dev = glue_batches(dev_ex, tok, 64, args.max_length[task])
    metric = task_spec(task).metric
    batches = []
    epoch = 0
    while len(batches) < args.steps:
        batches += glue_batches(train_ex, tok, args.batch_size, args.max_length[task], shuffle=True,
                                seed=1000 * seed + epoch)
        epoch += 1
    opt = make_optimizer(opt_name, model, lr, args.weight_decay)
    warm = max(1, int(0.1 * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / (args.steps - warm))))
    curve = [{"step": 0, **evaluate(model, dev, metric)}]
    step_s, opt_s, train_loss = [], [], []
    model.train()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = model(**batches[step - 1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        t1 = time.perf_counter()
        opt.step()
        sched.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        step_s.append(t2 - t0)
        opt_s.append(t2 - t1)
        train_loss.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(model, dev, metric)})
            print(f"  {task} {opt_name} lr={lr:g} seed={seed} step {step}: dev loss {curve[-1]['loss']:.4f} "
                  f"score {curve[-1]['score']:.4f}", flush=True)
    if not all(math.isfinite(c["loss"]) for c in curve):
        print(f"  {task} {opt_name} lr={lr:g}: non-finite dev loss", flush=True)
    return {"task": task, "optimizer": opt_name, "lr": lr, "seed": seed, "curve": curve,
            "train_loss": train_loss, "step_s_median": statistics.median(step_s),
            "opt_step_s_median": statistics.median(opt_s)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/adafish.json")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2], help="grid, both optimizers")
    ap.add_argument("--train-limit", type=int, default=1000)
    ap.add_argument("--dev-limit", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length-sst2", type=int, default=64)
    ap.add_argument("--max-length-mrpc", type=int, default=96)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="1: 2 threads thrash on a loaded machine")
    args = ap.parse_args()
    args.max_length = {"sst2": args.max_length_sst2, "mrpc": args.max_length_mrpc}
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tasks", "seeds")}
    if results.get("config", config) != config:
        raise SystemExit(f"{out} was produced with another config: {results['config']}; use another --out")
    results.update(config=config, machine=f"{platform.machine()} {os.cpu_count()} CPUs (shared with other jobs), "
                                           f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results.setdefault("runs", [])

    def done(task, opt_name, lr, seed):
        return next((r for r in results["runs"] if (r["task"], r["optimizer"], r["lr"], r["seed"])
                     == (task, opt_name, lr, seed)), None)

    def record(run):
        results["runs"].append(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out)

    for task in args.tasks:
        data = (load_glue(task, "train", limit=args.train_limit, seed=0),
                load_glue(task, "dev", limit=args.dev_limit, seed=0))
        # both optimizers advance together, so an interrupted benchmark still has paired runs
        for lr in args.lrs:
            for opt_name in ("adamw", "adafish"):
                if not done(task, opt_name, lr, args.seeds[0]):
                    record(run_one(task, opt_name, lr, args.seeds[0], args, data))
        best = {opt_name: best_lr(results["runs"], task, opt_name, args.seeds[0]) for opt_name in ("adamw", "adafish")}
        for seed in args.seeds[1:]:
            for opt_name, lr in best.items():
                if not done(task, opt_name, lr, seed):
                    record(run_one(task, opt_name, lr, seed, args, data))


def best_lr(runs: list[dict], task: str, opt_name: str, seed: int) -> float:
    """Grid rate with the lowest final dev loss on the grid seed (non-finite losses lose)."""
    grid = [r for r in runs if r["task"] == task and r["optimizer"] == opt_name and r["seed"] == seed]
    final = [(r["curve"][-1]["loss"] if math.isfinite(r["curve"][-1]["loss"]) else math.inf, r["lr"]) for r in grid]
    return min(final)[1]


if __name__ == "__main__":
    main()
