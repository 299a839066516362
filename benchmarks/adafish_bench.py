"""Does AdaFish reach AdamW's result in half the training? AdaFish at budget T/2 vs AdamW at T (issue 14).

Design (each point answers a flaw of the issue-7 benchmark):

* four arms per (task, mask, seed): AdamW and AdaFish, each at budget T and at T/2 steps, every run with its *own*
  schedule (10% linear warm-up, linear decay to 0 at its own last step). The claim is AdaFish@T/2 vs AdamW@T; the
  control AdamW@T/2 vs AdamW@T says whether halving the budget costs AdamW anything (if not, the claim is untestable);
* MiniLM + LoRA as in the evidence study (configs/glue6.yaml: r=16, alpha 32, PiSSA, q/k/v), the classification
  head trained in both arms by the AdamW rule (AdaFish applies it to non-factor parameters), lr shared;
* the learning rate of each arm (optimizer x budget x mask) is chosen by the *mean over all seeds* of the score on a
  held-out part of train (disjoint from the training examples); if the best rate is at an edge of the grid, the
  grid is extended by half a decade (up to ``--max-extend`` times), so no chosen rate sits at an edge untested;
* full dev sets (SST-2 872, STS-B 1500), evaluated once at the end of each run; the mean training loss over the
  last 10% of steps is recorded too;
* with and without a FISH mask (keep 5% of LoRA entries, empirical Fisher on 256 train examples, head always
  trained), masked entries frozen by ``MaskedOptimizer`` around AdamW / AdaFish.

Every finished run is one line of a JSONL file; finished runs are skipped on restart, so the study resumes.
``benchmarks/adafish_report.py`` turns the file into the BENCHMARKS.md section (paired intervals over seeds).

    PYTHONPATH=src nice -n 15 python benchmarks/adafish_bench.py --tasks sst2   # one task per process (BENCHMARKS.md)
    PYTHONPATH=src python benchmarks/adafish_bench.py --smoke   # 32 tiny runs into /tmp: checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))  # the lab: outside the package

import fish_tuning as ft  # noqa: E402
from fish_lab.builders import METHODS, PeftSpec  # noqa: E402
from fish_lab.tasks import glue_batches, load_glue, task_spec  # noqa: E402
from fish_lab.train import evaluate, linear_schedule  # noqa: E402
from fish_tuning.adafish import make_adafish  # noqa: E402
from fish_tuning.models import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adafish_report import BUDGETS, OPTIMIZERS, chosen_lr  # noqa: E402  (the selection rule lives with the report)

GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


def run_key(r: dict) -> tuple:
    return r["task"], r["mask"], r["optimizer"], r["budget"], r["lr"], r["seed"]


class Study:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.runs = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()] \
            if self.out.is_file() else []
        self.done = {run_key(r) for r in self.runs}
        self._data: dict[str, tuple] = {}
        self._masks: dict[tuple, object] = {}

    def data(self, task: str, tok):
        """(train batches source, held-out batches, dev batches): held-out is disjoint from the training part."""
        if task not in self._data:
            a = self.args
            pool = load_glue(task, "train", limit=a.train_examples + a.heldout, seed=0)
            train, held = pool[a.heldout:], pool[:a.heldout]
            dev = load_glue(task, "dev", limit=a.dev_examples)
            self._data[task] = (train, self.to_device(glue_batches(held, tok, 64, a.max_length)),
                                self.to_device(glue_batches(dev, tok, 64, a.max_length)))
        return self._data[task]

    def to_device(self, batches: list[dict]) -> list[dict]:
        return [{k: v.to(self.args.device) for k, v in b.items()} for b in batches]

    def build(self, task: str, seed: int):
        spec = task_spec(task)
        model, tok = load_model(self.args.model, num_labels=spec.num_labels)
        torch.manual_seed(seed)  # the head is the only random part (PiSSA init is an SVD)
        torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(model.classifier.bias)
        peft_spec = PeftSpec(rank=self.args.rank, layers=None, target_modules=["query", "key", "value"],
                             task_type="SEQ_CLS")
        return METHODS["lora"](model, peft_spec).to(self.args.device), tok  # PiSSA's SVD ran on the CPU

    def mask(self, task: str, seed: int, model, train):
        if (task, seed) not in self._masks:
            calib = glue_batches(train[: self.args.calibration], self._tok, 16, self.args.max_length)
            fisher = ft.compute_fisher(model, calib, num_samples=self.args.calibration, progress=False)
            self._masks[task, seed] = ft.select_mask(fisher, keep=self.args.keep, always_train="classifier")
        return self._masks[task, seed]

    def run(self, task: str, mask_name: str, opt_name: str, budget: str, lr: float, seed: int) -> dict:
        a = self.args
        model, self._tok = self.build(task, seed)
        train, held, dev = self.data(task, self._tok)
        steps_per_epoch = math.ceil(len(train) / a.batch_size)
        steps = max(2, round(BUDGETS[budget] * a.epochs * steps_per_epoch))
        mask = self.mask(task, seed, model, train) if mask_name == "fish" else None
        params = [p for p in model.parameters() if p.requires_grad]
        if opt_name == "adafish":
            opt = make_adafish(model, mask=mask, lr=lr, weight_decay=a.weight_decay, **json.loads(a.adafish))
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=a.weight_decay)
            opt = ft.MaskedOptimizer(opt, mask, model) if mask is not None else opt
        sched = linear_schedule(opt, steps, warmup=0.1)
        losses, t0, epoch, batches = [], time.perf_counter(), 0, []
        model.train()
        for _ in range(steps):
            if not batches:
                batches = self.to_device(glue_batches(train, self._tok, a.batch_size, a.max_length, shuffle=True,
                                                      seed=1000 * seed + epoch))
                epoch += 1
            loss = model(**batches.pop(0)).loss
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        tail = losses[-max(1, len(losses) // 10):]
        finite = all(math.isfinite(x) for x in losses)
        bad = {"loss": math.inf, "score": -math.inf}
        return {"task": task, "mask": mask_name, "optimizer": opt_name, "budget": budget, "lr": lr, "seed": seed,
                "steps": steps, "train_loss_tail": statistics.mean(tail) if finite else math.inf,
                "heldout": evaluate(model, held, task_spec(task).metric) if finite else bad,
                "dev": evaluate(model, dev, task_spec(task).metric) if finite else bad,
                "train_seconds": seconds, "adafish": json.loads(a.adafish) if opt_name == "adafish" else None,
                "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"}

    def record(self, run: dict) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(run) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.runs.append(run)
        self.done.add(run_key(run))
        print(f"{run['task']} {run['mask']} {run['optimizer']}@{run['budget']} lr={run['lr']:g} seed={run['seed']}: "
              f"held-out {run['heldout']['score']:.4f} dev {run['dev']['score']:.4f} "
              f"train loss {run['train_loss_tail']:.4f} ({run['train_seconds']:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/adafish_halfT_<tasks>.jsonl")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "stsb"])
    ap.add_argument("--masks", nargs="+", default=["dense", "fish"], choices=["dense", "fish"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--lrs", nargs="+", type=float, default=GRID, help="starting grid, both optimizers")
    ap.add_argument("--max-extend", type=int, default=2, help="grid extensions past an edge, per arm")
    ap.add_argument("--train-examples", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=1000, help="train examples held out for lr selection")
    ap.add_argument("--dev-examples", type=int, default=None, help="None: the full dev set")
    ap.add_argument("--epochs", type=float, default=2.0, help="budget T in epochs of the training part")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", type=float, default=0.05)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--adafish", default="{}", help='AdaFish kwargs as JSON, e.g. \'{"variant": "sqrt"}\'')
    ap.add_argument("--model", default="minilm", help="alias or local folder (the GPU lease carries a copy)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda; batches are moved there once")
    ap.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS),
                    help="one arm per process when several share a GPU")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline, not the claim")
    args = ap.parse_args()
    if args.smoke:
        args.tasks, args.masks, args.seeds = args.tasks[:1], args.masks, args.seeds[:2]
        args.lrs, args.train_examples, args.heldout, args.dev_examples = [1e-3, 1e-2], 64, 32, 64
        args.epochs, args.batch_size, args.max_extend, args.calibration = 2.0, 16, 0, 32
    if args.out is None:  # a smoke run never lands among the results the report reads
        args.out = "/tmp/adafish_halfT_smoke.jsonl" if args.smoke else \
            f"benchmarks/results/adafish_halfT_{'_'.join(args.tasks)}.jsonl"
    torch.set_num_threads(1)
    study = Study(args)
    for task in args.tasks:
        for mask in args.masks:
            for opt in args.optimizers:
                for budget in args.budgets:
                    grid = sorted(args.lrs)
                    while True:
                        for lr in grid:
                            for seed in args.seeds:
                                if (task, mask, opt, budget, lr, seed) not in study.done:
                                    study.record(study.run(task, mask, opt, budget, lr, seed))
                        best, grid = chosen_lr(study.runs, task, mask, opt, budget, args.seeds)
                        extended = sum(not min(args.lrs) <= lr <= max(args.lrs) for lr in grid)  # survives restarts
                        if extended >= args.max_extend or best not in (grid[0], grid[-1]):
                            break
                        grid = sorted(grid + [best * 10 ** (0.5 if best == grid[-1] else -0.5)])


if __name__ == "__main__":
    main()
