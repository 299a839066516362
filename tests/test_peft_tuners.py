"""FISH on every peft tuner that adds parameters, from peft's own declarations (``adapter_layer_names``).

For each tuner, on tiny BERT and tiny Llama: the candidates are exactly the trainable parameters the tuner added
(heads aside), the hooked Fisher equals the per-sample loop, and masked training moves only kept entries.
"""

import warnings

import peft
import pytest
import torch
from peft import get_peft_model

import fish_tuning as ft
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from fish_tuning.compat import prefix_tuning_compat
from fish_tuning.methods import method_gates
from helpers import assert_only_kept_moved, snapshot

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}

# tuner -> extra config arguments (sizes fitted to the 32-wide tiny models); "r" is set where the config has it
TUNERS = {
    "LoraConfig": dict(init_lora_weights="pissa"),
    "LoraConfig+dora": dict(init_lora_weights="pissa", use_dora=True),
    "AdaLoraConfig": dict(total_step=10, init_r=4, target_r=2),
    "AdamssConfig": {},
    "BeftConfig": {},
    "BOFTConfig": {},
    "C3AConfig": dict(block_size=8),
    "DeftConfig": {},
    "DeloraConfig": {},
    "FourierFTConfig": dict(n_frequency=64),
    "FrodConfig": {},
    "GloraConfig": {},
    "GraloraConfig": {},
    "HiraConfig": {},
    "HRAConfig": {},
    "IA3Config": {},
    "LilyConfig": {},
    "LNTuningConfig": dict(target_modules={"bert": ["LayerNorm"], "llama": ["input_layernorm"]}),
    "LoHaConfig": {},
    "LoKrConfig": {},
    "MissConfig": {},
    "OFTConfig": dict(r=0, oft_block_size=8),
    "OSFConfig": {},
    "PeanutConfig": {},
    "PsoftConfig": {},
    "PveraConfig": {},
    "RandLoraConfig": {},
    "RoadConfig": dict(group_size=8),
    "ShiraConfig": {},
    "SupertuningConfig": {},
    "TinyLoraConfig": {},
    "UniLoraConfig": {},
    "VBLoRAConfig": dict(vector_length=8, num_vectors=16),
    "VeraConfig": {},
    "WaveFTConfig": dict(n_frequency=64),
    "TrainableTokensConfig": dict(token_indices=[1, 2, 3],
                                  target_modules={"bert": ["word_embeddings"], "llama": ["embed_tokens"]}),
    "AdaptionPromptConfig": dict(adapter_len=4, adapter_layers=1, target_modules=None, arch_only="llama"),
    "CartridgeConfig": dict(num_virtual_tokens=4, target_modules=None),
    "PrefixTuningConfig": dict(num_virtual_tokens=4, target_modules=None),
    "PromptTuningConfig": dict(num_virtual_tokens=4, target_modules=None),
    "PromptEncoderConfig": dict(num_virtual_tokens=4, encoder_hidden_size=16, target_modules=None),
}


def build(tuner: str, arch: str):
    import inspect

    cls_name, _, variant = tuner.partition("+")
    cls = getattr(peft, cls_name, None)
    if cls is None:
        pytest.skip(f"peft {peft.__version__} has no {cls_name}")
    kw = {"task_type": "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"}
    params = inspect.signature(cls).parameters
    if "target_modules" in params:
        kw["target_modules"] = TARGETS[arch]
    if "r" in params:
        kw["r"] = 4
    extra = dict(TUNERS[tuner])
    only = extra.pop("arch_only", None)
    if only is not None and only != arch:
        pytest.skip(f"{cls_name} supports {only}-style models only (peft's own restriction)")
    kw.update({k: (v[arch] if isinstance(v, dict) else v) for k, v in extra.items()})
    kw = {k: v for k, v in kw.items() if v is not None or k != "target_modules"}
    base = tiny_bert() if arch == "bert" else tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, cls(**kw))
    if cls_name in ("PrefixTuningConfig", "CartridgeConfig"):
        prefix_tuning_compat(model)
    return model


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_fish_on_every_peft_tuner(tuner, arch):
    model = build(tuner, arch)
    batches = cls_batches(1, batch_size=6) if arch == "bert" else lm_batches(1, batch_size=6)
    cand = ft.peft_candidates(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    gates = set(method_gates(model))
    assert cand and set(cand) == {n for n in trainable if "modules_to_save" not in n and n not in gates}, \
        "a tuner parameter is missed"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        auto = ft.compute_fisher(model, batches, num_samples=6, params=cand, progress=False)
        loop = ft.compute_fisher(model, batches, num_samples=6, params=cand, engine="loop", progress=False)
    for n in cand:
        torch.testing.assert_close(auto[n], loop[n], rtol=2e-4, atol=1e-10, msg=f"Fisher of {n}")

    heads = [n for n in trainable if n not in set(cand)]
    scores = {**auto, **{n: torch.zeros_like(model.get_parameter(n)) for n in heads}}
    mask = ft.select_mask(scores, keep=0.3, always_train=[f"^{n}$" for n in heads] or None)
    before = snapshot(model)
    opt = ft.make_optimizer(model, mask, lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(2):
        for batch in batches:
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
    moved = assert_only_kept_moved(model, mask, before)
    assert moved > 0, "no kept entry moved"


def test_zero_factor_init_of_loha_is_named():
    model = build("LoHaConfig", "bert")
    with pytest.warns(ft.ZeroFisherWarning, match="LoHa / LoKr start with one factor at zero"):
        ft.compute_fisher(model, cls_batches(1, batch_size=4), num_samples=4, params=ft.peft_candidates(model),
                          progress=False)
