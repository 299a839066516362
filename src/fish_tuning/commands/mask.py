"""`fish-tune mask`: compute a FISH mask for a model + data (the flags of `fish-tune train`), save it, and show
where the budget goes; or show an existing mask file.

    fish-tune mask --model_name_or_path minilm --train_file reviews.csv --keep 0.05 --output mask.safetensors
    fish-tune mask --show out/fish_mask.safetensors

Prints the per-layer / per-kind table and a layers x modules grid, writes a JSON summary and a PNG heat map
beside the mask. The Fisher pass uses the batches `fish-tune train` would train on (same columns, collator and
seed), so ``--seed S --per_device_train_batch_size B`` here gives the mask that train run selects.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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
    resolve_model_path,
)
from .quant_args import QuantArguments, check_quant_args, check_quant_task


@dataclass
class OutputArguments:
    show: str | None = field(default=None, metadata={
        "help": "Show an existing mask file (no model, data or Fisher pass needed)."})
    output: str = field(default="fish_mask.safetensors", metadata={"help": "Where to write the mask."})
    summary_json: str | None = field(default=None, metadata={
        "help": "JSON summary path (default: the mask path with .json)."})
    png: str | None = field(default=None, metadata={
        "help": "Heat map path (default: the mask path with .png); 'none' skips the picture."})
    per_tensor: bool = field(default=False, metadata={"help": "Also print every candidate tensor's counts."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size of the Fisher pass."})
    seed: int = field(default=42, metadata={"help": "Seed of the model head init and the calibration subset "
                                                    "(as --seed of fish-tune train)."})


def check_file_writable(flag: str, path: str) -> None:
    """A file path that can be written (its folder exists or can be made, and is writable; not a folder itself),
    checked before the model loads, so nothing fails after the Fisher pass with the mask half-reported."""
    if os.path.isdir(path):
        raise CommandError(f"{flag} {path} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CommandError(f"{flag} {path} is not writable; choose another file")
    try:
        check_output_dir(os.path.dirname(os.path.abspath(path)))
    except CommandError:
        raise CommandError(f"{flag} {path}: its folder is not writable (or is a file); choose another path") from None


def _same_file(a: str, b: str) -> bool:
    """True if two paths name one file (symlinks, ``./``, hard links of existing files)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _paths(out: OutputArguments, mask_path: str, flag: str = "--output") -> tuple[str, str | None]:
    """Summary JSON and heat map paths (None: no picture). Raises CommandError before anything is written if two
    outputs, or an output and the mask, are one file: each write would replace the other (a mask named
    ``x.json`` would be overwritten by its own summary)."""
    stem = os.path.splitext(mask_path)[0]
    png = None if (out.png or "").lower() == "none" else (out.png or stem + ".png")
    json_path = out.summary_json or stem + ".json"
    fixes = {"summary": "pass --summary_json another path", "picture": "pass --png another path (or --png none)"}
    for what, path in (("summary", json_path), ("picture", png)):
        if path is not None and _same_file(path, mask_path):
            raise CommandError(f"the {what} would overwrite the mask file {mask_path} ({flag}); name the mask "
                               f"*.safetensors or {fixes[what]}")
    if png is not None and _same_file(json_path, png):
        raise CommandError(f"the summary and the picture would both be written to {png}; pass --summary_json and "
                           "--png different paths")
    return json_path, png


def _show(mask, out: OutputArguments, mask_path: str, model=None, flag: str = "--output") -> None:
    from .maskview import draw_heatmap, grid_table, write_summary

    json_path, png = _paths(out, mask_path, flag)
    data = write_summary(mask, json_path, model)
    print(mask.summary(per_tensor=out.per_tensor))
    print("\nkept entries per layer x module (% of that cell's entries):")
    print(grid_table(data["grid"]))
    moved = data["moved_grid"]
    if moved is not None:
        refresh = mask.meta["refresh"]
        steps = [h["step"] for h in refresh["history"]]
        print(f"\nthe mask moved during training: {len(steps)} refreshes (steps {steps[:3]}{'...' if len(steps) > 3 else ''}), "
              f"{100 * refresh['ever_kept']:.2f}% of the candidates ever kept; kept entries now that were not kept at "
              "the first selection (% of the cell's kept entries):")
        print(grid_table(moved))
    print(f"\nsummary: {json_path}")
    if png:
        draw_heatmap(data["grid"], png, title=f"FISH mask ({mask.strategy}): {mask.num_selected:,} of "
                                              f"{mask.num_candidates:,} entries")
        print(f"heat map: {png}")
        if moved is not None:
            moved_png = os.path.splitext(png)[0] + "_moved.png"
            draw_heatmap(moved, moved_png, title="kept entries that moved since the first selection (% of kept)")
            print(f"moved since the first selection: {moved_png}")


def parser() -> Parser:
    return Parser("fish-tune mask", __doc__.split("\n\n")[0],
                  [ModelArguments, DataArguments, PeftArguments, FishArguments, OutputArguments, QuantArguments])


def show(argv: list[str]) -> int:
    from ..mask import FishMask
    from .maskview import check_png_support

    (out,) = Parser("fish-tune mask --show", "Show a FISH mask file.", [OutputArguments]).parse(argv)
    path = out.show
    if not Path(path).is_file():
        raise CommandError(f"--show {path}: file not found (give a fish_mask.safetensors file)")
    if _paths(out, path, "--show")[1]:  # never writes to the shown mask
        check_png_support()
    _show(FishMask.load(path), out, path, flag="--show")
    return 0


def compute(argv: list[str]) -> int:
    model_args, data_args, peft_args, fish_args, out, quant = parser().parse(argv)
    config = fish_config(fish_args)
    if config.warmup_steps or config.refresh_every:
        raise CommandError("--fish_warmup_steps and --refresh_every act during training; fish-tune mask selects at "
                           "the initial weights only: use fish-tune train with them")
    check_peft_args(peft_args)
    check_model_args(model_args)
    check_data_args(data_args)
    check_output_dir(os.path.dirname(os.path.abspath(out.output)))
    check_quant_args(quant, peft_args, None, None)  # the QPiSSA base is built in a temporary folder, then dropped
    json_path, png = _paths(out, out.output)
    for flag, target in (("--output", out.output), ("--summary_json", json_path), ("--png", png)):
        if target:
            check_file_writable(flag, target)
    for flag, given in (("--train_file", data_args.train_file), ("--validation_file", data_args.validation_file)):
        for what, path in (("mask", out.output), ("summary", json_path), ("picture", png)):
            if given and path and os.path.exists(given) and _same_file(path, given):
                raise CommandError(f"the {what} would overwrite the data file {given} ({flag}); write it elsewhere "
                                   "(--output / --summary_json / --png)")
    if png:  # _paths also refused outputs that are one file, before anything is written
        from .maskview import check_png_support

        check_png_support()
    path = resolve_model_path(model_args.model_name_or_path)
    data = load_data(data_args)
    info = infer_task(model_args, data_args, data["train"])
    print(describe_task(info, data_args, "fish-tune mask"), flush=True)
    from .build import build_trainer, check_task_requirements
    from .preflight import check_budget

    check_task_requirements(info["task"])
    check_quant_task(quant, info["task"])
    check_budget(config, path, info, peft_args, len(info["label_list"] or [None]))
    # ---- nothing above loads model weights
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from .. import FishCallback

    with tempfile.TemporaryDirectory(prefix="fish-mask-") as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=out.per_device_train_batch_size,
                                  seed=out.seed, report_to="none", save_strategy="no")
        data["validation"] = None
        trainer = build_trainer(model_args, data_args, peft_args, info, path, data, targs, [], quant=quant)
        model = trainer.model
        fish = FishCallback(config=config, save_final_mask=False)
        # the callback's own selection (candidates, always-train heads, seeded calibration subset); its guard is
        # attached to a throwaway optimizer and removed at once
        probe = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        with fish:
            fish.on_train_begin(targs, TrainerState(), TrainerControl(), model=model, optimizer=probe,
                                train_dataloader=trainer.get_train_dataloader())
    mask = fish.mask
    mask.save(out.output, model=model)
    print(f"mask: {out.output}")
    _show(mask, out, out.output, model)
    return 0


def main(argv: list[str]) -> int:
    try:
        return show(argv) if any(a == "--show" or a.startswith("--show=") for a in argv) else compute(argv)
    except (CommandError, ValueError, OSError, ImportError) as err:
        print(f"fish-tune: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
