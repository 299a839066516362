"""The model card (README.md) `fish-tune train` writes in place of peft's empty template: what was trained, how
FISH chose the entries and where the budget went, the metrics beside the trivial baseline, and how to load it."""

from __future__ import annotations

from typing import Any


def _alias_of(base: str) -> str | None:
    from .outputs import PORTABLE_IDS

    return next((alias for alias, hub in PORTABLE_IDS.items() if hub == base), None)


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f} %" if b else "-"


def model_card(*, base: str, info: dict, peft: Any, summary: dict | None, train: dict, evaluation: dict,
               describe: str | None, args: Any, dense: bool) -> str:
    task = info["task"]
    lines = ["---", f"base_model: {base}", "library_name: peft", "tags:", "- fish-tuning", f"- {peft.peft}",
             f"- base_model:adapter:{base}", "---", "", f"# {peft.peft} adapter of {base}, trained with FISH-Tuning",
             ""]
    texts = f"`{info['text']}` + `{info['pair']}` (pair)" if info.get("pair") else f"`{info.get('text')}`"
    if task == "causal-lm":
        lines.append(f"Task: causal-LM SFT ({info['sft_format']}).")
    else:
        labels = "numbers" if task == "regression" else ", ".join(repr(n) for n in info["label_names"])
        lines.append(f"Task: {task}; text {texts}; label `{info['label']}` ({labels}).")
    lines += ["", "## FISH", ""]
    if summary is None:
        lines.append("The run ended inside the dense warm-up: no mask was selected and every adapter entry trained.")
    else:
        k, n, cfg = summary["num_selected"], summary["num_candidates"], summary.get("fish_config") or {}
        if dense:
            lines.append(f"Dense baseline (`--keep 1.0`): all {n:,} PEFT entries trained; no Fisher pass.")
        else:
            fisher = summary.get("fisher") or {}
            lines.append(f"Trained **{k:,} of {n:,}** PEFT entries ({_pct(k, n)}; k = {k:,}), chosen by "
                         f"strategy `{cfg.get('strategy')}`, allocation `{cfg.get('allocation')}`, score "
                         f"`{cfg.get('score')}` from the {fisher.get('kind', 'empirical')} Fisher of "
                         f"{fisher.get('num_samples', '?')} calibration samples; the other entries never changed.")
        lines.append(f"Trainable in total: {summary['trainable']:,} (the kept entries + "
                     f"{summary['trainable'] - k:,} always trained, e.g. the head).")
        lines += ["", "Where the budget went (kept / candidates):", "", "| part | kept | candidates | share of k |",
                  "|---|---|---|---|"]
        for kind, (kept, total) in summary["per_kind"].items():
            lines.append(f"| {kind} | {kept:,} | {total:,} | {_pct(kept, k)} |")
        for layer, kept, total in summary["per_layer"]:
            lines.append(f"| layer {layer} | {kept:,} | {total:,} | {_pct(kept, k)} |")
        lines += ["", "`fish_mask.json` has the full summary (a layers x modules grid); "
                  "`fish-tune mask --show fish_mask.safetensors` draws it."]
    lines += ["", "## Results", ""]
    if "eval_score" in evaluation:
        lines += ["| metric | this run | trivial baseline |", "|---|---|---|"]
        lines.append(f"| **{describe}** | **{evaluation['eval_score']:.4f}** | "
                     f"{evaluation.get('eval_trivial_score', float('nan')):.4f} |")
        for key, value in evaluation.items():
            name = key[5:]
            if key.startswith("eval_") and not name.startswith("trivial_") and name not in (
                    "score", "runtime", "samples_per_second", "steps_per_second", "epoch") and isinstance(value,
                                                                                                        float):
                trivial = evaluation.get(f"eval_trivial_{name}")
                lines.append(f"| {name} | {value:.4f} | {'' if trivial is None else f'{trivial:.4f}'} |")
        lines += ["", "The trivial baseline predicts the majority train class (regression: the train mean)."]
    elif "eval_loss" in evaluation:
        lines.append(f"Validation loss: {evaluation['eval_loss']:.4f}.")
    else:
        lines.append("No validation data was given.")
    lines.append(f"Training: {train.get('train_runtime', 0):.1f} s ({args.max_steps if args.max_steps > 0 else ''}"
                 f"{' steps' if args.max_steps > 0 else f'{args.num_train_epochs:g} epochs'}, learning rate "
                 f"{args.learning_rate:g}), Fisher pass {train.get('fisher_runtime', 0):.1f} s, final train loss "
                 f"{train.get('train_loss', float('nan')):.4f}.")
    head = "AutoModelForCausalLM" if task == "causal-lm" else "AutoModelForSequenceClassification"
    labels = [] if task == "causal-lm" else [
        "labels = json.load(open(f'{out}/label_config.json'))  # num_labels, problem_type, id2label, label2id",
        "if 'id2label' in labels:  # JSON keys are strings",
        "    labels['id2label'] = {int(i): name for i, name in labels['id2label'].items()}"]
    lines += ["", "## Load", "", "```python", "import json", "import fish_tuning as ft",
              f"from transformers import {head}", "", "out = 'path/to/this/folder'", *labels,
              f"base = {head}.from_pretrained('{base}'{'' if task == 'causal-lm' else ', **labels'})",
              "model, mask = ft.load_adapter(base, out)  # checks the mask belongs to these adapter weights",
              *([f"# offline: fish_tuning.models.resolve_model('{alias}') is the local copy of {base}"]
                if (alias := _alias_of(base)) else []),
              "```", "", "Trained with [fish-tuning](https://arxiv.org/abs/2504.04050) (`fish-tune train`).", ""]
    return "\n".join(lines)
