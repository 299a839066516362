"""Fisher engines for non-Linear candidates (issue 13): cost of the Fisher pass on MiniLM with DoRA and (IA)³.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/fisher_engines.py   # writes benchmarks/results/fisher_engines.json
    python benchmarks/fisher_engines.py --report   # BENCHMARKS.md's table from that file (runs nothing)

For each method, in one process: the time of ``compute_fisher`` over 128 SST-2 train sentences (batch 32, padded
to max_length 128) divided by the time of one batched forward+backward over the same 4 batches, for the
vectorised engine (``engine="auto"``, which must not fall back: its logged engine is recorded) and for the exact
per-sample loop (``engine="loop"``). Arms alternate ref, vectorised, ref, loop, ref, ... for ``--rounds`` rounds;
each Fisher time is divided by the mean of the two ref passes around it (a shared machine's drift hits numerator
and denominator alike) and the reported ratio is the median over rounds, all within this one run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
import fish_tuning as ft  # noqa: E402
from fish_tuning.models import load_model  # noqa: E402

SAMPLES, BATCH, MAX_LEN, TARGET = 128, 32, 128, 1.3
RESULTS = HERE / "results" / "fisher_engines.json"


def data_dir() -> Path:
    env = os.environ.get("FISH_DATA_DIR")
    return Path(env) if env else HERE.parent.parent / "shared" / "data"


def sst2_batches(tokenizer) -> list[dict]:
    """The first 128 SST-2 train sentences, read in place (never copied into the repository)."""
    with open(data_dir() / "glue" / "SST-2" / "train.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:SAMPLES]
    out = []
    for lo in range(0, SAMPLES, BATCH):
        chunk = rows[lo:lo + BATCH]
        enc = tokenizer([r["sentence"] for r in chunk], padding="max_length", truncation=True, max_length=MAX_LEN,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": torch.tensor([int(r["label"]) for r in chunk])})
    return out


def build(method: str):
    from peft import IA3Config, LoraConfig, get_peft_model

    model, tok = load_model("minilm", task="seq-cls")
    if method == "dora":  # the library's recommendation for LoRA / DoRA: PiSSA init (no zero-Fisher factor)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value"], use_dora=True,
                         init_lora_weights="pissa", lora_dropout=0.0, task_type="SEQ_CLS")
    else:  # peft's BERT defaults: key, value, output.dense; the FFN output.dense scales its input
        cfg = IA3Config(task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, cfg).eval(), tok


def forward_backward(model, batches) -> float:
    """One batched forward+backward over the batches (eval mode, as the Fisher pass), gradients dropped."""
    t = time.perf_counter()
    for b in batches:
        model(**b).loss.backward()
    took = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return took


class Engine(logging.Handler):
    """Records the engine compute_fisher reports (its logger hangs below transformers')."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def fisher(model, batches, engine: str) -> tuple[float, list[str]]:
    log, handler = logging.getLogger("fish_tuning"), Engine()
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ft.ZeroFisherWarning)
            ft.compute_fisher(model, batches, num_samples=SAMPLES, params=ft.peft_candidates(model), engine=engine,
                              progress=False)
        return time.perf_counter() - t, handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def run(method: str, rounds: int) -> dict:
    model, tok = build(method)
    batches = sst2_batches(tok)
    forward_backward(model, batches[:1])  # warm-up: allocator, kernels
    fisher(model, [{k: v[:4] for k, v in batches[0].items()}], "auto")
    ref = [forward_backward(model, batches)]
    vec, loop, ratio_vec, ratio_loop, vec_logs = [], [], [], [], []
    for _ in range(rounds):  # ref, vec, ref, loop, ref, ...: each Fisher pass against the two ref passes around it
        took, log = fisher(model, batches, "auto")
        vec.append(took)
        vec_logs.append(log)
        ref.append(forward_backward(model, batches))
        ratio_vec.append(took / ((ref[-2] + ref[-1]) / 2))
        took, log = fisher(model, batches, "loop")
        loop.append(took)
        ref.append(forward_backward(model, batches))
        ratio_loop.append(took / ((ref[-2] + ref[-1]) / 2))
    engines = [next((m for m in reversed(log) if m.startswith("compute_fisher: engine=")), "?") for log in vec_logs]
    cand = ft.peft_candidates(model)
    out = {
        "method": method, "candidates": len(cand), "candidate_entries": sum(model.get_parameter(n).numel() for n in cand),
        "rounds": rounds, "ref_fwd_bwd_s": ref, "fisher_vectorized_s": vec, "fisher_loop_s": loop,
        "ratios_vectorized": ratio_vec, "ratios_loop": ratio_loop,
        "ratio_vectorized": statistics.median(ratio_vec), "ratio_loop": statistics.median(ratio_loop),
        "vectorized_engine": engines, "vectorized_fell_back": any("engine=vectorized " not in e for e in engines),
        "vectorized_log": vec_logs[0],
    }
    print(f"{method}: vectorised {out['ratio_vectorized']:.3f}x (rounds {', '.join(f'{r:.2f}' for r in ratio_vec)}), "
          f"loop {out['ratio_loop']:.3f}x (rounds {', '.join(f'{r:.2f}' for r in ratio_loop)}); ref "
          f"{', '.join(f'{r:.1f}' for r in ref)} s; {engines[0]}", flush=True)
    return out


def markdown_report(path: str) -> str:
    """BENCHMARKS.md's table, rebuilt from a saved results file; then the figures its text quotes."""
    data = json.loads(Path(path).read_text())
    target = data["setup"]["target"]
    names = {"dora": "DoRA", "ia3": "(IA)³"}
    lines = ["| method | Fisher engine | ratio (median) | per round | target |", "|---|---|---|---|---|"]
    for r in data["results"]:
        for engine, key in (("vectorised (`auto`)", "vectorized"), ("batch-size-1 loop", "loop")):
            median, rounds = r[f"ratio_{key}"], r[f"ratios_{key}"]
            verdict = ("(reference)" if key == "loop" else f"<= {target:g}, " + (
                "met" if max(rounds) <= target else "met (median)" if median <= target else "not met"))
            lines.append(f"| {names.get(r['method'], r['method'])} | {engine} | {median:.2f}x | "
                         f"{', '.join(f'{x:.2f}' for x in rounds)} | {verdict} |")
    m = data["machine"]
    text = [f"{names.get(r['method'], r['method'])}: {r['candidate_entries']:,} candidate entries, batched "
            f"fwd+bwd {min(r['ref_fwd_bwd_s']):.1f}-{max(r['ref_fwd_bwd_s']):.1f} s over {r['rounds']} rounds, "
            f"fell back: {r['vectorized_fell_back']}" for r in data["results"]]
    text.append(f"run {data['when']}; load average {m['load_average_before'][0]:.1f} at the start, "
                f"{m['load_average_after'][0]:.1f} at the end; torch {m['torch']} on {m['torch_threads']} thread(s)")
    return "\n".join(lines + ["", "Figures the section's text quotes:"] + [f"- {t}" for t in text])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["dora", "ia3"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report", nargs="?", const=str(RESULTS), metavar="FILE",
                    help="print BENCHMARKS.md's table from a saved results file (default %(const)s); run nothing")
    args = ap.parse_args()
    if args.report:
        print(markdown_report(args.report))
        return
    load_before = os.getloadavg()
    results = [run(m, args.rounds) for m in args.methods]
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0),
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "note": "2-core CPU shared with a background study; ratios are within one run"},
        "setup": {"model": "all-MiniLM-L6-v2", "samples": SAMPLES, "batch": BATCH, "max_length": MAX_LEN,
                  "padding": "max_length", "data": "SST-2 train, first 128 sentences", "target": TARGET},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
