"""What to do when a PEFT method's initialisation gives some candidates zero Fisher (so FISH can never pick them)."""

from __future__ import annotations

EMBEDDING_ADVICE = (
    "peft initialises lora_embedding_A to zeros for every init_lora_weights (PiSSA does not apply to embeddings), "
    "so every entry of lora_embedding_B has zero gradient and zero Fisher and FISH never trains it. Train the "
    "embedding LoRA outside the budget (always_train=r'lora_embedding_'), leave it out (exclude=...), or give "
    "lora_embedding_A small random values before the Fisher pass."
)


def zero_fisher_hint(zero: list[str]) -> str:
    """Advice for candidate tensors whose Fisher is zero everywhere, by the PEFT method their names show."""
    parts = []
    if any("lora_embedding_B" in n for n in zero):
        parts.append(EMBEDDING_ADVICE)
    if any("lora_A" in n for n in zero):
        hint = ("With LoRA's default init (B = 0) every entry of A has zero gradient, so its Fisher is 0 and a FISH "
                "mask can never select A. Use the paper's init: ")
        if any(".loras." in n for n in zero):  # the adapters library's LoRA (also inside UniPELT)
            hint += "adapters' LoRAConfig(init_weights='bert') (it has no PiSSA; B must be non-zero)."
        else:
            hint += "peft's LoraConfig(init_lora_weights='pissa')."
        parts.append(hint)
    if any(".hada_" in n or ".lokr_" in n for n in zero):
        parts.append("LoHa / LoKr start with one factor at zero (so the update is 0 at init), which gives every "
                     "other factor zero gradient and zero Fisher: FISH can then pick only inside the zero factor. "
                     "Create the adapter with init_weights=False (random factors; the model then changes at init) "
                     "if all factors should be selectable.")
    if any("adaption_prompt" in n for n in zero):
        parts.append("LLaMA-Adapter's gate starts at 0, so its prompts have zero gradient and zero Fisher: train the "
                     "gate a few steps first (or set it to a small value) before the Fisher pass, or train the prompts "
                     "outside the budget (always_train=r'adaption_prompt').")
    return " ".join(parts) or "These entries can only be picked by 'rand' or as ties; check that they influence the loss."
