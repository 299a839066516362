"""Which parameters each PEFT method adds: the FISH candidates, and what stays fully trainable.

peft tuners live in :mod:`.peft`, the ``adapters`` library in :mod:`.adapters`; both are read from the libraries'
module classes (isinstance checks), so a head or a gate is never mistaken for a candidate because of its name.
"""

from __future__ import annotations

from ..compat import prefix_tuning_compat
from .baselines import baseline_budget, top_layers
from .candidates import always_trainable, method_gates, peft_candidates
from .peft import check_lora_init

__all__ = [
    "always_trainable",
    "baseline_budget",
    "check_lora_init",
    "method_gates",
    "peft_candidates",
    "prefix_tuning_compat",
    "top_layers",
]
