"""The studies that need a GPU, run in one device lease: a priority queue of resumable jobs, stopped at a deadline.

A lease is short (minutes) and MiniLM is small, so one process cannot fill the GPU: ``--slots`` processes share it
(under CUDA MPS when it starts), each running one job -- a (task, seed) of a ``python -m fish_lab compare`` study or one arm of
the AdaFish half-budget study -- into its own JSONL file. Jobs are interleaved by priority, so whatever the deadline
cuts off is the least important; every finished run is kept (results.tar is refreshed every 30 s and at the end).

    # here, once: .gpu/ (model copy, data archive, peft wheel), ignored by git, 46 MiB
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_lease.py --prepare
    # on the GPU machine (the device tool, carry [".gpu"]; session 4 ran exactly this, deadline 500, timeout 580 s):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_lease.py --run --out $OUT --deadline 500 --slots 15
    # finished runs are carried in from benchmarks/results/*.jsonl and skipped, so a later lease goes on from there
    # back here: merge the per-job files into benchmarks/results/*.jsonl (deduplicated, fingerprints checked)
    python3 benchmarks/gpu_lease.py --merge /work/.device/.../results.tar
    # here, on the CPU, in about two minutes: every kind of job on tiny sizes (checks the plumbing, not the claim)
    python3 benchmarks/gpu_lease.py --run --smoke --device cpu --out /tmp/lease
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARRY = ROOT / ".gpu"  # ignored folder the lease carries: the model copy, the data archive, wheels
MODEL = ".gpu/minilm"  # MiniLM's weights rounded to float16 (the lease carries at most 64 MiB), loaded as float32
ADA_TASKS = ("sst2", "stsb")
# study prefix of a job label -> the results file its records are merged into
STUDIES = {"eb": "equal_budget_gpu", "dora": "equal_budget_dora_gpu", "alpha": "fish_balanced_alpha_gpu",
           "paper-mrpc": "equal_budget_paper_mrpc", "paper-rte": "equal_budget_paper_rte",
           "paper-sst2": "equal_budget_paper_sst2", "ada-sst2": "adafish_halfT_sst2_gpu",
           "ada-stsb": "adafish_halfT_stsb_gpu"}


def compare_job(label: str, config: str, res: Path, device: str, *overrides: str) -> tuple[str, list[str]]:
    return label, [sys.executable, "-m", "fish_lab", "compare", "--no-report", config, f"name={label}", f"out_dir={res}",
                   f"device={device}", f"model={MODEL}", *overrides]


def jobs(res: Path, device: str, smoke: bool) -> list[tuple[str, list[str]]]:
    """Every job, most important first: the paper-scale runs (the one part of issue 15 only a GPU can run), then
    the equal-budget study (issues 15/16) and the AdaFish arms (issue 14) interleaved, the alpha sweep on held-out
    train, and DoRA at equal budget."""
    tiny = ["train.train_examples=48", "train.dev_examples=48", "train.epochs=1"] if smoke else []
    seeds = [0] if smoke else [0, 1, 2, 3, 4]
    eb_tasks = ["sst2", "mrpc"] if smoke else ["sst2", "stsb", "mrpc", "rte", "cola", "wnli"]
    eb = {s: [compare_job(f"eb-{t}-s{s}", "configs/equal_budget.yaml", res, device, f"tasks=[{t}]",
                          f"seeds=[{s}]", *tiny) for t in eb_tasks] for s in seeds}
    ada = {}
    for task in ADA_TASKS[:1] if smoke else ADA_TASKS:
        ada[task] = []
        for mask in ("dense", "fish"):
            for opt in ("adamw", "adafish"):
                for budget in ("T", "T/2"):
                    label = f"ada-{task}-{mask}-{opt}-{budget.replace('/', '')}"
                    argv = [sys.executable, "benchmarks/adafish_bench.py", "--tasks", task, "--masks", mask,
                            "--optimizers", opt, "--budgets", budget, "--device", device, "--model", MODEL,
                            "--out", str(res / f"{label}.jsonl")] + (["--smoke"] if smoke else [])
                    ada[task].append((label, argv))
    alpha = [compare_job(f"alpha-{t}-a{a:g}", "configs/equal_budget.yaml", res, device, f"tasks=[{t}]",
                         "seeds=[0,1,2]", "strategies=[fish_balanced]", "train.holdout_examples=1000",
                         f"select_kwargs={{fish_balanced: {{alpha: {a}}}}}", *tiny)
             for a in ((0.0, 1.0) if smoke else (0.0, 0.25, 0.75, 1.0, 0.5)) for t in ("sst2", "stsb")]
    dora = [compare_job(f"dora-{t}-s{s}", "configs/equal_budget.yaml", res, device, f"tasks=[{t}]", f"seeds=[{s}]",
                        "methods=[dora]", "strategies=[original,fish,rand]", "select_kwargs={}", *tiny)
            for s in seeds for t in ("sst2", "stsb")]
    paper = [compare_job(f"paper-{t}-s{s}", "configs/equal_budget_paper.yaml", res, device, f"tasks=[{t}]",
                         f"seeds=[{s}]", *(tiny or ["train.epochs=10"])) for s in seeds for t in ("mrpc", "rte")]
    paper += [compare_job(f"paper-sst2-s{s}-{st}", "configs/equal_budget_paper.yaml", res, device, "tasks=[sst2]",
                          f"seeds=[{s}]", f"strategies=[{st}]", *(tiny or ["train.epochs=2"]))
              for s in seeds for st in ("original", "fish", "rand")]
    order = eb[seeds[0]] + ada[ADA_TASKS[0]]
    if not smoke:
        order += eb[1] + ada[ADA_TASKS[1]] + eb[2] + eb[3] + eb[4]
    # paper scale is the one part of issue 15 only a GPU can run. The equal-budget runs the first lease missed were
    # re-run as whole blocks on the CPU (session 6) and DoRA's 5 seeds ran there (session 5): on a GPU they are
    # replicates, after the paper-scale runs
    return paper + order + alpha + dora


def study_of(label: str) -> str:
    for prefix in sorted(STUDIES, key=len, reverse=True):
        if label.startswith(prefix + "-"):
            return prefix
    raise ValueError(f"job label {label!r} names no study")


def prepare() -> None:
    """Here, once: .gpu/ = MiniLM rounded to float16 (45 MB; its float32 file is 91 MB, over the lease's 64 MiB),
    the GLUE data as .tar.xz (from $FISH_DATA_DIR or ../shared/data), and the peft wheel this repo is tested with."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from fish_lab.tasks import local_data_dir
    from fish_tuning.models import resolve_model

    src, dst = Path(resolve_model("minilm")), ROOT / MODEL
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy(f, dst)
    weights = load_file(src / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              dst / "model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(dst / "model.safetensors.tmp", dst / "model.safetensors")  # an interrupted prepare leaves no half file
    with tarfile.open(CARRY / "data.tar.xz.tmp", "w:xz") as tar:
        tar.add(Path(local_data_dir(None)) / "glue", arcname="glue")
    os.replace(CARRY / "data.tar.xz.tmp", CARRY / "data.tar.xz")
    import peft

    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(CARRY), f"peft=={peft.__version__}"], check=True)
    print(f"{CARRY}: {sum(f.stat().st_size for f in CARRY.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def snapshot(res: Path, logs: Path, out: Path) -> None:
    """results.tar holds every job's JSONL and log so far; written beside, then renamed (never half-written)."""
    tmp = out / "results.tar.tmp"
    with tarfile.open(tmp, "w") as tar:
        for folder in (res, logs):
            for f in sorted(folder.glob("*.jsonl" if folder == res else "*")):
                tar.add(f, arcname=f"{folder.name}/{f.name}")
    os.replace(tmp, out / "results.tar")


def seed_results(res: Path, results: Path) -> int:
    """Split the merged study files back into per-job files, so a later lease skips every run already done
    (a compare record names its job in ``config.name``; an AdaFish record's arm is its job)."""
    count = 0
    for study in STUDIES.values():
        path = results / f"{study}.jsonl"
        if not path.is_file():
            continue
        by_job: dict[str, list[str]] = {}
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                label = r["config"]["name"] if "config" in r else (
                    f"ada-{r['task']}-{r['mask']}-{r['optimizer']}-{r['budget'].replace('/', '')}")
                by_job.setdefault(label, []).append(line)
        for label, lines in by_job.items():
            if not (res / f"{label}.jsonl").exists():
                (res / f"{label}.jsonl").write_text("\n".join(lines) + "\n")
                count += len(lines)
    return count


def start_mps(env: dict) -> bool:
    """CUDA MPS lets the slots' small kernels run side by side; if it does not start or serve, run without it."""
    mps = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/mps", "CUDA_MPS_LOG_DIRECTORY": "/tmp/mps-log"}
    for d in mps.values():
        os.makedirs(d, exist_ok=True)
    try:
        started = subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**env, **mps}, timeout=20,
                                 capture_output=True, text=True)
        if started.returncode and "already running" not in started.stdout + started.stderr:  # a 2nd call, warm
            raise subprocess.CalledProcessError(started.returncode, "nvidia-cuda-mps-control -d", started.stderr)
        subprocess.run([sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"],
                       env={**env, **mps}, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        print(f"MPS off: {err}", flush=True)
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env={**env, **mps}, check=False)
        return False
    env.update(mps)
    return True


def run(args) -> int:
    t0 = time.time()
    out = Path(args.out)
    res, logs = Path("/tmp/lease/res"), Path("/tmp/lease/logs")
    for d in (out, res, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT / "lab"), os.environ.get("PYTHONPATH"))
                                         if p)}
    data = CARRY / "data"
    if not data.is_dir():
        data.mkdir()
        with tarfile.open(CARRY / "data.tar.xz") as tar:
            tar.extractall(data, filter="data")
    env["FISH_DATA_DIR"] = str(data)
    mps = args.device.startswith("cuda") and not args.no_mps and start_mps(env)
    if not args.smoke:
        print(f"{seed_results(res, ROOT / 'benchmarks' / 'results')} finished runs carried in", flush=True)
    queue = jobs(res, args.device, args.smoke)
    print(f"{len(queue)} jobs, {args.slots} slots, MPS {'on' if mps else 'off'}, deadline {args.deadline} s",
          flush=True)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: dict[str, int] = {}
    summary, last_snap = [], time.time()
    while (queue or running) and time.time() - t0 < args.deadline:
        for label, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[label]
                summary.append({"job": label, "rc": proc.returncode, "seconds": round(time.time() - start)})
                print(f"[{time.time() - t0:5.0f} s] {label}: rc {proc.returncode} in {time.time() - start:.0f} s",
                      flush=True)
                if proc.returncode:
                    failed[study_of(label)] = failed.get(study_of(label), 0) + 1
        while queue and len(running) < args.slots:
            label, argv = queue.pop(0)
            if failed.get(study_of(label), 0) >= 2:  # a study failing twice is broken: keep its time for others
                summary.append({"job": label, "rc": None, "seconds": 0, "skipped": "its study failed twice"})
                continue
            log = open(logs / f"{label}.log", "w")
            running[label] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True), time.time())
        if time.time() - last_snap > 30:
            snapshot(res, logs, out)
            last_snap = time.time()
        time.sleep(1)
    for label, (proc, start) in running.items():  # the deadline: finished runs are on disk, in-flight ones are lost
        os.killpg(proc.pid, signal.SIGTERM)
        summary.append({"job": label, "rc": "deadline", "seconds": round(time.time() - start)})
    for proc, _ in running.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    summary += [{"job": label, "rc": None, "seconds": 0, "skipped": "deadline"} for label, _ in queue]
    (logs / "summary.json").write_text(json.dumps({"wall_seconds": round(time.time() - t0), "mps": mps,
                                                   "slots": args.slots, "jobs": summary}, indent=1))
    snapshot(res, logs, out)
    bad = [s for s in summary if s["rc"] not in (0, None, "deadline")]
    for s in bad[:4]:
        print(f"--- {s['job']} failed; its log ends:\n" + (logs / f"{s['job']}.log").read_text()[-1500:], flush=True)
    print(f"done in {time.time() - t0:.0f} s: {sum(s['rc'] == 0 for s in summary)} jobs finished, {len(bad)} failed",
          flush=True)
    return 1 if bad else 0


def merge(tar_path: str, dest: Path) -> None:
    """Per-job JSONL files -> one results file per study, deduplicated by run id; records already there win."""
    if not Path(tar_path).is_file() or not tarfile.is_tarfile(tar_path):
        raise SystemExit(f"--merge {tar_path}: not a results.tar (the device tool's files_at folder holds it)")
    by_study: dict[str, list[dict]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            if m.name.startswith("res/") and m.name.endswith(".jsonl"):
                rows = [json.loads(line) for line in tar.extractfile(m).read().decode().splitlines() if line.strip()]
                by_study.setdefault(STUDIES[study_of(Path(m.name).stem)], []).extend(rows)
    for name, rows in sorted(by_study.items()):
        path = dest / f"{name}.jsonl"
        old = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        key = (lambda r: r["id"]) if "id" in (rows or old)[0] else (
            lambda r: (r["task"], r["mask"], r["optimizer"], r["budget"], r["lr"], r["seed"]))
        prints = {r["fingerprint"] for r in old + rows if "fingerprint" in r}
        if len(prints) > 1 and name != STUDIES["alpha"]:  # the alpha sweep: one setup per alpha, by design
            raise SystemExit(f"{name}: runs made with different setups ({sorted(prints)}); not merged")
        seen, merged = set(), []
        for r in old + rows:
            if key(r) not in seen:
                seen.add(key(r))
                merged.append(r)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in merged))
        os.replace(tmp, path)
        print(f"{path}: {len(merged)} runs ({len(merged) - len(old)} new)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="build .gpu/ here (the folder the lease carries)")
    ap.add_argument("--run", action="store_true", help="run the job queue (on the GPU machine)")
    ap.add_argument("--merge", metavar="TAR", help="merge a lease's results.tar into --dest")
    ap.add_argument("--dest", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--out", default="/tmp/lease/out", help="where results.tar is written ($OUT on the device)")
    ap.add_argument("--deadline", type=float, default=470, help="seconds; running jobs are stopped then")
    ap.add_argument("--slots", type=int, default=14, help="jobs at once (one CPU core each)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-mps", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few jobs: checks the plumbing")
    args = ap.parse_args()
    if args.prepare:
        prepare()
        return 0
    if args.merge:
        merge(args.merge, Path(args.dest))
        return 0
    if args.run:
        return run(args)
    ap.error("say --run or --merge")
    return 2


if __name__ == "__main__":
    sys.exit(main())
