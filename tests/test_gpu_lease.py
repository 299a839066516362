"""benchmarks/gpu_lease.py: the job queue of a GPU lease is well formed, and its per-job files merge into one results
file per study without duplicates, refusing runs of different setups."""

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lease():
    spec = importlib.util.spec_from_file_location("gpu_lease", ROOT / "benchmarks" / "gpu_lease.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar(path: Path, files: dict[str, list[dict]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, rows in files.items():
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            info = tarfile.TarInfo(f"res/{name}.jsonl")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_every_job_names_a_study_and_the_paper_scale_runs_come_first(tmp_path):
    gl = lease()
    jobs = gl.jobs(tmp_path, "cuda", smoke=False)
    labels = [label for label, _ in jobs]
    assert len(labels) == len(set(labels))
    assert {gl.study_of(label) for label in labels} == set(gl.STUDIES)
    assert len([x for x in labels if x.startswith("eb-")]) == 30  # 6 tasks x 5 seeds
    assert len([x for x in labels if x.startswith("ada-")]) == 16  # 2 tasks x 2 masks x 2 optimizers x 2 budgets
    assert labels[0] == "paper-mrpc-s0" and labels.index("paper-sst2-s4-rand") < labels.index("eb-sst2-s0")
    assert labels.index("eb-wnli-s4") < labels.index("alpha-sst2-a0") < labels.index("dora-sst2-s0")
    for label, argv in jobs:
        if "compare" in argv:
            assert f"name={label}" in argv and "device=cuda" in argv and "--no-report" in argv


def test_merge_dedupes_and_keeps_what_is_there(tmp_path):
    gl = lease()
    dest = tmp_path / "results"
    dest.mkdir()
    (dest / "equal_budget_gpu.jsonl").write_text(json.dumps({"id": "a", "fingerprint": "f", "score": 1}) + "\n")
    tar = _tar(tmp_path / "r.tar", {"eb-sst2-s0": [{"id": "a", "fingerprint": "f", "score": 2},
                                                   {"id": "b", "fingerprint": "f", "score": 3}],
                                    "eb-mrpc-s0": [{"id": "c", "fingerprint": "f", "score": 4}],
                                    "ada-sst2-dense-adamw-T": [{"task": "sst2", "mask": "dense", "optimizer": "adamw",
                                                                "budget": "T", "lr": 0.001, "seed": 0}]})
    gl.merge(str(tar), dest)
    rows = [json.loads(line) for line in (dest / "equal_budget_gpu.jsonl").read_text().splitlines()]
    assert [(r["id"], r["score"]) for r in rows] == [("a", 1), ("b", 3), ("c", 4)]
    assert len((dest / "adafish_halfT_sst2_gpu.jsonl").read_text().splitlines()) == 1
    gl.merge(str(tar), dest)  # merging twice adds nothing
    assert len((dest / "equal_budget_gpu.jsonl").read_text().splitlines()) == 3


def test_merge_refuses_mixed_setups(tmp_path):
    gl = lease()
    tar = _tar(tmp_path / "r.tar", {"eb-sst2-s0": [{"id": "a", "fingerprint": "f"}],
                                    "eb-sst2-s1": [{"id": "b", "fingerprint": "g"}]})
    with pytest.raises(SystemExit, match="different setups"):
        gl.merge(str(tar), tmp_path)
    assert not (tmp_path / "equal_budget_gpu.jsonl").exists()


def test_a_later_lease_starts_from_the_merged_files(tmp_path):
    gl = lease()
    results, res = tmp_path / "results", tmp_path / "res"
    results.mkdir()
    res.mkdir()
    eb = [{"id": "a", "config": {"name": "eb-sst2-s0"}}, {"id": "b", "config": {"name": "eb-mrpc-s1"}}]
    ada = [{"task": "stsb", "mask": "fish", "optimizer": "adafish", "budget": "T/2", "lr": 0.01, "seed": 3}]
    (results / "equal_budget_gpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eb))
    (results / "adafish_halfT_stsb_gpu.jsonl").write_text(json.dumps(ada[0]) + "\n")
    assert gl.seed_results(res, results) == 3
    assert json.loads((res / "eb-mrpc-s1.jsonl").read_text()) == eb[1]
    assert json.loads((res / "ada-stsb-fish-adafish-T2.jsonl").read_text()) == ada[0]
    labels = {label for label, _ in gl.jobs(res, "cuda", smoke=False)}
    assert {"eb-sst2-s0", "eb-mrpc-s1", "ada-stsb-fish-adafish-T2"} <= labels  # the files the jobs will resume
    assert gl.seed_results(res, results) == 0  # a job's own file is never overwritten


def test_merge_of_a_missing_or_foreign_file_says_so(tmp_path):
    gl = lease()
    (tmp_path / "notes.txt").write_text("not a tar")
    for bad in (tmp_path / "absent.tar", tmp_path / "notes.txt"):
        with pytest.raises(SystemExit, match="not a results.tar"):
            gl.merge(str(bad), tmp_path)
