"""The paper's tasks as plain files for `fish-tune train` / `fish-tune compare` (the user's path): GLUE tasks as
CSV (``sentence`` or ``sentence1`` + ``sentence2``, ``label``), GSM8K as prompt / completion JSON lines.

    python -m fish_lab data sst2 data/sst2 && fish-tune compare --model_name_or_path minilm \\
        --train_file data/sst2/train.csv --validation_file data/sst2/dev.csv --arms original,fish,rand --seeds 0,1
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from fish_tuning.files import atomic_write

from .gsm8k import prompt_of
from .tasks import GLUE_TASKS, load_glue, load_gsm8k, task_spec


def _write_csv(path: Path, rows: list[dict], pair: bool) -> None:
    header = ["sentence1", "sentence2", "label"] if pair else ["sentence", "label"]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in rows:
                w.writerow([r["text_a"], r["text_b"], r["label"]] if pair else [r["text_a"], r["label"]])

    atomic_write(path, write)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"prompt": prompt_of(r), "completion": " " + r["answer"]}) + "\n")

    atomic_write(path, write)


def export_task(task: str, out: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                train_examples: int | None = None, dev_examples: int | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``out/train.*`` and ``out/dev.*`` for ``task`` (a GLUE task or ``gsm8k``); returns the two paths.
    ``*_examples`` keep a subset as the lab's studies draw it (GLUE: seeded random rows; GSM8K: the first rows),
    None keeps every row."""
    out = Path(out)
    if task == "gsm8k":
        paths = {"train": out / "train.jsonl", "dev": out / "dev.jsonl"}
        _write_jsonl(paths["train"], load_gsm8k("train", data_dir, train_examples))
        _write_jsonl(paths["dev"], load_gsm8k("test", data_dir, dev_examples))
        return paths
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join([*GLUE_TASKS, 'gsm8k'])}")
    pair = task_spec(task).text_b is not None
    paths = {"train": out / "train.csv", "dev": out / "dev.csv"}
    _write_csv(paths["train"], load_glue(task, "train", data_dir, train_examples, seed), pair)
    _write_csv(paths["dev"], load_glue(task, "dev", data_dir, dev_examples, seed), pair)
    return paths
