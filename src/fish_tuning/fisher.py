"""Diagonal Fisher information from **per-sample** gradients (FISH-Tuning Eq. 2-3).

F̂_j = 1/N Σᵢ (∂/∂θ_j log p(yᵢ|xᵢ))².  Squaring the gradient of a batch mean is a different quantity (it
cancels signs across samples), so every path here squares each sample's own gradient before summing.

Two exact engines:
- ``vectorized``: one batched forward/backward. A per-sample rule per layer type (``fish_tuning.grad_sample``,
  as opacus does) forms each sample's gradient from hooked activations and output gradients: ``nn.Linear``
  (``Σ_t g_tᵀ a_t``: LoRA's A and B), ``nn.Embedding`` (prompt-learning tables), (IA)³ vectors, DoRA's
  magnitude, LoRA's embedding factors and the ``adapters`` library's LoRA. After every batch the per-sample
  gradients are checked against autograd's summed gradient; a mismatch (a weight also used outside its module)
  switches to the loop.
- ``loop``: one forward/backward per sample; always exact, N times slower.

Which engine ran is logged on the ``fish_tuning`` logger (INFO): ``compute_fisher: engine=...``, with the reason
whenever the loop is used under ``engine="auto"``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batches import batch_size_of, labelled_rows, slice_batch
from .checks import positive_int
from .compat import keep_cpu_4bit_trainable
from .dist import dist_rank_world, sum_over_ranks
from .loglik import Kind, LogLikFn, ModelLogLik, per_sample_log_likelihood, sample_labels
from .per_sample import Engine, PerSampleEngine
from .sharded import all_agree, is_sharded, pass_count
from .zero3 import gathered

logger = logging.getLogger("fish_tuning")
__all__ = ["GradientMoments", "ZeroFisherWarning", "compute_fisher", "gradient_moments", "per_sample_log_likelihood", "sample_labels", "warn_zero_fisher"]


class ZeroFisherWarning(UserWarning):
    """A whole candidate tensor has zero Fisher information, so no mask strategy based on it can pick it."""


# --------------------------------------------------------------------------------------------- public API
@dataclass
class GradientMoments:
    """First and second moments of the per-sample gradients of log p(y|x), per candidate entry, from one pass.

    ``fisher`` = 1/N Σᵢ gᵢ² (the diagonal empirical Fisher), ``mean`` = 1/N Σᵢ gᵢ (its sign-keeping part: the
    gradient-consistency scores of :mod:`fish_tuning.scores` need both), ``num_samples`` = N.
    """

    fisher: dict[str, Tensor]
    mean: dict[str, Tensor]
    num_samples: int


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    num_samples: int = 128,
    kind: Kind = "empirical",
    params: Sequence[str] | None = None,
    engine: Engine = "auto",
    loglik_fn: LogLikFn = per_sample_log_likelihood,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
) -> dict[str, Tensor]:
    """Mean squared per-sample gradient of log p(y|x) for each candidate parameter (float32, same shape).

    Arguments as :func:`gradient_moments`, which also returns the mean per-sample gradient from the same pass.
    """
    return gradient_moments(model, batches, num_samples, kind, params, engine, loglik_fn, seed, progress,
                            distributed, _stacklevel=3).fisher


def gradient_moments(
    model: nn.Module,
    batches: Iterable[Mapping[str, object]],
    num_samples: int = 128,
    kind: Kind = "empirical",
    params: Sequence[str] | None = None,
    engine: Engine = "auto",
    loglik_fn: LogLikFn = per_sample_log_likelihood,
    seed: int = 0,
    progress: bool = True,
    distributed: bool | None = None,
    _stacklevel: int = 2,
) -> GradientMoments:
    """Mean squared (``.fisher``) and mean (``.mean``) per-sample gradient of log p(y|x) of each candidate
    parameter (float32, its shape), from one pass; the mean costs one more buffer, no extra forward or backward.

    Args:
        batches: any iterable of model-input dicts with ``labels`` (a DataLoader, a list), any batch size.
        num_samples: how many samples (rows, not batches) to score; the paper uses 128 (256 for generation). A
            class label of -100 (ignored by the model's own loss) marks a row without a label: it is skipped and
            not counted. Packed rows (several examples in one row: padding-free collators) raise ``ValueError``.
        kind: ``"empirical"`` uses the data labels (Eq. 3); ``"expected"`` samples y from the model (Eq. 2).
        params: candidate parameter names; default every parameter with ``requires_grad``.
        engine: how per-sample gradients are formed: ``"auto"`` (the hooks where exact, else the loop),
            ``"vectorized"`` (the hooks or an error) or ``"loop"`` (one backward per sample); see
            :class:`~fish_tuning.per_sample.PerSampleEngine`.
        loglik_fn: ``f(logits, labels) -> [B]``. The default lines sequence logits up with the labels as the model's
            own loss does (causal LMs: the next label; token classification, masked LMs, encoder-decoder: the label
            at the same position) and raises ``ValueError`` for a model it cannot classify; fix the alignment with
            ``functools.partial(per_sample_log_likelihood, shift=...)``.
        distributed: sum over the ranks of the default process group (default: when one is initialised).
            ``num_samples`` is then the *global* count: rank r scores the first ``ceil((num_samples - r) / W)``
            samples of its own ``batches``, so with a ``DistributedSampler``-style shard (sample i of the
            union on rank i % W) the ranks together score the same samples as one process over the union.
            Sums and counts are summed on rank 0 and broadcast, so every rank gets bit-identical scores (and
            therefore the same mask); they equal a single-process run up to float summation order.
            ``kind="expected"`` draws labels per rank (seed + rank), so it matches only in distribution.
    """
    if kind not in ("empirical", "expected"):
        raise ValueError(f"kind must be 'empirical' or 'expected', got {kind!r}")
    if engine not in ("auto", "vectorized", "loop"):
        raise ValueError(f"engine must be 'auto', 'vectorized' or 'loop', got {engine!r}")
    num_samples = positive_int(num_samples, "num_samples")

    named = dict(model.named_parameters())
    if params is None:
        params = [n for n, p in named.items() if p.requires_grad]
    else:
        params = list(params)
        unknown = [n for n in params if n not in named]
        if unknown:
            raise ValueError(f"params names a parameter the model does not have: {unknown[0]!r}")
    if not params:
        raise ValueError(
            "no candidate parameters: nothing requires grad and params= is empty. Wrap the model with a PEFT "
            "method (e.g. peft.get_peft_model) or pass params=[...] names."
        )
    cand = {n: named[n] for n in params}
    loglik_fn = ModelLogLik(loglik_fn, model)

    rank, world = dist_rank_world(distributed)
    sharded = is_sharded(model)
    if sharded and world == 1 and dist_rank_world(None)[1] > 1:
        raise ValueError("compute_fisher(distributed=False) on an FSDP2-sharded model: each rank would score only its "
                         "own samples and select a different mask for its shard. Leave distributed at its default "
                         "(True under torchrun) so the ranks sum their scores.")
    quota = num_samples // world + int(rank < num_samples % world)  # this rank's share of the global count
    device = next(iter(cand.values())).device
    gen = torch.Generator(device=device).manual_seed(seed + rank) if kind == "expected" else None
    keep_cpu_4bit_trainable(model)  # the pass runs in eval mode: a 4-bit CPU layer would repack, its backward wrong
    saved_flags = {n: p.requires_grad for n, p in named.items()}
    was_training = model.training
    passes = PerSampleEngine(model, cand, engine, kind, loglik_fn, gen, sharded)
    scored, rows = 0, 0  # label targets, rows read (labelled or not)
    bar = tqdm(total=quota, desc=f"Fisher ({kind})", disable=not progress, leave=False)
    pinned = gathered(list(cand.values()))  # ZeRO-3: the candidates stay gathered for the pass; else a no-op
    try:
        pinned.__enter__()
        model.eval()
        for n, p in named.items():
            p.requires_grad_(n in cand)
        for chunk, take, real, samples in _passes(batches, quota, device, sharded):
            if real:
                scored += _label_count(chunk["labels"], loglik_fn.shift is not False)
                rows += take
            passes.add(chunk, take, real, samples)
            if real:
                bar.update(samples)
    finally:
        pinned.__exit__(None, None, None)
        bar.close()
        passes.close()
        for n, p in named.items():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)

    seen, squares, sums = passes.seen, passes.squares, passes.sums
    logger.info("compute_fisher: engine=%s (%d samples on this rank)", passes.name, seen)
    count = torch.tensor([float(seen), float(scored), float(rows)], device=device)
    if world > 1:
        both = {**{("sq", n): s for n, s in squares.items()}, **{("g", n): g for n, g in sums.items()}}
        count = sum_over_ranks(both, count)
    total = int(count[0].item())
    if int(count[2].item()) == 0:
        raise ValueError("compute_fisher got no batches (the iterable was empty): pass calibration batches")
    if int(count[1].item()) == 0 or total == 0:
        raise ValueError(
            "every label of the calibration batches is -100 (ignored): there is no label to score, so the "
            "Fisher would be zero everywhere. Check the data collator / completion-only masking (are completions "
            "cut off by max_length?), or the class labels of a classification dataset"
        )
    count = count[0]
    if total < num_samples and rank == 0:
        where = f" over {world} ranks" if world > 1 else ""
        warnings.warn(f"compute_fisher: only {total} samples available{where}, fewer than num_samples={num_samples}",
                      stacklevel=_stacklevel)
    scores = {n: s / count for n, s in squares.items()}
    warn_zero_fisher(scores, _stacklevel + 1)
    # the passes differentiate the loss -Σ log p: negate, so .mean is the mean gradient of log p as documented
    return GradientMoments(fisher=scores, mean={n: -g / count for n, g in sums.items()}, num_samples=total)


def _passes(batches: Iterable[Mapping[str, object]], quota: int, device: torch.device, sharded: bool):
    """(chunk, rows, real, samples) per forward/backward pass: this rank's batches cut to its quota of samples
    (rows with a label: an unlabelled class row, -100, is carried along but not counted).

    Under FSDP every pass all-gathers, so all ranks must run the same number: a rank with fewer batches repeats
    its last one as discarded passes (``real`` False) up to the largest count (one all-reduce).
    """
    chunks, seen = [], 0
    for batch in batches:
        if seen >= quota:
            break
        if isinstance(batch, Mapping) and isinstance(batch.get("labels"), (list, tuple)):
            batch = {**batch, "labels": torch.as_tensor(batch["labels"])}  # plain Python labels, as a collator's
        size = batch_size_of(batch)
        take, samples = _take(batch["labels"], size, quota - seen)
        chunk = (slice_batch(batch, 0, take, size, device), take, True, samples)
        if not sharded:
            yield chunk
        else:
            chunks.append(chunk)
        seen += samples
    if not sharded:
        return
    if not all_agree(bool(chunks), device):
        raise ValueError("compute_fisher on an FSDP2-sharded model: some rank has no calibration samples, but every "
                         "rank must run the Fisher passes (each all-gathers); give each rank at least one sample "
                         "(num_samples >= world size, calibration_loader splits them)")
    padded = pass_count(len(chunks), device)
    yield from chunks
    for _ in range(padded - len(chunks)):
        yield chunks[-1][0], chunks[-1][1], False, chunks[-1][3]


def _take(labels, size: int, need: int) -> tuple[int, int]:
    """(rows, samples) of a batch of ``size`` rows to read for ``need`` more samples: the shortest prefix that has
    ``need`` labelled rows (all rows are samples unless class labels say otherwise), or the whole batch."""
    labelled = labelled_rows(labels)
    if labelled is None:
        take = min(size, need)
        return take, take
    cum = labelled.long().cumsum(0)
    have = int(cum[-1]) if cum.numel() else 0
    if have <= need:
        return size, have
    return int((cum < need).sum()) + 1, need


def _label_count(labels, shift: bool = True) -> int:
    """Scored targets in a batch: label tokens that are not -100 for a sequence model, labelled rows for class
    labels (-100: none), else one per sample."""
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and not labels.is_floating_point():
        return int(((labels[:, 1:] if shift else labels) != -100).sum())
    labelled = labelled_rows(labels)
    if labelled is not None:
        return int(labelled.sum())
    return int(labels.shape[0]) if labels.dim() else 1


def warn_zero_fisher(scores: Mapping[str, Tensor], stacklevel: int = 3) -> list[str]:
    """Warn about candidate tensors whose Fisher is exactly zero everywhere; returns their names."""
    from .methods.advice import zero_fisher_hint

    zero = [n for n, s in scores.items() if s.numel() and not bool(s.any())]
    if zero:
        msg = f"{len(zero)} candidate tensor(s) have zero Fisher information everywhere, e.g. {zero[:3]}. "
        warnings.warn(msg + zero_fisher_hint(zero), ZeroFisherWarning, stacklevel=stacklevel)
    return zero
