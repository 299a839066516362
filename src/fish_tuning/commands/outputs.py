"""What `fish-tune train` leaves in ``output_dir`` beside the adapter: ``train_results.json``,
``eval_results.json``, ``trainer_state.json`` (the Trainer's own formats), predictions and the model card.

``train_runtime`` is the training alone: the Fisher pass is ``fisher_runtime``, so a FISH run and a dense one
compare on the same footing. The final evaluation runs once: an evaluation the Trainer already made at the last
step (``--eval_strategy``) is reused unless ``--load_best_model_at_end`` swapped the weights afterwards.
"""

from __future__ import annotations

import json
from typing import Any

RATES = ("train_samples_per_second", "train_steps_per_second")


def train_metrics(metrics: dict[str, Any], fisher_runtime: float) -> dict[str, Any]:
    """The Trainer's train metrics with the Fisher pass taken out of ``train_runtime`` (and its rates)."""
    out = dict(metrics)
    total = float(out.get("train_runtime", 0.0))
    train = max(total - fisher_runtime, 1e-9)
    if total > 0:
        out["train_runtime"] = round(train, 4)
        for key in RATES:
            if key in out:
                out[key] = round(float(out[key]) * total / train, 3)
    out["fisher_runtime"] = round(fisher_runtime, 4)
    return out


def final_evaluation(trainer) -> dict[str, float]:
    """The evaluation of the weights being saved: the one made at the last step if there is one, else a new one."""
    state, args = trainer.state, trainer.args
    if not args.load_best_model_at_end:
        for entry in reversed(state.log_history):
            if entry.get("step") != state.global_step:
                break
            if "eval_loss" in entry:
                return {k: v for k, v in entry.items() if k != "step"}
    return trainer.evaluate()


def eval_line(metrics: dict[str, Any], describe: str | None, constant: Any = None) -> str:
    """``eval: accuracy 0.8125 | trivial baseline (always 'pos') 0.5000 | ...`` -- the score beside what a
    constant predictor gets, so a run that learned nothing shows as such."""
    parts = []
    if "eval_score" in metrics:
        rule = "" if constant is None else f" ({constant})"
        parts.append(f"{describe} {metrics['eval_score']:.4f} | trivial baseline{rule} "
                     f"{metrics.get('eval_trivial_score', float('nan')):.4f}")
        if metrics["eval_score"] <= metrics.get("eval_trivial_score", float("-inf")):
            parts.append("NOT above the trivial baseline")
    shown = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_") and "trivial" not in k
             and k not in ("eval_score", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")}
    parts.append(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()))
    return "eval: " + " | ".join(parts)


def write_json(path, data: dict) -> None:
    from ..files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# offline aliases -> the hub id of the same weights, so the saved adapter names a base anyone can load
PORTABLE_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
LABEL_CONFIG = "label_config.json"


def portable_base(name: str) -> str:
    """The base model id to record: the hub id behind an alias, else what the user gave (not this machine's
    site-packages path the alias resolved to)."""
    return PORTABLE_IDS.get(name.lower(), name)


def set_base_model(folder: str, base: str) -> None:
    """Rewrite ``base_model_name_or_path`` in every adapter_config.json under ``folder`` (atomically)."""
    import os

    for root, _, files in os.walk(folder):
        if "adapter_config.json" in files and not os.path.basename(root).startswith("checkpoint-"):
            path = os.path.join(root, "adapter_config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
            config["base_model_name_or_path"] = base
            write_json(path, config)


def label_config(info: dict) -> dict | None:
    """``from_pretrained`` keywords that rebuild the head with its label names (None for causal-LM).

    Written as ``label_config.json`` and not as ``config.json``: a config.json makes transformers take the
    folder for a full model and look for its weights there, so ``from_pretrained(output_dir)`` would fail.
    """
    if info["task"] == "regression":
        return {"num_labels": 1, "problem_type": "regression"}
    if info["task"] != "classification":
        return None
    names = info["label_names"]
    return {"num_labels": len(names), "problem_type": "single_label_classification",
            "id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def write_predictions(path: str, predictions, info: dict) -> int:
    """``index<TAB>prediction`` per test row (label names for classification), as run_glue.py writes them."""
    import numpy as np

    out = predictions[0] if isinstance(predictions, tuple) else predictions
    if info["task"] == "regression":
        values = [f"{v:.6g}" for v in np.asarray(out, dtype=float).reshape(-1)]
    else:
        values = [info["label_names"][i] for i in np.argmax(out, axis=-1)]
    from ..files import atomic_write_text

    atomic_write_text(path, "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
    return len(values)
