"""The same tasks from the Hugging Face hub through `datasets`, for users online without a local data folder."""

from __future__ import annotations

from .tasks import GlueTask

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
