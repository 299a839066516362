"""GLUE-6 and GSM8K readers (local TSV/JSONL files, read in place) and tokenisation into model batches."""

from __future__ import annotations

import csv
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_ENV = "FISH_DATA_DIR"


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's files are and how to read one example."""

    name: str
    folder: str
    train_file: str
    dev_file: str
    header: bool
    text_a: str | int
    text_b: str | int | None
    label: str | int
    num_labels: int  # 1 = regression
    metric: str
    label_map: tuple[tuple[str, int], ...] | None = None


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", "train.tsv", "dev.tsv", False, 3, None, 1, 2, "mcc"),
    "sst2": GlueTask("sst2", "SST-2", "train.tsv", "dev.tsv", True, "sentence", None, "label", 2, "accuracy"),
    "mrpc": GlueTask("mrpc", "MRPC", "train_full.tsv", "dev.tsv", True, "#1 String", "#2 String", "Quality", 2,
                     "f1_acc"),
    "rte": GlueTask("rte", "RTE", "train.tsv", "dev.tsv", True, "sentence1", "sentence2", "label", 2, "accuracy",
                    (("entailment", 0), ("not_entailment", 1))),
    "stsb": GlueTask("stsb", "STS-B", "train.tsv", "dev.tsv", True, "sentence1", "sentence2", "score", 1,
                     "pearson_spearman"),
    "wnli": GlueTask("wnli", "WNLI", "train.tsv", "dev.tsv", True, "sentence1", "sentence2", "label", 2, "accuracy"),
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "gsm8k": "gsm8k"}


def task_spec(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir`` argument, else ``$FISH_DATA_DIR``, else a ``shared/data`` folder beside the working directory
    or the source checkout (``../shared/data`` from the repo root)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data dir {path} does not exist; pass --data-dir or set ${DATA_ENV} to the "
                                    "folder holding glue/ and gsm8k/")
        return path
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        cand = base / "shared" / "data"
        if (cand / "glue").is_dir():
            return cand
        cand = base.parent / "shared" / "data"
        if (cand / "glue").is_dir():
            return cand
    raise FileNotFoundError(
        f"no data dir found: pass --data-dir DIR (or set ${DATA_ENV}) to a folder with glue/<TASK>/*.tsv and "
        "gsm8k/*.jsonl; online users can load the same tasks from the hub with the `datasets` package"
    )


def _col(row: list[str], header: dict[str, int] | None, key: str | int) -> str:
    return row[key] if isinstance(key, int) else row[header[key]]


def load_glue(task: str, split: str = "train", data_dir: str | os.PathLike | None = None,
              limit: int | None = None, seed: int | None = None) -> list[dict]:
    """Examples ``{"text_a", "text_b", "label"}`` of one GLUE task split ("train" or "dev").

    ``limit`` keeps a random subset (seeded by ``seed``, else the first rows) so CPU-scale runs stay representative.
    """
    spec = task_spec(task)
    if split not in ("train", "dev", "validation"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    local = local_data_dir(data_dir)
    if local is None:  # nothing given and no shared/data folder: the same task from the hub (needs internet)
        return _subset(glue_from_hub(spec, split), limit, seed)
    path = local / "glue" / spec.folder / (spec.train_file if split == "train" else spec.dev_file)
    if not path.is_file():
        raise FileNotFoundError(f"{spec.name} {split} file missing: {path}")
    csv.field_size_limit(sys.maxsize)
    label_map = dict(spec.label_map) if spec.label_map else None
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = {name: i for i, name in enumerate(next(reader))} if spec.header else None
        width = len(header) if header else 4
        for row in reader:
            if len(row) < width:
                continue  # a handful of malformed lines in some GLUE dumps
            raw = _col(row, header, spec.label)
            label = float(raw) if spec.num_labels == 1 else (label_map[raw] if label_map else int(raw))
            out.append({"text_a": _col(row, header, spec.text_a),
                        "text_b": _col(row, header, spec.text_b) if spec.text_b is not None else None,
                        "label": label})
    return _subset(out, limit, seed)


def _subset(rows: list[dict], limit: int | None, seed: int | None) -> list[dict]:
    if limit is not None and limit < len(rows):
        return random.Random(seed).sample(rows, limit) if seed is not None else rows[:limit]
    return rows


def local_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local data folder, or None when none is given or found: then the tasks come from the hub (`datasets`)."""
    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        if data_dir is not None or os.environ.get(DATA_ENV):
            raise  # an explicit folder that does not exist is an error, never a silent download
        return None


def load_gsm8k(split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """GSM8K problems ``{"question", "answer", "final"}``; ``final`` is the number after ``####``."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    local = local_data_dir(data_dir)
    if local is None:
        items = gsm8k_from_hub(split)
    else:
        path = local / "gsm8k" / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"GSM8K {split} file missing: {path}")
        with open(path, encoding="utf-8") as f:
            items = [json.loads(line) for line in f if line.strip()]
    out = []
    for item in items[:limit] if limit is not None else items:
        final = item["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        out.append({"question": item["question"], "answer": item["answer"], "final": final})
    return out


def glue_batches(examples: list[dict], tokenizer, batch_size: int = 32, max_length: int = 128,
                 shuffle: bool = False, seed: int = 0, group_by_length: bool = False) -> list[dict]:
    """Tokenised batches with ``labels`` (long for classification, float for regression), padded per batch.

    ``group_by_length``: within windows of 50 batches (of the shuffled order), examples of similar length (in
    characters) share a batch, so little compute goes to padding; the order of the batches is then shuffled again.
    """
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    if group_by_length:
        def size(i: int) -> int:
            return len(examples[i]["text_a"]) + len(examples[i]["text_b"] or "")

        window = 50 * batch_size
        order = [i for s in range(0, len(order), window) for i in sorted(order[s: s + window], key=size)]
        chunks = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
        if shuffle:
            random.Random(seed + 1).shuffle(chunks)
        order = [i for chunk in chunks for i in chunk]
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start: start + batch_size]]
        a = [e["text_a"] for e in chunk]
        b = [e["text_b"] for e in chunk] if chunk[0]["text_b"] is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        labels = [e["label"] for e in chunk]
        dtype = torch.float32 if isinstance(labels[0], float) else torch.long
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.tensor(labels, dtype=dtype)
        batches.append(batch)
    return batches


# ---- the same tasks from the Hugging Face hub through `datasets`, for users online without a local data folder
GLUE_HUB = "nyu-mll/glue"
GSM8K_HUB = ("openai/gsm8k", "main")
_TEXT_FIELDS = {"cola": ("sentence", None), "sst2": ("sentence", None)}  # the rest use sentence1 / sentence2


def _load_dataset():
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise FileNotFoundError(
            "no local data dir and the `datasets` package is missing: pass --data-dir DIR (or set $FISH_DATA_DIR), "
            "or pip install 'fish-tuning[hub]' to load the tasks from the Hugging Face hub"
        ) from err
    return load_dataset


def glue_from_hub(spec: GlueTask, split: str) -> list[dict]:
    """Rows of ``nyu-mll/glue`` in the local reader's format; labels match the local files (RTE: 0 = entailment)."""
    rows = _load_dataset()(GLUE_HUB, spec.name, split="train" if split == "train" else "validation")
    a, b = _TEXT_FIELDS.get(spec.name, ("sentence1", "sentence2"))
    cast = float if spec.num_labels == 1 else int
    return [{"text_a": r[a], "text_b": r[b] if b else None, "label": cast(r["label"])} for r in rows]


def gsm8k_from_hub(split: str) -> list[dict]:
    """``openai/gsm8k`` (config ``main``) rows as ``{"question", "answer"}``."""
    name, config = GSM8K_HUB
    return [{"question": r["question"], "answer": r["answer"]} for r in _load_dataset()(name, config, split=split)]
