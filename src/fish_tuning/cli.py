"""The `fish-tune` command.

``train``, ``mask`` and ``compare`` parse their own flags with transformers' ``HfArgumentParser`` (every
``TrainingArguments`` flag, as in ``trl sft``); they are dispatched before the argparse tree below and imported only
when they run. The paper's studies (presets, report, demo) are the lab's (``python -m fish_lab``), not the package's.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

HF_COMMANDS = {
    "train": "fine-tune a model with a PEFT method + FISH on a hub dataset or local files (see train --help)",
    "mask": "compute, save and show a FISH mask (per-layer table, JSON summary, PNG heat map); --show FILE",
    "compare": "does FISH beat plain LoRA on my data? arms x seeds at equal budget, with train's flags, a paired "
               "report (see compare --help)",
}


LAB = ("the paper's studies (presets, study YAML files, report, demo) live outside the package, in the "
       "repository's lab/: from a source checkout run `python -m fish_lab {}` (make demo installs it); for your "
       "own data use `fish-tune compare --model_name_or_path ... --train_file ...` (see fish-tune compare --help)")


def _quickstart(args: argparse.Namespace) -> int:
    from .commands.quickstart import write

    paths = write(args.dir)
    print("quick-start data: " + "  ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fish-tune", description="FISH-Tuning for peft / transformers")
    parser.add_argument("--version", action="version", version=f"fish-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in HF_COMMANDS.items():  # listed in --help; parsed by commands.<name> (see main)
        sub.add_parser(name, help=text, add_help=False)
    quick = sub.add_parser("quickstart", help="write the README's quick-start data (reviews.csv, reviews_dev.csv, "
                                              "sft.jsonl) into examples/data (or --dir)")
    quick.add_argument("--dir", default="examples/data", help="folder to write them into")
    quick.set_defaults(func=_quickstart)
    return parser


_STUDY_OPTIONS = ("--data-dir", "--out-dir", "--no-report")  # options of the lab's `compare PRESET`


def own_data_compare(args: list[str]) -> bool:
    """Flags first (other than the lab's study options) mean `fish-tune train`'s flags: your own model and data.
    A preset or study YAML first is the lab's form, which the package points to."""
    if not args:
        return False
    first = args[0].split("=", 1)[0]
    return first.startswith("-") and first not in _STUDY_OPTIONS


def _quiet_bitsandbytes_kernel_hub() -> None:
    """bitsandbytes (imported by peft whenever it is installed) logs at import, on CPUs with AVX512-bf16, that it
    could not fetch an optional 4-bit kernel from the hub: on every command, 4-bit or not, offline or not. It then
    uses its own kernel, which the 4-bit tests check; the line only tells a user to install what is installed."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_bitsandbytes_kernel_hub()
    if argv[:1] in (["report"], ["demo"]) or (argv[:1] == ["compare"] and not own_data_compare(argv[1:])):
        print(f"fish-tune: error: {LAB.format(' '.join(argv))}", file=sys.stderr)
        return 2
    if argv and argv[0] in HF_COMMANDS:
        import importlib

        if len(argv) == 2 and argv[1] in ("-h", "--help"):  # cached: the full parser imports transformers (seconds)
            from .commands.helpcache import help_text

            print(help_text(argv[0]), end="")
            return 0

        return importlib.import_module(f".commands.{argv[0]}", __package__).main(argv[1:])
    args = build_parser().parse_args(argv)  # --help, --version, or an unknown command: argparse prints and exits
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # FileNotFoundError / PermissionError are OSErrors
        print(f"fish-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
