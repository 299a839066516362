"""Where does each AdaFish rule put its step on a real model? Step ratios vs AdamW on MiniLM + LoRA.

MiniLM (all-MiniLM-L6-v2) + LoRA (PiSSA, r=8, q/k/v, as in the issue-7 benchmark), SST-2 train batches of 16 (max
length 64), dropout off, gradients clipped to norm 1. Every optimizer starts from the same weights and sees the same batches; after
step 1 and after step 10 (lr 1e-4, variant paper 1e-9, so the weights barely move and the steps are comparable) we record, per LoRA
factor, the update per unit learning rate:

* ``entry_max``: the largest |update| of one entry (AdamW's first step is sign(g): exactly 1);
* ``col_spread``: for A factors, max / median over the input columns of the column norm of the update: how much of
  the step sits on a few input features (MiniLM's hidden states have a few outlier dimensions);
* ``norm_ratio``: the factor's update norm / AdamW's update norm (1 = AdamW's learning rates transfer);
* ``cos_batch_ps`` (AdaFish "fisher" only): cosine between the steps with the mini-batch and the per-sample Fisher.

    PYTHONPATH=src nice -n 15 python benchmarks/adafish_probe.py    # ~3 min on one loaded CPU core
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab"))  # the lab: outside the package

from fish_lab.tasks import glue_batches, load_glue  # noqa: E402
from fish_tuning.adafish import lora_factors, make_adafish  # noqa: E402
from fish_tuning.models import load_model  # noqa: E402

VARIANTS = {"adamw": None, "fisher": dict(variant="fisher", damping=0.1),
            "fisher_ps": dict(variant="fisher", fisher="per_sample", damping=0.1),
            "fisher_d1e-2": dict(variant="fisher", damping=1e-2), "fisher_d1e-3": dict(variant="fisher", damping=1e-3),
            "fisher_ps_d1e-3": dict(variant="fisher", fisher="per_sample", damping=1e-3),
            "fisher_graft": dict(variant="fisher_graft", damping=1e-3),
            "fisher_colgraft": dict(variant="fisher_colgraft", damping=1e-3), "paper": dict(variant="paper", damping=1e-3),
            "sqrt": dict(variant="sqrt", damping=1e-3), "sqrt_diag": dict(variant="sqrt_diag", damping=1e-3)}
PROBE_STEPS = (1, 10)
LR = 1e-4
LR_PAPER = 1e-9  # the literal step is ~1e5 x AdamW's per unit lr: at 1e-4 it wrecks the model within 10 steps


def build(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model, tok = load_model("minilm", num_labels=2)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
    torch.nn.init.zeros_(model.classifier.bias)
    cfg = LoraConfig(r=8, lora_alpha=8, target_modules=["query", "key", "value"], init_lora_weights="pissa",
                     task_type="SEQ_CLS", lora_dropout=0.0)
    return get_peft_model(model, cfg), tok


def updates(model, name: str, batches: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    """{probe step: {factor name: update / lr}} for one optimizer, from a private copy of the model."""
    model = copy.deepcopy(model)
    kinds = lora_factors(model)
    named = {n: p for n, p in model.named_parameters() if n in kinds}
    kw = VARIANTS[name]
    lr = LR_PAPER if kw is not None and kw["variant"] == "paper" else LR
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr) if kw is None else make_adafish(model, lr=lr, **kw)
    out = {}
    model.eval()  # dropout off: every optimizer sees exactly the same gradients
    for step, batch in enumerate(batches, start=1):
        before = {n: p.detach().clone() for n, p in named.items()}
        opt.zero_grad()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step in PROBE_STEPS:
            out[step] = {n: (p.detach() - before[n]) / -lr for n, p in named.items()}
    return out


def summarise(ups: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], kinds: dict[str, str]) -> dict:
    spread = [(u.norm(dim=0).max() / u.norm(dim=0).median()).item() for n, u in ups.items() if kinds[n] == "A"]
    ratio = [(u.norm() / ref[n].norm()).item() for n, u in ups.items()]
    return {"entry_max": max(u.abs().max().item() for u in ups.values()),
            "col_spread_max": max(spread), "col_spread_median": statistics.median(spread),
            "norm_ratio_median": statistics.median(ratio), "norm_ratio_min": min(ratio), "norm_ratio_max": max(ratio)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adafish_probe.json"))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(1)
    res = {"config": {"lr": LR, "lr_paper": LR_PAPER, "probe_steps": PROBE_STEPS, "batch": 16, "max_length": 64, "clip": 1.0,
                      "variants": VARIANTS}, "runs": []}
    data = load_glue("sst2", "train", limit=16 * max(PROBE_STEPS), seed=0)
    for seed in args.seeds:
        model, tok = build(seed)
        batches = glue_batches(data, tok, 16, 64, shuffle=True, seed=seed)
        kinds = lora_factors(model)
        per = {name: updates(model, name, batches) for name in VARIANTS}
        for step in PROBE_STEPS:
            for name, ups in per.items():
                row = {"seed": seed, "step": step, "optimizer": name,
                       **summarise(ups[step], per["adamw"][step], kinds)}
                if name == "fisher":
                    cos = [torch.nn.functional.cosine_similarity(u.flatten(), per["fisher_ps"][step][n].flatten(),
                                                                 dim=0).item() for n, u in ups[step].items()]
                    row["cos_batch_ps_median"] = statistics.median(cos)
                res["runs"].append(row)
                print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
