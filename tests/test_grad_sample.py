"""Per-sample rules beyond nn.Linear (fish_tuning.grad_sample): (IA)³, DoRA, prompt tables, LoRA embedding.

For each, on tiny BERT and tiny Llama: ``engine="auto"`` stays on the vectorised engine (read from the engine line
compute_fisher logs) and equals the brute-force per-sample loop (``engine="loop"``) to rtol 2e-4 (float32 sums
in another order). Rules that are wrong in the batch sum, or right in the sum but not per sample, fall back to
the loop with the reason logged.
"""

import contextlib
import logging
import warnings

import peft
import pytest
import torch
from peft import get_peft_model

import fish_tuning as ft
import fish_tuning.grad_sample as gs
from conftest import cls_batches, lm_batches, tiny_bert, tiny_llama
from fish_tuning.compat import prefix_tuning_compat
from fish_tuning.per_sample import PerSampleHooks

RTOL, ATOL = 2e-4, 1e-10
TARGETS = {"bert": ["query", "value", "intermediate.dense", "output.dense"],
           "llama": ["q_proj", "v_proj", "up_proj", "down_proj"]}
FEEDFORWARD = {"bert": ["intermediate.dense"], "llama": ["down_proj"]}
EMBED = {"bert": "word_embeddings", "llama": "embed_tokens"}


def config(method: str, arch: str):
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    if method == "ia3":  # feed-forward (scales the input) and attention (scales the output) layers
        return peft.IA3Config(target_modules=TARGETS[arch], feedforward_modules=FEEDFORWARD[arch], task_type=task)
    if method == "ia3_all_ff":
        return peft.IA3Config(target_modules=FEEDFORWARD[arch], feedforward_modules=FEEDFORWARD[arch], task_type=task)
    if method == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch][:2], use_dora=True,
                               init_lora_weights="pissa", lora_dropout=0.0, task_type=task)
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=4, task_type=task)
    if method == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type=task)
    if method == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=4, task_type=task)
    if method == "lora_embedding":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=[EMBED[arch]], task_type=task)
    raise KeyError(method)


def build(method: str, arch: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_bert() if arch == "bert" else tiny_llama(), config(method, arch))
    if method == "prefix":
        prefix_tuning_compat(model)
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "ia3_l" in name:  # away from the all-ones init, so a wrong factor of l would show
            p.data.copy_(torch.rand(p.shape, generator=g) + 0.5)
        if "lora_embedding_A" in name:  # peft starts it at zero, which makes B's Fisher zero
            p.data.copy_(torch.randn(p.shape, generator=g))
    return model


def batches_for(arch: str):
    return cls_batches(2, batch_size=6) if arch == "bert" else lm_batches(2, batch_size=6)


@contextlib.contextmanager
def engine_log():
    """The messages compute_fisher logs (its logger hangs below transformers', which does not propagate)."""
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("fish_tuning")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def fisher(model, batches, engine="auto"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        return ft.compute_fisher(model, batches, num_samples=12, params=ft.peft_candidates(model), engine=engine,
                                 progress=False)


def assert_same(got, want):
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=RTOL, atol=ATOL, msg=f"Fisher of {n}")
    assert any(bool(w.any()) for w in want.values()), "all-zero Fisher tests nothing"


METHODS = ["ia3", "ia3_all_ff", "dora", "prompt", "ptuning", "prefix", "lora_embedding"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", METHODS)
def test_vectorised_equals_loop_without_falling_back(method, arch):
    model = build(method, arch)
    batches = batches_for(arch)
    cand = ft.peft_candidates(model)
    hooks = PerSampleHooks(model, dict((n, model.get_parameter(n)) for n in cand))
    hooks.close()
    assert set(hooks.covered) == set(cand), f"no rule for {set(cand) - set(hooks.covered)}"
    with engine_log() as log:
        auto = fisher(model, batches)
    assert log[-1].startswith("compute_fisher: engine=vectorized "), log
    assert not any("loop" in m for m in log), log
    assert "get_prompt" not in vars(model), "the prompt-learning rule left its patch behind"
    assert_same(auto, fisher(model, batches, engine="loop"))


def test_dora_weight_norm_is_detached_in_this_peft():
    """The DoRA rule relies on peft detaching ‖W + sBA‖ (DoRA paper §4.3); if peft stopped, the summed-gradient
    check would send DoRA to the loop, and this test says why."""
    import inspect

    from peft.tuners.lora.dora import DoraLinearLayer

    assert "weight_norm = weight_norm.detach()" in inspect.getsource(DoraLinearLayer.forward)


def _broken(rule: gs.GradSampler, how: str) -> gs.GradSampler:
    """``rule`` with its per-sample gradients doubled past the 2-sample probe (wrong in the batch sum: only the
    per-batch check can see it) or replaced by their batch mean (right in the sum, wrong per sample: the probe sees it)."""
    def attach(module, names, tap):
        def bad_tap(mod, nm, rows, out, compute):
            def wrong(g):
                got = compute(g)
                if how == "scaled":
                    factor = 2 if g.shape[0] > 2 else 1
                    return {k: (lambda lo, hi, f=f: factor * f(lo, hi)) for k, f in got.items()}
                return {k: (lambda lo, hi, f=f: f(0, g.shape[0]).mean(0).expand(hi - lo, *f(0, 1).shape[1:]))
                        for k, f in got.items()}
            tap(mod, nm, rows, out, wrong)
        return rule.attach(module, names, bad_tap)
    return gs.GradSampler(rule.params, attach, rule.always)


@pytest.mark.parametrize("how, expect", [("scaled", "do not sum to autograd"), ("averaged", "do not group by sample")])
def test_a_broken_rule_falls_back_to_the_loop(monkeypatch, how, expect):
    from peft.tuners.ia3.layer import Linear as IA3Linear

    model = build("ia3", "bert")
    batches = batches_for("bert")
    want = fisher(model, batches, engine="loop")
    gs.load_rules()  # peft's rules register on first use
    monkeypatch.setitem(gs.GRAD_SAMPLERS, IA3Linear, _broken(gs.GRAD_SAMPLERS[IA3Linear], how))
    with engine_log() as log:
        got = fisher(model, batches)
    assert any(expect in m for m in log), log
    assert log[-1].startswith("compute_fisher: engine=loop "), log
    assert_same(got, want)
    with pytest.raises(RuntimeError, match="not exact|disagree"):
        fisher(model, batches, engine="vectorized")


def test_several_active_ia3_adapters_fall_back_to_the_loop():
    """Two active (IA)³ vectors multiply: the rule covers one adapter only, so the sum check sends it to the loop."""
    model = build("ia3", "llama")  # no modules_to_save head: peft refuses two active heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", config("ia3", "llama"))
    model.base_model.set_adapter(["default", "other"])
    for name, p in model.named_parameters():
        p.requires_grad_("ia3_l" in name)
        if "ia3_l.other" in name:
            p.data.uniform_(0.5, 1.5)
    batches = batches_for("llama")
    cand = [n for n, p in model.named_parameters() if p.requires_grad]
    with engine_log() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        got = ft.compute_fisher(model, batches, num_samples=12, params=cand, progress=False)
        want = ft.compute_fisher(model, batches, num_samples=12, params=cand, engine="loop", progress=False)
    assert "engine=loop" in log[0] or any("exact loop" in m for m in log), log
    assert_same(got, want)


def test_vectorized_names_a_candidate_without_rule():
    model = build("ia3", "bert")
    norm = next(n for n, _ in model.named_parameters() if "LayerNorm.weight" in n)
    with pytest.raises(ValueError, match="no per-sample rule"):
        ft.compute_fisher(model, batches_for("bert"), num_samples=4, params=[norm], engine="vectorized",
                          progress=False)
    with engine_log() as log:
        ft.compute_fisher(model, batches_for("bert"), num_samples=4, params=[norm], progress=False)
    assert any("has no per-sample rule" in m for m in log) and "engine=loop" in log[-1], log


def test_dora_when_the_batch_size_equals_the_hidden_size():
    """peft's DoRA also runs lora_A/B on an identity matrix (rows = in_features) whose output it detaches. With
    batch size = in_features that call looks batched: the hooks must keep per-sample gradients and stay exact."""
    model = build("dora", "bert")
    batches = cls_batches(1, batch_size=model.config.hidden_size)
    cand = ft.peft_candidates(model)
    with engine_log() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", ft.ZeroFisherWarning)
        auto = ft.compute_fisher(model, batches, num_samples=32, params=cand, progress=False)
        loop = ft.compute_fisher(model, batches, num_samples=32, params=cand, engine="loop", progress=False)
    assert log[0].startswith("compute_fisher: engine=vectorized "), log
    assert_same(auto, loop)


def test_prompt_rule_restores_an_existing_instance_attribute():
    model = build("prompt", "bert")
    mine = model.get_prompt
    model.get_prompt = mine  # e.g. another library's patch on the instance
    fisher(model, batches_for("bert"))
    assert vars(model)["get_prompt"] is mine
