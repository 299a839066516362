"""Performance and memory of fish-tuning vs vanilla LoRA (issue 5): one command, raw timings to JSON.

    python benchmarks/perf.py            # all models; writes benchmarks/results/perf.json and BENCHMARKS.md

Every figure is a ratio of two things timed side by side in one process (arms alternate A B A B ..., the
ratio is the median of the per-round ratios), so a shared, noisy machine slows both arms alike. Peak memory
comes from separate child processes (RSS on CPU, CUDA max allocated on a GPU). Runs in bf16 on CUDA when present.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
import fish_tuning as ft  # noqa: E402
from fish_tuning.models import load_model  # noqa: E402

# Benchmark shapes from the issue. fisher_samples / loop_samples: how many samples are timed on CPU
# (seconds are scaled to 128 samples; the ratios are per sample and do not depend on it).
MODELS = {
    "minilm": {"alias": "minilm", "task": "seq-cls", "targets": ["query", "key", "value"], "batch": 32, "seq": 128,
               "fisher_samples": 32, "loop_samples": 8, "step_arms": ["vanilla", "sparse", "masked"], "mem_steps": 2},
    "smollm2": {"alias": "smollm2", "task": "causal-lm", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "batch": 4, "seq": 256, "fisher_samples": 4, "loop_samples": 1, "step_arms": ["vanilla", "sparse", "masked"],
                "mem_steps": 1},
}
GPU_SAMPLES = {"fisher_samples": 128, "loop_samples": 128, "step_arms": ["vanilla", "sparse", "masked"],
               "mem_steps": 3}
RANK, KEEP, LR, WD = 16, 0.1, 1e-4, 0.01


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(spec: dict):
    """(PEFT model, batches) for one benchmark shape: PiSSA LoRA r=16, synthetic token ids."""
    from peft import LoraConfig, get_peft_model

    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model, _ = load_model(spec["alias"], task=spec["task"], dtype=dtype)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=spec["targets"], init_lora_weights="pissa",
                     lora_dropout=0.0, task_type="SEQ_CLS" if spec["task"] == "seq-cls" else "CAUSAL_LM")
    model = get_peft_model(model, cfg).to(dev)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(max(1, spec["fisher_samples"] // spec["batch"])):
        ids = torch.randint(100, vocab, (spec["batch"], spec["seq"]), generator=g)
        labels = torch.randint(0, 2, (spec["batch"],), generator=g) if spec["task"] == "seq-cls" else ids.clone()
        batches.append({"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev),
                        "labels": labels.to(dev)})
    return model, batches


def make_mask(model, batches, samples: int):
    scores = ft.compute_fisher(model, batches, num_samples=samples, progress=False)
    return ft.select_mask(scores, keep=KEEP, always_train=ft.always_trainable(model) or None)


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(arms: dict, rounds: int) -> dict[str, list[float]]:
    """Run every arm once per round, in a rotating order, after one untimed warm-up each."""
    for fn in arms.values():
        fn()
    out = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(timed(arms[name]))
            print(f"  round {r} {name}: {out[name][-1]:.3f}s", flush=True)
    return out


def bench_fisher(model, batches, spec, rounds: int) -> dict:
    n, loop_n = spec["fisher_samples"], spec["loop_samples"]
    names = ft.peft_candidates(model)
    loop_batch = [{k: v[:loop_n] for k, v in batches[0].items()}]

    def batched():
        model.eval()
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    arms = {
        "vectorized_s": lambda: ft.compute_fisher(model, batches, n, params=names, engine="vectorized",
                                                  progress=False),
        "batched_fwd_bwd_s": batched,
        "loop_s": lambda: ft.compute_fisher(model, loop_batch, loop_n, params=names, engine="loop", progress=False),
    }
    return {"samples": n, "loop_samples": loop_n, **alternate(arms, rounds)}


def optimizer_bytes(opt) -> int:
    """Persistent bytes an optimizer keeps beside the model: state, indices, masks and backups."""
    if isinstance(opt, (ft.SparseAdamW, ft.MaskedOptimizer)):
        return opt.state_bytes()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def bench_step(model, batches, mask, rounds: int, arms_wanted=("vanilla", "sparse", "masked")) -> dict:
    """One training step (forward, backward, optimizer step, zero_grad) with each optimizer on its own copy."""
    arms, opt_times, opts = {}, {}, {}
    for arm in arms_wanted:
        m = copy.deepcopy(model).train()
        if arm == "vanilla":
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
        else:
            opt = ft.make_optimizer(m, mask, lr=LR, weight_decay=WD, sparse=arm == "sparse")
        opts[arm], opt_times[arm] = opt, []

        def step(m=m, opt=opt, arm=arm):
            m(**batches[0]).loss.backward()
            opt_times[arm].append(timed(opt.step))
            opt.zero_grad(set_to_none=True)

        arms[f"{arm}_s"] = step
    out = alternate(arms, rounds)
    for arm, times in opt_times.items():
        out[f"{arm}_optimizer_step_s"] = times[1:]  # drop the warm-up step
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["state_bytes"] = {arm: optimizer_bytes(opt) for arm, opt in opts.items()}
    out["trainable_entries"] = trainable
    out["kept_entries"] = mask.num_selected
    out["candidate_entries"] = mask.num_candidates
    return out


def _vm_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def _reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux clear_refs 5) so that model loading is not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, mode: str, steps: int) -> dict:
    """Peak memory of one training run in this (fresh) process, counted from after model and data loading."""
    spec = MODELS[name] | (GPU_SAMPLES if device().type == "cuda" else {})
    model, batches = build(spec)
    sync()
    out = {"rss_loaded_mb": (_vm_kb("VmRSS") or 0) / 1024}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset = _reset_peak_rss()
    if mode == "masked":
        mask = make_mask(model, batches, spec["fisher_samples"])
        opt = ft.make_optimizer(model, mask, lr=LR, weight_decay=WD)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=WD)
    model.train()
    for i in range(steps):
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    out["rss_process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if reset and _vm_kb("VmHWM") is not None:
        out["rss_run_peak_mb"] = _vm_kb("VmHWM") / 1024
    if torch.cuda.is_available():
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_memory(name: str, repeats: int, steps: int) -> dict:
    out = {"vanilla": [], "masked": [], "steps": steps}
    for _ in range(repeats):
        for mode in ("vanilla", "masked"):
            cmd = [sys.executable, __file__, "--child", name, mode, "--steps", str(steps),
                   "--threads", str(torch.get_num_threads())]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"  memory {mode}: {out[mode][-1]}", flush=True)
    return out


def machine() -> str:
    dev = device()
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name()} (bf16), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per arm (median of these)")
    ap.add_argument("--mem-repeats", type=int, default=5, help="child-process pairs (vanilla, masked) per model")
    ap.add_argument("--steps", type=int, default=None, help="training steps in each memory child (default per model)")
    ap.add_argument("--out", default=str(HERE / "results" / "perf.json"))
    ap.add_argument("--no-report", action="store_true", help="do not rewrite BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (1: on a shared, oversubscribed CPU, OpenMP spin-waits make 2 threads "
                         "up to 10x slower and far noisier)")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps or MODELS[args.child[0]]["mem_steps"])))
        return
    results = {"meta": {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                        "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "load_average_start": os.getloadavg(), "rank": RANK, "keep": KEEP}, "models": {}}
    for name in args.models:
        spec = MODELS[name] | (GPU_SAMPLES if device().type == "cuda" else {})
        print(f"[{name}] {spec}", flush=True)
        model, batches = build(spec)
        res = {"spec": spec, "fisher": bench_fisher(model, batches, spec, args.rounds)}
        mask = make_mask(model, batches, spec["fisher_samples"])
        res["step"] = bench_step(model, batches, mask, args.rounds, spec["step_arms"])
        del model
        res["memory"] = bench_memory(name, args.mem_repeats, args.steps or spec["mem_steps"])
        results["models"][name] = res
        results["meta"]["load_average_end"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # after each model: partial results survive
    if not args.no_report:
        import report

        report.main(["--results", args.out])


if __name__ == "__main__":
    main()
