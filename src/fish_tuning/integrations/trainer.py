"""FISH-Tuning inside transformers' ``Trainer`` / TRL's ``SFTTrainer`` as a callback, no Trainer subclass."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..compat import keep_cpu_4bit_trainable
from ..config import FishConfig
from ..fisher import gradient_moments
from ..guard import MaskGuard
from ..loglik import LogLikFn, per_sample_log_likelihood
from ..mask import FishMask
from ..methods import peft_candidates
from ..refresh import MaskRefresher
from ..scores import score as score_of
from ..selection import DEFAULT_ALPHA, select_mask
from ..sharded import is_sharded
from ..zero3 import full_numel, zero_params
from .adapter import save_mask_before_adapter, save_mask_beside_adapter, without_digests
from .distributed import calibration_loader
from .resume import MASK_GROUP_KEY, check_given, load_resumed, record
from .trainer_checks import check_kept_in_optimizer, check_supported, check_writable, innermost_optimizer
from .warmup import WarmUp

logger = logging.getLogger("fish_tuning")


class FishCallback(TrainerCallback):
    """Select a FISH mask at train begin and keep every masked entry bit-identical through the run.

    At ``on_train_begin`` (after the Trainer built and prepared its optimizer) the callback

    1. gets the mask: ``mask=`` if given; on ``resume_from_checkpoint`` the resumed checkpoint's (from its
       optimizer state, or under ``save_only_model`` the mask file whose fingerprint its trainer_state.json
       records; see :mod:`fish_tuning.integrations.resume`); on a later ``train()`` of the same model the mask
       this callback already selected (its entries have trained; :meth:`reset` asks for a new one); otherwise Fisher on ``num_samples`` seeded-random examples of the trainer's own train dataset, batched by
       its own data collator (global count; under DDP each rank scores its share and the sums are combined);
    2. attaches a :class:`~fish_tuning.MaskGuard` to the innermost torch optimizer (under accelerate's
       ``AcceleratedOptimizer``): masked gradients are zeroed after each backward (so clipping, accumulation and
       the DDP all-reduce see Eq. 6), and masked entries are written back after each step (undoes weight decay).
       Sharded models: under accelerate's FSDP2 the guard works on each rank's DTensor shards; under DeepSpeed
       ZeRO (1-3) it attaches to ZeRO's optimizer and keeps the fp32 master partitions (:mod:`fish_tuning.zero3`).

    The guard is removed at train end (before the final mask is written), by :meth:`close`, on leaving a
    ``with callback:`` block (use one around ``trainer.train()`` to detach on an exception too), and when the
    Trainer's optimizer is garbage-collected; until then no other optimizer may step the guarded parameters.
    The output folder is checked for writing at train begin, before any work.

    The Trainer's optimizer, scheduler, clipping and accumulation are used unchanged. Counts go to
    ``trainer.state.log_history`` (and ``self.stats``); the mask is written into every checkpoint and, at train
    end, into ``args.output_dir``, where the adapter is written only later by ``trainer.save_model()``: the mask
    records the adapter files already there as stale, so ``load_adapter`` refuses the pair until the new adapter
    arrives (a run killed before save_model never pairs its mask with an older adapter).

    Args:
        keep / budget: fraction or number of candidate entries to train (exactly one, unless ``mask`` is given).
        config: all FISH settings as one :class:`~fish_tuning.FishConfig` instead of the keywords (saved in
            the mask file's metadata either way).
        candidates: names, or ``f(model) -> names``; default :func:`~fish_tuning.peft_candidates`.
        always_train: regexes of parameters trained fully outside the budget; default every trainable
            parameter that is not a candidate (e.g. a ``modules_to_save`` head).
        exclude: regexes of candidates left out of the selection; they stay frozen (never trained).
        strategy: ``fish`` (the paper), ``rand`` / ``rev`` (controls), ``fish_balanced`` (per-tensor shares by
            Fisher mass ** ``alpha``) or ``fish_rank1`` (whole LoRA rank-1 components); see ``select_mask``.
        allocation: per-tensor counts: ``global`` (the paper), ``uniform``, ``mass``, or a :class:`FishMask`
            whose counts are kept (``strategy="rand"`` with the FISH mask is the shuffled control).
        score: what is ranked: ``fisher``, ``normalized``, ``consistency`` or ``snr`` (:mod:`fish_tuning.scores`).
        warmup_steps: dense training steps before scoring; the adapter is then rewound to its init and the
            optimizer state cleared (the steps count in ``max_steps`` and the LR schedule).
        refresh_every / refresh_fraction / refresh_until: a mask that moves (:mod:`fish_tuning.refresh`): every
            ``refresh_every`` optimizer steps the least-moved kept entries are swapped for the unkept ones with the
            most consistent gradient, exactly k always; ``self.mask`` and every checkpoint's mask file are the
            mask in force, its ``meta["refresh"]`` the history. Logs ``fish/refresh_changed`` and ``fish/ever_kept``.
        seed: subset and ``rand`` seed; default ``args.seed``. ``batch_size``: default per-device train size.
        loglik_fn: ``f(logits, labels) -> [B]`` for the Fisher pass (see ``compute_fisher``); the default reads the
            label alignment from the model. Not part of ``config`` (a function is not saved with the mask).
    """

    def __init__(
        self,
        keep: float | None = None,
        budget: int | None = None,
        strategy: str = "fish",
        num_samples: int = 128,
        kind: str = "empirical",
        mask: FishMask | None = None,
        candidates: Sequence[str] | Callable[[nn.Module], Sequence[str]] | None = None,
        always_train: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        engine: str = "auto",
        save_final_mask: bool = True,
        alpha: float = DEFAULT_ALPHA,
        config: FishConfig | None = None,
        loglik_fn: LogLikFn | None = None,
        allocation: str | FishMask = "global",
        score: str = "fisher",
        warmup_steps: int = 0,
        refresh_every: int = 0,
        refresh_fraction: float = 0.2,
        refresh_until: int | None = None,
    ):
        self.allocation_mask = allocation if isinstance(allocation, FishMask) else None
        named = "global" if self.allocation_mask is not None else allocation
        if config is None:
            config = FishConfig(keep=keep, budget=budget, strategy=strategy, alpha=alpha, num_samples=num_samples,
                                fisher_kind=kind, fisher_engine=engine, exclude=exclude, always_train=always_train,
                                seed=seed, allocation=named, score=score, warmup_steps=warmup_steps,
                                refresh_every=refresh_every, refresh_fraction=refresh_fraction,
                                refresh_until=refresh_until)
        elif any(v is not None for v in (keep, budget, exclude, always_train, seed, refresh_until)) or (
                named, score, warmup_steps, refresh_every, refresh_fraction) != ("global", "fisher", 0, 0, 0.2):
            raise ValueError("FishCallback: give the FISH settings either as config= or as keywords, not both")
        if mask is not None and (config.keep is not None or config.budget is not None):
            raise ValueError("FishCallback: give either mask= or keep=/budget=, not both")
        if mask is None and self.allocation_mask is None and (config.keep is None) == (config.budget is None):
            raise ValueError("FishCallback needs exactly one of keep= (fraction) or budget= (entries), or mask=")
        if self.allocation_mask is None and config.allocation_file() is not None:
            self.allocation_mask = FishMask.load(config.allocation_file())  # its per-tensor counts, not positions
        self.config = config
        c = config
        self.keep, self.budget, self.strategy, self.num_samples, self.kind = (c.keep, c.budget, c.strategy,
                                                                              c.num_samples, c.fisher_kind)
        self.always_train, self.exclude, self.seed, self.engine, self.alpha = (c.always_train, c.exclude, c.seed,
                                                                               c.fisher_engine, c.alpha)
        self.given_mask = mask
        self.candidates, self.batch_size, self.save_final_mask = candidates, batch_size, save_final_mask
        if loglik_fn is not None and not callable(loglik_fn):
            raise TypeError(f"FishCallback: loglik_fn must be callable (logits, labels) -> [B], got {loglik_fn!r}")
        self.loglik_fn: LogLikFn = loglik_fn if loglik_fn is not None else per_sample_log_likelihood
        self.mask: FishMask | None = mask
        self.guard: MaskGuard | None = None
        self.source: str | None = None  # "given", "checkpoint", "fisher" or "kept"
        self.stats: dict[str, float] = {}
        self._trained: weakref.ref[nn.Module] | None = None  # the model self.mask was taken for
        self._warm: WarmUp | None = None  # set while the dense warm-up runs
        self.refresher: MaskRefresher | None = None  # set while a mask that moves trains

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       optimizer=None, train_dataloader=None, lr_scheduler=None, **kwargs):
        zero = check_supported(args, model, optimizer)
        if model is not None:  # a 4-bit CPU layer repacks at the first eval forward, and its backward is then wrong
            keep_cpu_4bit_trainable(model)
        self.close()
        if args.should_save and (self.save_final_mask or args.save_strategy != "no"):
            check_writable(args.output_dir)
        # ZeRO: the torch optimizer that ZeRO wraps holds the param groups (and steps the fp32 masters)
        inner = zero.optimizer if zero is not None else innermost_optimizer(optimizer)
        if self.given_mask is not None:
            if state.global_step > 0:
                check_given(self.given_mask, state, inner, lr_scheduler)
            self.mask, self.source = self.given_mask, "given"
        elif 0 < state.global_step < self.config.warmup_steps:
            raise ValueError(f"FishCallback: this checkpoint (step {state.global_step}) is inside the warm-up of "
                             f"{self.config.warmup_steps} dense steps, before any mask exists; resume from a "
                             "checkpoint after the warm-up or start again")
        elif state.global_step > 0:
            self.mask, self.source = load_resumed(args, state, model, inner, lr_scheduler), "checkpoint"
            wanted = (self.budget if self.budget is not None else self.allocation_mask.num_selected
                      if self.allocation_mask is not None else round(self.keep * self.mask.num_candidates))
            if wanted != self.mask.num_selected:
                warnings.warn(f"FishCallback: resuming with the checkpoint's mask ({self.mask.num_selected} entries), "
                              f"not the {wanted} that keep/budget ask for now", stacklevel=2)
        elif self.mask is not None and self._trained is not None and self._trained() is model:
            # a second train() starts a fresh TrainerState at step 0, but these weights trained under self.mask:
            # a new selection on them would move other entries and leave no mask that describes the adapter
            self.source = "kept"
            warnings.warn("FishCallback: keeping the mask this callback selected for this model in an earlier "
                          f"train() ({self.mask.num_selected} entries); call callback.reset() before train() for a "
                          "fresh selection", stacklevel=2)
        elif self.config.warmup_steps:
            if zero is not None or is_sharded(model):
                raise NotImplementedError("FishCallback(warmup_steps=...) runs on one process or DDP; under ZeRO or "
                                          "FSDP2 select the mask without warm-up (warmup_steps=0) or pass mask=")
            self._warm, self.source = WarmUp(model, self.config.warmup_steps), "warmup"
            return  # dense steps until on_step_end reaches warmup_steps
        else:
            self.mask, self.source = self._select(args, state, model, train_dataloader), "fisher"
        self._attach(args, state, model, inner, zero, lr_scheduler)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                    optimizer=None, train_dataloader=None, lr_scheduler=None, **kwargs):
        if self.refresher is not None and self.refresher.mask is not self.mask:  # the mask moved in this step
            self.mask = self.refresher.mask
            self._publish(args, state, innermost_optimizer(optimizer), lr_scheduler)
            last = self.refresher.history[-1]
            self.stats.update({"fish/refresh_changed": last["regrown"], "fish/ever_kept": self.refresher.ever_kept()})
            state.log_history.append({**self.stats, "step": state.global_step})
        if self._warm is None or not self._warm.due(state.global_step):
            return
        mask = self._select(args, state, model, train_dataloader)  # scored at the warmed-up weights
        inner = innermost_optimizer(optimizer)
        self._warm.rewind(model, inner)
        self._warm, self.mask, self.source = None, mask, "fisher"
        self._attach(args, state, model, inner, None, lr_scheduler)

    def _attach(self, args, state, model, inner, zero, lr_scheduler) -> None:
        """Guard ``self.mask`` from now on, and make it travel with every checkpoint."""
        self.mask = without_digests(self.mask)  # digests of the folder it was read from describe only that folder
        if self.source != "given":
            self._trained = weakref.ref(model)
        self._publish(args, state, inner, lr_scheduler)
        if zero is not None:  # ZeRO swaps flat fp32 masters into its groups; the module parameters are these
            params = zero_params(zero)
        else:
            params = [p for group in inner.param_groups for p in group["params"]]
        guard = MaskGuard(self.mask, model, params)  # refuses a kept candidate that does not require grad
        check_kept_in_optimizer(self.mask, guard)
        self.guard = guard.attach(zero if zero is not None else inner)
        schedule = self.config.refresh()
        if schedule is not None:
            if zero is not None:
                raise NotImplementedError("FishCallback(refresh_every=...) moves the mask on one process or DDP; "
                                          "under DeepSpeed ZeRO train with a fixed mask (refresh_every=0)")
            self.refresher = MaskRefresher(self.guard, inner, schedule)  # a resumed run continues its schedule
            if self.refresher.mask is not self.mask:  # resumed: the checkpoint's refresher state holds the mask
                self.mask = self.refresher.mask
                self._publish(args, state, inner, lr_scheduler)
        self._log(state, model)

    def _publish(self, args, state, inner, lr_scheduler) -> None:
        """Make the mask in force travel with every checkpoint."""
        record(args, state, self.mask)  # its fingerprint goes into every checkpoint's trainer_state.json
        # The mask travels in the optimizer's first param group (as schedulers keep "initial_lr" there), so every
        # checkpoint's optimizer.pt carries it and resuming from any folder restores exactly this mask. FSDP2
        # checkpoints (torch.distributed.checkpoint) load only the keys a fresh optimizer has, so it also rides in
        # the LR scheduler's state (state_dict() is its __dict__), which the Trainer saves and loads as a file.
        inner.param_groups[0][MASK_GROUP_KEY] = self.mask.to_state()
        if hasattr(lr_scheduler, "state_dict") and hasattr(lr_scheduler, "__dict__"):
            setattr(lr_scheduler, MASK_GROUP_KEY, inner.param_groups[0][MASK_GROUP_KEY])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.mask is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self._save_mask(folder, kwargs.get("model"))
        else:
            warnings.warn(f"FishCallback: checkpoint folder {folder} not found; the mask was not saved with it "
                          "(save it yourself with mask.save(...))", stacklevel=2)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.close()  # first: later training of this model is never masked by surprise, even if saving fails
        if self._warm is not None:
            self._warm = None
            warnings.warn(f"FishCallback: training ended at step {state.global_step}, inside the warm-up of "
                          f"{self.config.warmup_steps} dense steps: no mask was selected and every adapter entry "
                          "trained; lower warmup_steps or train longer", stacklevel=2)
        if self.mask is not None and self.save_final_mask and args.should_save:
            save_mask_before_adapter(args.output_dir, self.mask, kwargs.get("model"))

    def close(self) -> None:
        """Detach the gradient and step hooks (done automatically at train end). Idempotent."""
        if self.refresher is not None:
            self.refresher.close()
            self.refresher = None
        if self.guard is not None:
            self.guard.close()
            self.guard = None

    def reset(self) -> None:
        """Forget the mask selected in an earlier ``train()``: the next one selects afresh (or uses ``mask=``)."""
        self.close()
        self.mask, self.source, self._trained, self._warm = self.given_mask, None, None, None

    def attach_to(self, trainer) -> FishCallback:
        """Add this callback to ``trainer`` so that its ``fish/*`` figures also reach the reporters
        (``report_to``: TensorBoard, W&B, ...): transformers calls reporters before user callbacks and a callback
        cannot call ``Trainer.log``, so a small bridge placed first adds them to the first log after train begin.
        ``Trainer(..., callbacks=[fish])`` works too, with the figures in ``trainer.state.log_history`` only."""
        bridge = _LogBridge(self)
        trainer.callback_handler.callbacks.insert(0, bridge)
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def __enter__(self) -> FishCallback:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _save_mask(self, folder: str, model: nn.Module | None) -> None:
        """The mask beside a checkpoint's adapter, with a digest of those adapter files (checked on resume)."""
        save_mask_beside_adapter(folder, self.mask, model)

    # ------------------------------------------------------------------ mask sources
    def _select(self, args, state, model: nn.Module, train_dataloader) -> FishMask:
        if train_dataloader is None:
            raise ValueError("FishCallback got no train dataloader from the Trainer: give it a train_dataset")
        dataset = train_dataloader.dataset
        if not hasattr(dataset, "__len__"):
            raise ValueError(
                "FishCallback cannot sample calibration examples from a streaming train dataset (no length). "
                "Compute the mask first (ft.compute_fisher on some batches + ft.select_mask) and pass "
                "FishCallback(mask=...)"
            )
        cands = self.candidates(model) if callable(self.candidates) else self.candidates
        cands = list(cands) if cands is not None else peft_candidates(model)
        seed = args.seed if self.seed is None else self.seed
        loader = calibration_loader(dataset, self.num_samples, batch_size=self.batch_size or
                                    args.per_device_train_batch_size, collate_fn=train_dataloader.collate_fn,
                                    seed=seed)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # belt and braces: training RNG untouched by the Fisher pass
            moments = gradient_moments(model, loader, num_samples=self.num_samples, kind=self.kind, params=cands,
                                       engine=self.engine, loglik_fn=self.loglik_fn, seed=seed,
                                       progress=state.is_local_process_zero and not args.disable_tqdm)
        c = self.config
        scores = moments.fisher
        mask = select_mask(score_of(moments, c.score), keep=self.keep, budget=self.budget, strategy=self.strategy,
                           seed=seed, exclude=self.exclude, always_train=self.always_train, alpha=self.alpha,
                           allocation=self.allocation_mask if self.allocation_mask is not None else c.allocation)
        kept = torch.cat([scores[n].reshape(-1)[mask.indices[n]] for n in mask.names])
        fisher = {"num_samples": min(self.num_samples, len(dataset)), "kind": self.kind, "seed": seed,
                  "total": float(sum(float(scores[n].sum()) for n in mask.names)),
                  "kept": float(kept.sum()), "min_kept": float(kept.min()) if kept.numel() else 0.0}
        return self._with_always_train(mask, model, fisher)

    def _with_always_train(self, mask: FishMask, model: nn.Module, fisher: dict) -> FishMask:
        """Record the non-candidate trainable parameters that train fully (select_mask only sees scored ones)."""
        patterns = [self.always_train] if isinstance(self.always_train, str) else list(self.always_train or [])
        skip = set(mask.shapes) | set(mask.excluded)
        names = [n for n, p in model.named_parameters() if p.requires_grad and n not in skip
                 and (self.always_train is None or any(re.search(pat, n) for pat in patterns))]
        numel = sum(full_numel(p) for n, p in model.named_parameters() if n in set(names))
        meta = {**mask.meta, "always_train_numel": numel, "fisher": fisher,
                "fish_config": self.config.to_dict()}
        return dataclasses.replace(mask, always_train=names, meta=meta)

    def _log(self, state: TrainerState, model: nn.Module) -> None:
        mask = self.mask
        trainable = mask.trainable_count(model)
        self.stats = {"fish/kept": mask.num_selected, "fish/candidates": mask.num_candidates,
                      "fish/keep": mask.num_selected / max(mask.num_candidates, 1),
                      "fish/always_train": trainable - mask.num_selected, "fish/trainable": trainable}
        state.log_history.append({**self.stats, "step": state.global_step})
        if state.is_world_process_zero:
            logger.info("FISH mask (%s): kept %d of %d candidate entries, %d trainable in total",
                        self.source, mask.num_selected, mask.num_candidates, trainable)


class _LogBridge(TrainerCallback):
    """Adds a FishCallback's figures to the ``logs`` of the first log after train begin, before reporters run."""

    def __init__(self, fish: FishCallback):
        self.fish, self.pending = fish, False

    def on_train_begin(self, args, state, control, **kwargs):
        self.pending = True  # the FishCallback fills fish.stats later in this same event

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None and self.fish.stats:
            logs.update(self.fish.stats)
            self.pending = False
