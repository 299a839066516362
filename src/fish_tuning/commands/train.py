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

from ..files import check_folder_free, exclusive_folder
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
    infer_task,
    load_data,
    resolve_model_path,
)
from .metrics import TaskMetrics
from .outputs import eval_line, final_evaluation, train_metrics
from .quant_args import QuantArguments, check_quant_args

# transformers' 5e-5 leaves a 5%-FISH LoRA at chance for a hundred steps (issue 12); the compare harness uses 5e-4
DEFAULT_LR = 5e-4
logger = logging.getLogger("fish_tuning")


def parser() -> Parser:
    from transformers import TrainingArguments

    return Parser("fish-tune train", __doc__.split("\n\n")[0],
                  [ModelArguments, DataArguments, PeftArguments, FishArguments, QuantArguments, TrainingArguments],
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


def run(argv: list[str]) -> int:
    model_args, data_args, peft_args, fish_args, quant, targs = parser().parse(argv)
    config = fish_config(fish_args)
    check_peft_args(peft_args)
    check_model_args(model_args)
    check_data_args(data_args)
    check_output_dir(targs.output_dir)
    if config.warmup_steps and 0 < targs.max_steps <= config.warmup_steps:
        raise CommandError(f"--max_steps {targs.max_steps} ends inside --fish_warmup_steps {config.warmup_steps}: "
                           "no mask would ever train; lower the warm-up or train longer")
    check_quant_args(quant, peft_args, targs.output_dir, targs.resume_from_checkpoint)
    check_folder_free(targs.output_dir)  # before any model loads: a folder in use is refused at once
    path = resolve_model_path(model_args.model_name_or_path)
    data = load_data(data_args)
    info = infer_task(model_args, data_args, data["train"])
    from .build import build_trainer, check_task_requirements

    check_task_requirements(info["task"])
    if quant.quantized and info["task"] != "causal-lm":
        raise CommandError("--load_in_4bit / --load_in_8bit are for causal-LM SFT (a quantized classifier's head "
                           "would be quantized too); train classifiers in full precision")
    # ---- nothing above loads model weights; everything below may take a while
    from .. import FishCallback
    from ..integrations.adapter import save_mask_beside_adapter
    from .logs import attach_log_bridge
    from .maskview import write_summary

    fish = _timed(FishCallback)(config=config)
    trainer = build_trainer(model_args, data_args, peft_args, info, path, data, targs,
                            [fish, _report_callback(fish)], quant=quant)
    attach_log_bridge(trainer, fish)  # fish/* figures reach --report_to reporters
    print(f"fish-tune train: {info['task']} with {peft_args.peft} + FISH {config.strategy} "
          f"({'keep ' + str(config.keep) if config.keep is not None else 'budget ' + str(config.budget)}) "
          f"on {len(trainer.train_dataset):,} examples", flush=True)
    resume = targs.resume_from_checkpoint  # a checkpoint folder, or true: the last one in output_dir
    out = targs.output_dir
    with exclusive_folder(out):  # a second run into this folder now is refused, not overwritten
        result = trainer.train(resume_from_checkpoint=True if str(resume).lower() == "true" else resume)
        trainer.save_model(out)  # the peft adapter
        trainer.save_metrics("train", train_metrics(result.metrics, fish.fisher_runtime))
        metrics = final_evaluation(trainer) if trainer.eval_dataset is not None else {}
        if metrics:
            trainer.save_metrics("eval", metrics)
            print(eval_line(metrics, *_baseline(trainer, info)), flush=True)
        trainer.save_state()  # trainer_state.json at the root: the loss history, also with --save_strategy no
        if fish.mask is None:  # the run ended inside --fish_warmup_steps: FishCallback warned; no mask trained it
            print(f"adapter (trained densely: the run ended inside the warm-up, no mask): {out}")
            return 0
        if trainer.args.should_save:  # FishCallback's train-end mask predates it: write it again, naming the adapter
            save_mask_beside_adapter(out, fish.mask, trainer.model)
        summary = write_summary(fish.mask, os.path.join(out, "fish_mask.json"), trainer.model)
    print(f"adapter, fish_mask.safetensors and fish_mask.json ({summary['num_selected']:,} kept entries): {out}")
    return 0


def _timed(cls):
    """FishCallback that adds up the time of its Fisher passes (reported as fisher_runtime, apart from training)."""

    class Timed(cls):
        fisher_runtime = 0.0

        def _select(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._select(*args, **kwargs)
            finally:
                self.fisher_runtime += time.perf_counter() - start

    return Timed


def _baseline(trainer, info: dict) -> tuple[str | None, str | None]:
    """The headline metric's name and the trivial predictor in words, for the eval line."""
    metrics = trainer.compute_metrics
    if not isinstance(metrics, TaskMetrics):
        return None, None
    if info["task"] == "regression":
        return metrics.describe(), f"always the train mean {metrics.constant:.4g}"
    return metrics.describe(), f"always {str(info['label_list'][metrics.constant])!r}"


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
