"""Per-sample log-likelihoods of model outputs, and labels drawn from the model (the y of Eq. 2 and Eq. 3).

Sequence logits ``[B, T, V]`` and labels ``[B, T]`` line up in one of two ways, and only the model knows which: a
causal LM's position t predicts label t+1 (``shift=True``); token classification, masked LMs and encoder-decoder
models score label t at position t (``shift=False``). Scoring with the wrong one is no error, just a wrong Fisher,
so :func:`~fish_tuning.compute_fisher` reads the alignment from the model (:func:`label_shift`) and refuses to
guess for a model it cannot classify.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn

Kind = Literal["empirical", "expected"]  # the Fisher's labels: the data's (Eq. 3) or drawn from the model (Eq. 2)
LogLikFn = Callable[[Tensor, Tensor], Tensor]

ALIGNED_TASKS = ("TOKEN_CLS", "SEQ_2_SEQ_LM")  # peft task types whose label t sits at position t
SHIFTED_TASKS = ("CAUSAL_LM",)
ALIGNED_SUFFIXES = ("ForTokenClassification", "ForMaskedLM")
# The ``adapters`` library's flexible prediction heads (its LlamaAdapterModel is a GenerationMixin with any head).
HEAD_SHIFT = {"CausalLMHead": True, "TaggingHead": False, "BertStyleMaskedLMHead": False, "Seq2SeqLMHead": False}


def per_sample_log_likelihood(logits: Tensor, labels: Tensor, shift: bool = True,
                              problem_type: str | None = None) -> Tensor:
    """Log-likelihood of each sample, shape ``[B]``.

    - ``logits [B, T, V]`` with ``labels [B, T]``: per-token categorical, summed over a sample's label tokens
      (``-100`` is ignored). ``shift=True`` (causal LM): position t predicts label t+1; ``shift=False`` (token
      classification, masked LM, encoder-decoder): position t predicts label t. ``compute_fisher`` picks ``shift``
      from the model; pass ``functools.partial(per_sample_log_likelihood, shift=...)`` to fix it yourself.
    - ``logits [B, 1]`` or floating labels of shape ``[B]``: regression with unit-variance Gaussian (matches MSE).
    - ``problem_type="regression"`` (the model config's; ``compute_fisher`` passes it): the same Gaussian, summed
      over all C outputs of ``logits [B, C]`` with labels ``[B, C]`` (the model's own loss is MSE, not BCE);
      ``"multi_label_classification"``: Bernoulli even for one output (``logits [B, 1]``, float labels ``[B, 1]``).
    - ``logits [B, C]`` with float labels ``[B, C]``: multi-label Bernoulli.
    - ``logits [B, C]`` with integer labels ``[B]``: categorical; a sample labelled ``-100`` scores 0 (no label).
    """
    logits = logits.float()
    if logits.dim() == 3:
        if labels.dim() != 2:
            raise ValueError(f"sequence logits {tuple(logits.shape)} need labels [B, T]; got {tuple(labels.shape)}")
        # Shift the labels (pad with -100), not the logits: slicing [B, T, V] would copy it twice (forward and
        # backward); fused cross-entropy is ~40% cheaper than log_softmax + gather at a 49k vocabulary.
        b, t, v = logits.shape
        target = nn.functional.pad(labels[:, 1:].long(), (0, 1), value=-100) if shift else labels.long()
        nll = nn.functional.cross_entropy(logits.reshape(b * t, v), target.reshape(-1), ignore_index=-100,
                                          reduction="none")
        return -nll.view(b, t).sum(1)
    if logits.dim() != 2:
        raise ValueError(f"unsupported logits shape {tuple(logits.shape)}: pass loglik_fn= for this model")
    multi_label = labels.is_floating_point() and labels.shape == logits.shape
    if problem_type == "regression" or (problem_type != "multi_label_classification" and logits.shape[1] == 1 and
                                        (labels.is_floating_point() or labels.dim() == 1)):
        return -0.5 * (logits - _regression_targets(logits, labels)).square().sum(1)
    if problem_type == "multi_label_classification" and not multi_label:
        raise ValueError(f"multi-label logits {tuple(logits.shape)} need float labels of the same shape; got "
                         f"{labels.dtype} labels of shape {tuple(labels.shape)}")
    if multi_label:
        return -nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(1)
    # A label of -100 marks a sample without one (CrossEntropyLoss's ignore_index, as the model's own loss): 0 here,
    # and compute_fisher does not count it in N.
    return -nn.functional.cross_entropy(logits, labels.long().view(-1), ignore_index=-100, reduction="none")


def _regression_targets(logits: Tensor, labels: Tensor) -> Tensor:
    """Regression labels laid out as ``logits [B, C]`` (``[B]`` or ``[B, C]``), float32."""
    if labels.numel() != logits.numel():
        raise ValueError(f"regression logits {tuple(logits.shape)} need one label per output; got labels of shape "
                         f"{tuple(labels.shape)}")
    return labels.float().view(logits.shape)


@torch.no_grad()
def sample_labels(logits: Tensor, labels: Tensor, generator: torch.Generator | None = None,
                  shift: bool = True, problem_type: str | None = None) -> Tensor:
    """Draw labels from the model's own predictive distribution (expected Fisher, Eq. 2), same layout as ``labels``.

    Sequence logits sample every scored position independently (teacher forcing); ``shift`` as in
    :func:`per_sample_log_likelihood` says which label each position predicts.
    """
    logits = logits.float()
    if logits.dim() == 3:
        out = labels.clone()
        dest = out[:, 1:] if shift else out  # a view: where the drawn labels go
        probs = torch.softmax(logits[:, :-1] if shift else logits, dim=-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
        dest.copy_(torch.where(dest != -100, drawn.to(dest.dtype), dest))
        return out
    if problem_type == "regression" and logits.shape[1] > 1:
        drawn = logits + torch.randn(logits.shape, generator=generator, device=logits.device)
        return drawn.view(_regression_targets(logits, labels).shape)
    if problem_type != "multi_label_classification" and logits.shape[1] == 1 and (
            labels.is_floating_point() or labels.dim() == 1):
        noise = torch.randn(logits.shape[0], generator=generator, device=logits.device)
        return (logits.squeeze(1) + noise).to(labels.dtype if labels.is_floating_point() else torch.float32)
    if labels.is_floating_point() and labels.shape == logits.shape:
        return torch.bernoulli(torch.sigmoid(logits), generator=generator).to(labels.dtype)
    drawn = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).view(-1).to(labels.dtype)
    return torch.where(labels.view(-1) == -100, labels.view(-1), drawn)  # an unlabelled sample stays unlabelled


def unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """The model and what it wraps (DDP's ``module``, peft's base model, torch.compile's ``_orig_mod``)."""
    seen: set[int] = set()
    todo = [model]
    while todo:
        m = todo.pop(0)
        if not isinstance(m, nn.Module) or id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        base = getattr(m, "get_base_model", None)
        todo += [m._modules.get("module"), m._modules.get("_orig_mod"), base() if callable(base) else None]


def _peft_tasks(m: nn.Module) -> set[str]:
    try:
        configs = getattr(m, "peft_config", None)
    except Exception:  # a wrapper's __getattr__ that fails in its own way
        return set()
    if not isinstance(configs, dict):
        return set()
    return {str(getattr(t, "value", t)) for t in (getattr(c, "task_type", None) for c in configs.values()) if t}


def problem_type(model: nn.Module) -> str | None:
    """The ``config.problem_type`` of ``model`` or a model it wraps (e.g. ``"regression"``), or None."""
    for m in unwrapped(model):
        kind = getattr(getattr(m, "config", None), "problem_type", None)
        if isinstance(kind, str):
            return kind
    return None


def _head_shift(m: nn.Module) -> set[bool]:
    """Alignments of the active ``adapters`` flexible heads that emit sequence logits."""
    heads = m._modules.get("heads")
    if not isinstance(heads, nn.ModuleDict):
        return set()
    active = m.__dict__.get("_active_heads") or list(heads.keys())
    names = [type(heads[h]).__name__ for h in active if isinstance(h, str) and h in heads]
    return {HEAD_SHIFT[n] for n in names if n in HEAD_SHIFT}


def label_shift(model: nn.Module) -> bool | None:
    """Whether ``model``'s sequence logits predict the *next* label (True) or the label at their own position
    (False); None if the model does not say. The model's own facts come before peft's ``task_type``."""
    layers = list(unwrapped(model))
    if any(getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True for m in layers):
        return False
    heads = set().union(*(_head_shift(m) for m in layers))
    if heads:  # both kinds active at once: no single alignment
        return heads.pop() if len(heads) == 1 else None
    names = [type(m).__name__ for m in layers]
    if any(n.endswith(ALIGNED_SUFFIXES) for n in names):
        return False
    if any(n.endswith("ForCausalLM") or any(c.__name__ == "GenerationMixin" for c in type(m).__mro__)
           for n, m in zip(names, layers)):
        return True
    tasks = set().union(*(_peft_tasks(m) for m in layers))
    if tasks and tasks <= set(ALIGNED_TASKS):
        return False
    if tasks and tasks <= set(SHIFTED_TASKS):
        return True
    return None


def declared_shift(loglik_fn: Callable) -> bool | None:
    """The alignment a loglik_fn fixes: ``partial(per_sample_log_likelihood, shift=...)`` or a ``shift`` attribute."""
    if isinstance(loglik_fn, functools.partial) and loglik_fn.func is per_sample_log_likelihood:
        return loglik_fn.keywords.get("shift")
    shift = getattr(loglik_fn, "shift", None)
    return shift if isinstance(shift, bool) else None


class ModelLogLik:
    """``loglik_fn`` bound to one model's label alignment: what compute_fisher scores and samples labels with.

    The default :func:`per_sample_log_likelihood` gets ``shift`` from the model; any other function is called as
    given (it owns the alignment) and is asked only when ``kind="expected"`` samples sequence labels.
    """

    def __init__(self, loglik_fn: Callable[[Tensor, Tensor], Tensor], model: nn.Module):
        self.fn = loglik_fn.fn if isinstance(loglik_fn, ModelLogLik) else loglik_fn
        declared = declared_shift(self.fn)
        self.shift = declared if declared is not None else label_shift(model)
        self.builtin = self.fn is per_sample_log_likelihood
        self.model_name = type(model).__name__
        # Several regression outputs look like multi-label logits and labels: only the config tells them apart.
        self.problem_type = problem_type(model)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.builtin and logits.dim() == 3:
            return per_sample_log_likelihood(logits, labels, shift=self._shift(logits))
        if self.builtin:
            return per_sample_log_likelihood(logits, labels, problem_type=self.problem_type)
        return self.fn(logits, labels)

    def sample(self, logits: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        shift = self._shift(logits) if logits.dim() == 3 else True
        return sample_labels(logits, labels, generator, shift=shift, problem_type=self.problem_type)

    def _shift(self, logits: Tensor) -> bool:
        if self.shift is not None:
            return self.shift
        own = "" if self.builtin else (" kind='expected' samples sequence labels too: give your loglik_fn a "
                                       "boolean `shift` attribute, or use kind='empirical'.")
        raise ValueError(
            f"cannot tell how {self.model_name}'s sequence logits {tuple(logits.shape)} line up with the labels: a "
            "causal LM's position t predicts label t+1, while token classification, masked LMs and encoder-decoder "
            "models score label t at position t; scoring the wrong one gives a wrong Fisher without any error. Say "
            "which: loglik_fn=functools.partial(fish_tuning.loglik.per_sample_log_likelihood, shift=True) "
            "(causal LM) or shift=False (aligned), or pass your own loglik_fn(logits, labels) -> [B]." + own)


def loss_for(model: nn.Module, batch: dict, kind: Kind, loglik_fn: LogLikFn, gen, used: dict | None = None) -> Tensor:
    labels = batch.pop("labels")
    if "decoder_input_ids" not in batch and "decoder_inputs_embeds" not in batch:
        # An encoder-decoder model builds its decoder inputs from labels, which are not passed (scored here).
        prepare = decoder_inputs_from_labels(model)
        if prepare is not None:
            batch["decoder_input_ids"] = prepare(labels=torch.as_tensor(labels))
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[0]  # return_dict=False: a tuple, logits first
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] > labels.shape[1]:
        # Prompt learning (Prompt Tuning, P-Tuning, CPT) prepends virtual tokens to a decoder or tagger sequence:
        # they have no label, as in peft's own loss (labels padded on the left with -100).
        labels = nn.functional.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
    if kind == "expected":  # ModelLogLik knows the model's label alignment; a bare function gets the causal default
        sample = getattr(loglik_fn, "sample", sample_labels)
        labels = sample(logits, labels, gen)
    if used is not None:  # the labels scored (sampled ones for kind="expected"), for the grouping probe
        used["labels"] = labels
    # Minus the *sum* of per-sample log-likelihoods: its gradient w.r.t. sample i's activations is sample i's own.
    return -loglik_fn(logits, labels).sum()


def decoder_inputs_from_labels(model: nn.Module) -> Callable | None:
    """An encoder-decoder model's ``prepare_decoder_input_ids_from_labels`` (labels shifted right), else None."""
    for m in unwrapped(model):
        prepare = getattr(m, "prepare_decoder_input_ids_from_labels", None)
        if getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True and callable(prepare):
            return prepare
    return None
