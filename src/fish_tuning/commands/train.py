"""`fish-tune train`: fine-tune any transformers model with a PEFT method + FISH from the command line.

    fish-tune train --model_name_or_path minilm --train_file reviews.csv --label_column stars \\
        --peft lora --keep 0.05 --output_dir out --num_train_epochs 1

Sequence classification (integer / string labels), regression (other numeric labels) or causal-LM SFT through
TRL's ``SFTTrainer`` (prompt + completion columns, a chat ``messages`` column, or plain text), chosen from the
data. Every user error is one ``fish-tune: error:`` line given before any model weights load.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..files import check_folder_free, exclusive_folder
from .columns import describe_task, infer_task
from .common import (
    CommandError,
    DataArguments,
    FishArguments,
    ModelArguments,
    Parser,
    PeftArguments,
    check_data_args,
    check_model_args,
    check_output_dir,
    check_peft_args,
    fish_config,
    load_data,
    read_file,
    resolve_model_path,
)
from .metrics import TaskMetrics
from .outputs import eval_line, final_evaluation, train_metrics
from .preflight import (
    check_budget,
    check_outputs_spare_inputs,
    check_push_to_hub,
    check_reporters,
    check_resume,
)
from .quant_args import QuantArguments, check_quant_args, check_quant_task

# transformers' 5e-5 leaves a 5%-FISH LoRA at chance for a hundred steps; the compare harness uses 5e-4
DEFAULT_LR = 5e-4
logger = logging.getLogger("fish_tuning")


@dataclass
class RunArguments:
    dense: bool = field(default=False, metadata={
        "help": "Train every PEFT entry (the plain PEFT baseline): the same as --keep 1.0; no Fisher pass runs."})
    test_file: str | None = field(default=None, metadata={
        "help": "Local test data (same format as --train_file); with --do_predict, predictions go to "
                "<output_dir>/predict_results.tsv (and test_results.json when it has labels)."})


def parser() -> Parser:
    from transformers import TrainingArguments

    return Parser("fish-tune train", __doc__.split("\n\n")[0],
                  [ModelArguments, DataArguments, PeftArguments, FishArguments, TrainingArguments, RunArguments,
                   QuantArguments],
                  defaults={"learning_rate": DEFAULT_LR})


def _report_callback(fish):
    from transformers import TrainerCallback

    from .build import trainable_line

    class TrainableReport(TrainerCallback):
        """Prints the real trainable count once FishCallback (listed before it) has chosen the mask."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and fish.mask is not None:
                print(trainable_line(fish.mask, model), flush=True)

    return TrainableReport()


def _checks(fish_args, run_args: RunArguments, targs, data_args) -> Any:
    """Flag combinations of this command, before anything is read."""
    if run_args.dense:
        if fish_args.budget is not None or fish_args.keep not in (None, 1.0):
            raise CommandError("--dense trains every entry: leave out --keep / --budget (or give --keep 1.0)")
        fish_args.keep = 1.0
    config = fish_config(fish_args)
    if config.keep == 1.0 and (config.warmup_steps or config.refresh_every):
        raise CommandError("--keep 1.0 (--dense) trains every entry: --fish_warmup_steps / --refresh_every have "
                           "nothing to select; leave them out")
    if config.warmup_steps and 0 < targs.max_steps <= config.warmup_steps:
        raise CommandError(f"--max_steps {targs.max_steps} ends inside --fish_warmup_steps {config.warmup_steps}: "
                           "no mask would ever train; lower the warm-up or train longer")
    if run_args.test_file is not None:
        if not data_args.train_file:
            raise CommandError("--test_file goes with --train_file")
        targs.do_predict = True
    if targs.do_predict and run_args.test_file is None:
        raise CommandError("--do_predict needs --test_file (local test data, same format as --train_file)")
    return config


def run(argv: list[str]) -> int:
    model_args, data_args, peft_args, fish_args, targs, run_args, quant = parser().parse(argv)
    config = _checks(fish_args, run_args, targs, data_args)
    check_peft_args(peft_args)
    check_model_args(model_args)
    check_data_args(data_args)
    check_output_dir(targs.output_dir)
    check_quant_args(quant, peft_args, targs.output_dir, targs.resume_from_checkpoint)
    check_folder_free(targs.output_dir)  # before any model loads: a folder in use is refused at once
    path = resolve_model_path(model_args.model_name_or_path)
    data = load_data(data_args)
    info = infer_task(model_args, data_args, data["train"])
    if run_args.test_file is not None:
        if info["task"] == "causal-lm":
            raise CommandError("--do_predict / --test_file write class or number predictions; causal-LM SFT has "
                               "none (evaluate with --validation_file: eval_loss)")
        data["test"] = read_file("--test_file", run_args.test_file)
    print(describe_task(info, data_args), flush=True)
    from .build import build_trainer, check_task_requirements

    check_task_requirements(info["task"])
    check_quant_task(quant, info["task"])
    check_outputs_spare_inputs(targs.output_dir, path, {"--train_file": data_args.train_file, "--validation_file":
                               data_args.validation_file, "--test_file": run_args.test_file})
    check_reporters(targs.report_to)
    check_push_to_hub(targs)
    check_resume(targs.resume_from_checkpoint, targs.output_dir, peft_args)
    check_budget(config, path, info, peft_args, len(info["label_list"] or [None]))
    # ---- nothing above loads model weights; everything below may take a while
    from .. import FishCallback

    fish = _fish_callback(FishCallback, dense=config.keep == 1.0)(config=config)
    trainer = build_trainer(model_args, data_args, peft_args, info, path, data, targs,
                            [fish, _report_callback(fish)], quant=quant)
    from .logs import attach_log_bridge

    attach_log_bridge(trainer, fish)  # fish/* figures reach --report_to reporters
    what = "dense (every entry, no Fisher pass)" if config.keep == 1.0 else f"FISH {config.strategy} (" + (
        f"keep {config.keep}" if config.keep is not None else f"budget {config.budget}") + ")"
    print(f"fish-tune train: {info['task']} with {peft_args.peft} + {what} on {len(trainer.train_dataset):,} "
          "examples", flush=True)
    with exclusive_folder(targs.output_dir):  # a second run into this folder now is refused, not overwritten
        _train_and_save(trainer, fish, info, model_args, peft_args, targs, config)
    return 0


def _train_and_save(trainer, fish, info: dict, model_args, peft_args, targs, config) -> None:
    from ..integrations.adapter import save_mask_beside_adapter
    from .card import model_card
    from .maskview import write_summary
    from .outputs import (
        LABEL_CONFIG,
        label_config,
        portable_base,
        set_base_model,
        write_json,
        write_predictions,
    )

    out, resume = targs.output_dir, targs.resume_from_checkpoint  # a checkpoint folder, or true: the last one
    result = trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
    trainer.save_model(out)  # the peft adapter
    if not trainer.args.should_save:
        return
    base = portable_base(model_args.model_name_or_path)
    set_base_model(out, base)  # the hub id behind an alias, not this machine's site-packages path
    train = train_metrics(result.metrics, fish.fisher_runtime)
    trainer.save_metrics("train", train)
    metrics = final_evaluation(trainer) if trainer.eval_dataset is not None else {}
    describe, constant = _baseline(trainer, info)
    if metrics:
        trainer.save_metrics("eval", metrics)
        print(eval_line(metrics, describe, constant), flush=True)
    test = getattr(trainer, "fish_test_dataset", None)
    if test is not None:
        prediction = trainer.predict(test, metric_key_prefix="test")
        n = write_predictions(os.path.join(out, "predict_results.tsv"), prediction.predictions, info)
        if prediction.metrics and "test_loss" in prediction.metrics:
            trainer.save_metrics("test", prediction.metrics)
        print(f"predictions for {n:,} test rows: {os.path.join(out, 'predict_results.tsv')}", flush=True)
    trainer.save_state()  # trainer_state.json at the root: the loss history, also with --save_strategy no
    labels = label_config(info)
    if labels is not None:
        write_json(os.path.join(out, LABEL_CONFIG), labels)
    summary = None
    if fish.mask is not None:  # None: the run ended inside --fish_warmup_steps (FishCallback warned)
        save_mask_beside_adapter(out, fish.mask, trainer.model)  # names the adapter just saved
        summary = write_summary(fish.mask, os.path.join(out, "fish_mask.json"), trainer.model)
    from ..files import atomic_write_text

    atomic_write_text(os.path.join(out, "README.md"), model_card(
        base=base, info=info, peft=peft_args, summary=summary, train=train, evaluation=metrics, describe=describe,
        args=targs, dense=config.keep == 1.0))
    if summary is None:
        print(f"adapter (trained densely: the run ended inside the warm-up, no mask): {out}")
    else:
        print(f"adapter, fish_mask.safetensors and fish_mask.json ({summary['num_selected']:,} kept entries), "
              f"model card README.md: {out}")


def _fish_callback(cls, dense: bool):
    """FishCallback that adds up the time of its Fisher passes (fisher_runtime, reported apart from training);
    with ``dense`` (keep 1.0) every candidate entry is kept without a Fisher pass (nothing to rank)."""

    class RunFish(cls):
        fisher_runtime = 0.0

        def _select(self, args, state, model, train_dataloader):
            if dense:
                return _every_entry(self, args, model)
            start = time.perf_counter()
            try:
                return super()._select(args, state, model, train_dataloader)
            finally:
                self.fisher_runtime += time.perf_counter() - start

    return RunFish


def _every_entry(fish, args, model):
    import torch

    from ..methods import peft_candidates
    from ..selection import select_mask

    params = dict(model.named_parameters())
    scores = {n: torch.zeros(params[n].shape) for n in peft_candidates(model)}
    mask = select_mask(scores, keep=1.0, strategy=fish.strategy, seed=args.seed if fish.seed is None else fish.seed,
                       exclude=fish.exclude, always_train=fish.always_train)
    return fish._with_always_train(mask, model, {"num_samples": 0, "kind": "none (keep 1.0: no Fisher pass)"})


def _baseline(trainer, info: dict) -> tuple[str | None, str | None]:
    """The headline metric's name and the trivial predictor in words, for the eval line."""
    metrics = trainer.compute_metrics
    if not isinstance(metrics, TaskMetrics):
        return None, None
    if info["task"] == "regression":
        return metrics.describe(), f"always the train mean {metrics.constant:.4g}"
    return metrics.describe(), f"always {info['label_names'][metrics.constant]!r}"


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except (CommandError, ValueError, OSError, ImportError) as err:
        print(f"fish-tune: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    except ArithmeticError as err:  # FloatingPointError: a non-finite gradient in the Fisher pass; names its fix
        text = str(err).splitlines()[0] if str(err) else (
            f"{type(err).__name__}: check the data's inputs and labels, and train in float32 (not --fp16)")
        print(f"fish-tune: error: {text}", file=sys.stderr)
        return 2
