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
