"""Issue 25: QLoRA (a 4-bit nf4 base) + FISH on SmolLM2-135M, q/k/v/o, on a 2-core CPU.

    python benchmarks/qlora.py run        # resumable: every finished record is appended to RESULTS, then skipped
    python benchmarks/qlora.py run --parts sft --arms loftq_fish qpissa_uniform   # a second process's share
    python benchmarks/qlora.py --report   # the BENCHMARKS.md tables, from RESULTS only

Parts (one jsonl record each; `key` says which):
- quant_error: per target matrix, the relative Frobenius error ||W - W_hat|| / ||W|| of plain nf4 (W_hat =
  deq(Q(W))), QPiSSA (deq(Q(W - BA)) + BA, PiSSA r8) and LoftQ (deq(Q(W)) + its rank-8 SVD term); also MLP.
- peak: a fresh process per base (fp32, 4-bit) loads the model and adds LoRA r8 (resident memory above the
  process's start), then runs one forward + backward (batch 4 x <=128 tokens; the peak resident memory, counter
  reset after the load); and the model's own bytes (transformers' get_memory_footprint).
- fisher_cost: on the 4-bit QPiSSA model, compute_fisher over SFT["fisher_samples"] samples (batches of 4; the
  exact loop on 4 of them) against the batched forward + backward passes over the same batches (eval mode, as the
  Fisher pass), alternated REPEATS times, the fastest of each; and the overlap of the mask
  selected on the fp32 PiSSA model with the one selected on the 4-bit QPiSSA model (the same A, B).
- sft: a short GSM8K SFT at equal trainable count (115,200 entries): QLoRA dense r1, QPiSSA + FISH r8 at 1/8,
  QPiSSA + uniform allocation r8 at 1/8, LoftQ + FISH r8 at 1/8; bnb AdamW8bit; seeds 0-2. Dev loss on the
  answer tokens of the first SFT['dev'] GSM8K test problems that fit, before and after training.
- reference: the dev loss of the full-precision model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lab"))  # the lab (fish_lab): outside the package
RESULTS = ROOT / "benchmarks/results/qlora/results.jsonl"
DATA = Path(os.environ.get("FISH_DATA_DIR", ROOT.parent / "shared/data")) / "gsm8k"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ARMS = ("qlora_r1", "qpissa_fish", "qpissa_uniform", "loftq_fish")
SEEDS = (0, 1, 2)
REPEATS = 3
SFT = {"steps": 24, "batch_size": 4, "max_length": 128, "dev": 32, "fisher_samples": 16, "keep": 1 / 8,
       "lr_dense": 5e-4, "lr_sparse": 2e-3, "rank": 8}
sys.path.insert(0, str(ROOT / "src"))


# --------------------------------------------------------------------------- records
def records() -> list[dict]:
    if not RESULTS.is_file():
        return []
    out = []
    for line in RESULTS.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
    return out


def done(key: str) -> bool:
    return any(r.get("key") == key for r in records())


def append(record: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    with RESULTS.open("a") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


# --------------------------------------------------------------------------- helpers
def _setup():
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))  # the shared machine is oversubscribed
    from transformers import AutoTokenizer

    from fish_tuning.models import smollm2_path

    path = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return path, tok


def _examples(split: str, tok, n: int, max_length: int) -> list[dict]:
    """The first n problems whose prompt + answer fit max_length tokens (no truncated answers)."""
    from fish_lab.gsm8k import prompt_of

    out = []
    with open(DATA / f"{split}.jsonl") as f:
        for line in f:
            ex = json.loads(line)
            length = len(tok(prompt_of(ex) + " " + ex["answer"].strip() + tok.eos_token,
                             add_special_tokens=False)["input_ids"])
            if length <= max_length:
                out.append(ex)
            if len(out) == n:
                break
    return out


def _lora(r: int, init, modules=TARGETS):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(modules), init_lora_weights=init,
                      task_type="CAUSAL_LM")


# --------------------------------------------------------------------------- parts
def quant_error() -> None:
    if done("quant_error"):
        return
    import torch
    from transformers import AutoModelForCausalLM

    from fish_tuning.methods.quantized import require_bitsandbytes

    bnb = require_bitsandbytes()
    path, _ = _setup()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    r = SFT["rank"]

    def deq(w):
        q, s = bnb.functional.quantize_4bit(w, quant_type="nf4", blocksize=64)
        return bnb.functional.dequantize_4bit(q, s).float()

    rows = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in TARGETS + MLP:
            continue
        w = module.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        principal = (u[:, :r] * s[:r]) @ vh[:r]
        plain = deq(w)
        ur, sr, vr = torch.linalg.svd(w - plain, full_matrices=False)
        loftq = plain + (ur[:, :r] * sr[:r]) @ vr[:r]
        qpissa = deq(w - principal) + principal
        norm = float(w.norm())
        rows.append({"name": name, "kind": kind, "norm": norm,
                     "plain": float((w - plain).norm()) / norm, "qpissa": float((w - qpissa).norm()) / norm,
                     "loftq": float((w - loftq).norm()) / norm})
    append({"key": "quant_error", "rank": r, "quant_type": "nf4", "blocksize": 64, "rows": rows})


def _status(field: str) -> float:
    """A /proc/self/status figure in MiB (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _memory_child(mode: str) -> None:
    """Runs in its own process (Linux): resident memory after load + LoRA, then the peak of one forward/backward
    (the peak counter is reset after the load, so the full-precision read of a 4-bit load does not count)."""
    import ctypes
    import gc

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fish_lab.gsm8k import lm_batches
    from fish_tuning.methods.quantized import bnb_4bit_config, load_quantized

    path, tok = _setup()
    batch = lm_batches(_examples("train", tok, 4, 128), tok, batch_size=4, max_length=128)[0]
    start = _status("VmRSS")
    if mode == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = load_quantized(path, bnb_4bit_config(compute_dtype=torch.float32))
    footprint = model.get_memory_footprint()
    peft_model = get_peft_model(model, _lora(8, True))
    peft_model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back the load's freed buffers, so VmRSS is what stays
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    t = time.perf_counter()
    peft_model(**batch).loss.backward()
    step = time.perf_counter() - t
    print(json.dumps({"mode": mode, "model_bytes": footprint, "rss_loaded_mib": loaded - start,
                      "peak_fwd_bwd_mib": _status("VmHWM") - start, "fwd_bwd_s": step,
                      "tokens": int(batch["attention_mask"].sum())}))


def memory() -> None:
    for mode in ("fp32", "4bit"):
        key = f"peak/{mode}"
        if done(key):
            continue
        out = subprocess.run([sys.executable, __file__, "_memory", mode], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        append({"key": key, **json.loads(out.stdout.strip().splitlines()[-1])})


def fisher_cost() -> None:
    if done("fisher_cost"):
        return
    import torch
    from transformers import AutoModelForCausalLM

    import fish_tuning as ft
    from fish_lab.gsm8k import lm_batches
    from fish_tuning.methods.quantized import bnb_4bit_config, qpissa

    path, tok = _setup()
    n = SFT["fisher_samples"]
    batches = lm_batches(_examples("train", tok, n, SFT["max_length"]), tok, batch_size=4,
                         max_length=SFT["max_length"])
    cfg = _lora(SFT["rank"], "pissa")
    from peft import get_peft_model

    fp32 = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), cfg)
    f32 = ft.compute_fisher(fp32, batches, num_samples=n, params=ft.peft_candidates(fp32), progress=False)
    del fp32
    t = time.perf_counter()
    model = qpissa(path, cfg, bnb_4bit_config(compute_dtype=torch.float32))
    init_s = time.perf_counter() - t
    cand = ft.peft_candidates(model)
    ft.compute_fisher(model, batches[:1], num_samples=4, params=cand, progress=False)  # warm-up (CPU packing)
    model.eval()  # the Fisher pass runs in eval mode too

    def fwd_bwd() -> None:
        for b in batches:
            model(**b).loss.backward()
        model.zero_grad(set_to_none=True)

    fisher_times, fwd_bwd_times = [], []
    for _ in range(REPEATS):  # alternated, the fastest of each: the shared machine's load changes by the minute
        t = time.perf_counter()
        f4 = ft.compute_fisher(model, batches, num_samples=n, params=cand, engine="vectorized", progress=False)
        fisher_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        fwd_bwd()
        fwd_bwd_times.append(time.perf_counter() - t)
    fisher_s, fwd_bwd_s = min(fisher_times), min(fwd_bwd_times)
    t = time.perf_counter()
    loop = ft.compute_fisher(model, batches[:1], num_samples=4, params=cand, engine="loop", progress=False)
    loop_s = (time.perf_counter() - t) * n / 4
    vec4 = ft.compute_fisher(model, batches[:1], num_samples=4, params=cand, engine="vectorized", progress=False)
    loop_err = max(float((loop[k] - vec4[k]).abs().max() / vec4[k].abs().max().clamp_min(1e-30)) for k in loop)
    k = int(sum(v.numel() for v in f4.values()) * SFT["keep"])
    m32, m4 = ft.select_mask(f32, budget=k), ft.select_mask(f4, budget=k)
    shared = sum(len(set(m32.indices[nm].tolist()) & set(m4.indices[nm].tolist())) for nm in m4.indices)
    rel = float(sum((f32[nm] - f4[nm]).norm() ** 2 for nm in f4) ** 0.5 / sum(f32[nm].norm() ** 2 for nm in f4) ** 0.5)
    append({"key": "fisher_cost", "samples": n, "batch_size": 4, "qpissa_init_s": init_s, "fisher_s": fisher_s,
            "fwd_bwd_s": fwd_bwd_s, "ratio": fisher_s / fwd_bwd_s, "fisher_times": fisher_times,
            "fwd_bwd_times": fwd_bwd_times, "loop_s_extrapolated": loop_s,
            "loop_vs_vectorized_max_rel": loop_err, "mask_k": k, "mask_shared_fp32_vs_4bit": shared / k,
            "fisher_rel_diff_fp32_vs_4bit": rel})


def _build(arm: str, seed: int, path: str):
    """The 4-bit peft model of an arm (QPiSSA's residual base is built once and kept in the cache)."""
    import torch
    from peft import PeftModel, get_peft_model

    from fish_tuning.methods.quantized import bnb_4bit_config, load_quantized, loftq_model, qpissa
    from fish_tuning.models import cache_dir

    bnb_cfg = bnb_4bit_config(compute_dtype=torch.float32)
    torch.manual_seed(seed)
    if arm == "qlora_r1":
        return get_peft_model(load_quantized(path, bnb_cfg), _lora(1, True))  # QLoRA's own init: B = 0
    if arm == "loftq_fish":
        return loftq_model(path, _lora(SFT["rank"], True), bnb_cfg)
    store = cache_dir() / "qlora-bench" / f"qpissa_r{SFT['rank']}"
    if not (store / "adapter" / "adapter_config.json").is_file():
        model = qpissa(path, _lora(SFT["rank"], "pissa"), bnb_cfg, residual_dir=store / "residual")
        model.save_pretrained(store / "adapter")
        del model
    return PeftModel.from_pretrained(load_quantized(store / "residual", bnb_cfg), store / "adapter",
                                     is_trainable=True)


def sft(arm: str, seed: int) -> None:
    key = f"sft/{arm}/{seed}"
    if done(key):
        return
    import random

    import torch

    import fish_tuning as ft
    from fish_lab.gsm8k import answer_loss, lm_batches
    from fish_tuning.methods.quantized import require_bitsandbytes

    bnb = require_bitsandbytes()
    path, tok = _setup()
    c = SFT
    t0 = time.perf_counter()
    model = _build(arm, seed, path)
    train = _examples("train", tok, c["steps"] * c["batch_size"] + 256, c["max_length"])
    dev = lm_batches(_examples("test", tok, c["dev"], c["max_length"]), tok, batch_size=8,
                     max_length=c["max_length"])
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    steps = [[train[i] for i in order[s * c["batch_size"]:(s + 1) * c["batch_size"]]] for s in range(c["steps"])]
    calib = [train[i] for i in order[-c["fisher_samples"]:]]  # never trained on in this run
    dev0 = answer_loss(model, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    fisher_s, mask = 0.0, None
    if arm == "qlora_r1":
        opt = bnb.optim.AdamW8bit(params, lr=c["lr_dense"], weight_decay=0.0)
        trained = sum(p.numel() for p in params)
    else:
        t = time.perf_counter()
        scores = ft.compute_fisher(model, lm_batches(calib, tok, batch_size=4, max_length=c["max_length"]),
                                   num_samples=c["fisher_samples"], params=ft.peft_candidates(model),
                                   progress=False)
        fisher_s = time.perf_counter() - t
        allocation = "uniform" if arm == "qpissa_uniform" else "global"
        mask = ft.select_mask(scores, keep=c["keep"], strategy="fish", allocation=allocation, seed=seed)
        opt = ft.MaskedOptimizer(bnb.optim.AdamW8bit(params, lr=c["lr_sparse"], weight_decay=0.0), mask, model)
        trained = mask.num_selected
    model.train()
    t = time.perf_counter()
    losses = []
    for rows in steps:
        batch = lm_batches(rows, tok, batch_size=len(rows), max_length=c["max_length"])[0]
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    train_s = time.perf_counter() - t
    dev1 = answer_loss(model, dev)
    append({"key": key, "arm": arm, "seed": seed, "trainable": trained, "optimizer": type(opt).__name__ if mask is None
            else type(opt.optimizer).__name__, "lr": opt.param_groups[0]["lr"], "dev_loss_init": dev0, "dev_loss": dev1,
            "train_loss_last8": sum(losses[-8:]) / 8, "fisher_s": fisher_s, "train_s": train_s,
            "total_s": time.perf_counter() - t0, "config": c})


def reference() -> None:
    """The dev loss of the full-precision model, the point every 4-bit init tries to stay near."""
    if done("reference"):
        return
    import torch
    from transformers import AutoModelForCausalLM

    from fish_lab.gsm8k import answer_loss, lm_batches

    path, tok = _setup()
    dev = lm_batches(_examples("test", tok, SFT["dev"], SFT["max_length"]), tok, batch_size=8,
                     max_length=SFT["max_length"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    append({"key": "reference", "dev_loss_fp32": answer_loss(model, dev), "dev": SFT["dev"]})


def run(parts: list[str], arms: list[str], seeds: list[int]) -> None:
    """``parts`` in order (each skipped when its record exists); sft runs seed by seed over ``arms``."""
    for part in parts:
        if part == "sft":
            for seed in seeds:
                for arm in arms:
                    sft(arm, seed)
        else:
            {"quant_error": quant_error, "memory": memory, "fisher_cost": fisher_cost, "reference": reference}[part]()


# --------------------------------------------------------------------------- report
def report(recs: list[dict] | None = None) -> str:
    """The BENCHMARKS.md tables from the saved records."""
    import statistics as st

    recs = records() if recs is None else recs
    by = {r["key"]: r for r in recs}
    out = []
    q = by.get("quant_error")
    if q:
        out += ["| matrices | plain nf4 | QPiSSA r8 (residual nf4 + BA) | LoftQ r8 (nf4 + SVD of the error) |",
                "|---|---|---|---|"]
        for label, kinds in (("q/k/v/o", TARGETS), ("MLP gate/up/down", MLP)):
            rows = [r for r in q["rows"] if r["kind"] in kinds]
            if not rows:
                continue
            mean = {m: st.mean(r[m] for r in rows) for m in ("plain", "qpissa", "loftq")}
            out.append(f"| {label} ({len(rows)}) | {mean['plain']:.4f} | {mean['qpissa']:.4f} "
                       f"({100 * (mean['qpissa'] / mean['plain'] - 1):+.1f} %) | {mean['loftq']:.4f} "
                       f"({100 * (mean['loftq'] / mean['plain'] - 1):+.1f} %) |")
        out.append("")
    mem = [by.get(f"peak/{m}") for m in ("fp32", "4bit")]
    if all(mem):
        out += ["| base | model's own bytes (MiB) | resident after load + LoRA r8 (MiB) | peak in one fwd+bwd, "
                f"batch 4 x <=128 tokens ({mem[0]['tokens']} real) (MiB) | that first fwd+bwd, cold (s) |", "|---|---|---|---|---|"]
        for m in mem:
            out.append(f"| {m['mode']} | {m['model_bytes'] / 2**20:.0f} | {m['rss_loaded_mib']:.0f} | "
                       f"{m['peak_fwd_bwd_mib']:.0f} | {m['fwd_bwd_s']:.2f} |")
        out.append("")
    f = by.get("fisher_cost")
    if f:
        out += [f"| Fisher on the 4-bit QPiSSA model ({f['samples']} samples, batches of {f['batch_size']}) | value |",
                "|---|---|",
                f"| vectorised Fisher pass / {f['samples'] // f['batch_size']} batched fwd+bwd | {f['fisher_s']:.1f} s / "
                f"{f['fwd_bwd_s']:.1f} s "
                f"= **{f['ratio']:.2f}** |",
                f"| exact per-sample loop (extrapolated from 4 samples) | {f['loop_s_extrapolated']:.1f} s |",
                f"| loop vs vectorised, max relative difference | {f['loop_vs_vectorized_max_rel']:.1e} |",
                f"| QPiSSA init (load fp32, SVD, save, 4-bit load) | {f['qpissa_init_s']:.1f} s |",
                f"| fp32 PiSSA mask vs 4-bit QPiSSA mask (k = {f['mask_k']:,}): shared entries | "
                f"{100 * f['mask_shared_fp32_vs_4bit']:.1f} % |",
                f"| Fisher, fp32 vs 4-bit: relative difference | {f['fisher_rel_diff_fp32_vs_4bit']:.3f} |", ""]
    runs = [r for r in recs if r["key"].startswith("sft/")]
    ref = by.get("reference")
    if ref:
        out += [f"Dev loss of the full-precision model (no adapter): {ref['dev_loss_fp32']:.4f}.", ""]
    if runs:
        out += ["| arm | optimizer, lr | trainable | seeds | dev loss before | dev loss after (mean ± sd) | per seed | "
                "Fisher (s) | train (s) |", "|---|---|---|---|---|---|---|---|---|"]
        for arm in ARMS:
            rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
            if not rs:
                continue
            after = [r["dev_loss"] for r in rs]
            sd = st.stdev(after) if len(after) > 1 else 0.0
            lr = rs[0].get("lr", rs[0]["config"]["lr_dense" if arm == "qlora_r1" else "lr_sparse"])
            out.append(f"| {arm} | {rs[0].get('optimizer', 'AdamW8bit')}, {lr:g} | {rs[0]['trainable']:,} | {len(rs)} | {st.mean(r['dev_loss_init'] for r in rs):.4f} "
                       f"| {st.mean(after):.4f} ± {sd:.4f} | {', '.join(f'{a:.4f}' for a in after)} | "
                       f"{st.mean(r['fisher_s'] for r in rs):.0f} | {st.mean(r['train_s'] for r in rs):.0f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default=None, choices=["run", "_memory"])
    parser.add_argument("mode", nargs="?")
    parser.add_argument("--report", action="store_true", help="print the tables from the saved results")
    parser.add_argument("--parts", nargs="+", default=["quant_error", "memory", "fisher_cost", "reference", "sft"],
                        choices=["quant_error", "memory", "fisher_cost", "reference", "sft"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                        help="sft arms, in this order (two processes can split them)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = parser.parse_args(argv)
    if args.what == "_memory":
        _memory_child(args.mode)
    elif args.what == "run":
        run(args.parts, args.arms, args.seeds)
    if args.report or args.what is None:
        print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
