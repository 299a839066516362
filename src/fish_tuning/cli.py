"""The `fish-tune` command.

``train`` and ``mask`` parse their own flags with transformers' ``HfArgumentParser`` (every ``TrainingArguments``
flag, as in ``trl sft``); they are dispatched before the argparse tree below and imported only when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

HF_COMMANDS = {
    "train": "fine-tune a model with a PEFT method + FISH on a hub dataset or local files (see train --help)",
    "mask": "compute, save and show a FISH mask (per-layer table, JSON summary, PNG heat map); --show FILE",
}


def _needs_experiments(command: str) -> None:
    """compare / report / demo use the [experiments] extra; say so in one line instead of a bare import error."""
    import importlib.util

    missing = [m for m in ("yaml", "matplotlib", "sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"fish-tune {command} needs the experiments extra (missing: {', '.join(missing)}): "
                          "pip install 'fish-tuning[experiments]'")


def _demo(args: argparse.Namespace) -> int:
    _needs_experiments("demo")
    from .experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(data_dir=args.data_dir, keep=args.keep, train_examples=args.train_examples,
                     seed=args.seed, save_mask=args.save_mask)
    run_demo(cfg)
    return 0


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (so redirected / captured output gets the lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _show_progress() -> None:
    """The harness logs its progress lines through ``logging``; the command line shows them on stdout, once."""
    log = logging.getLogger("fish_tuning.experiments")
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _compare(args: argparse.Namespace) -> int:
    _needs_experiments("compare")
    from .experiments.config import load_config
    from .experiments.report import table, write_report
    from .experiments.runner import Study, results_path

    args.config = str(resolve_config(args.config))
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    cfg = load_config(args.config, overrides)  # every field is checked before any model is loaded
    _show_progress()
    records = Study(cfg).run()
    if args.no_report:
        print(f"results: {results_path(cfg)} (fish-tune report builds the table and plots)")
        return 0
    paths = write_report(results_path(cfg))
    print()
    print(table([r for r in records if r.get("id")]))
    print()
    print(f"results: {results_path(cfg)}")
    print(f"table:   {paths['table']}")
    print(f"plots:   {paths['proportion_plot']}  {paths['epoch_plot']}  {paths.get('mask_plot', '')}")
    return 0


def resolve_config(spec: str):
    from .commands.presets import resolve_config as resolve

    return resolve(spec)


def _report(args: argparse.Namespace) -> int:
    _needs_experiments("report")
    from .experiments.report import write_report

    paths = write_report(args.results, args.out_dir)
    print(paths["table"].read_text())
    print(f"table: {paths['table']}\nplots: {paths['proportion_plot']}  {paths['epoch_plot']}  "
          f"{paths.get('mask_plot', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fish-tune", description="FISH-Tuning for peft / transformers")
    parser.add_argument("--version", action="version", version=f"fish-tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in HF_COMMANDS.items():  # listed in --help; parsed by commands.<name> (see main)
        sub.add_parser(name, help=text, add_help=False)
    demo = sub.add_parser("demo", help="MiniLM + LoRA (PiSSA) on SST-2, keep 5%%, short masked training")
    demo.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (default: $FISH_DATA_DIR or ../shared/data)")
    demo.add_argument("--keep", type=float, default=0.05, help="fraction of LoRA entries to train")
    demo.add_argument("--train-examples", type=int, default=2000, help="SST-2 train sentences for the short run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save-mask", help="write the mask to this .safetensors file")
    demo.set_defaults(func=_demo)

    cmp_ = sub.add_parser("compare", help="Original PEFT vs FISH vs rand ... at equal budget: on your own data with "
                          "train's flags (compare --help), or a paper preset / study YAML")
    cmp_.add_argument("config", help="a preset name (demo, glue6, gsm8k, ...) or a YAML study config file")
    cmp_.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0] train.epochs=1")
    cmp_.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (same as data_dir=DIR)")
    cmp_.add_argument("--out-dir", help="where results and report go (same as out_dir=DIR)")
    cmp_.add_argument("--no-report", action="store_true",
                      help="write only the results file (jobs that share a study: run fish-tune report once after)")
    cmp_.set_defaults(func=_compare)

    rep = sub.add_parser("report", help="rebuild the markdown table and plots from a results .jsonl file")
    rep.add_argument("results", help="results file written by fish-tune compare")
    rep.add_argument("--out-dir", help="where to write them (default: beside the results file)")
    rep.set_defaults(func=_report)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``compare`` also takes ``key=value`` overrides after its options
    (``fish-tune compare cfg.yaml --out-dir R seeds=[0]``)."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "compare":
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if not stray:
            args.overrides = [*args.overrides, *extra]
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


_STUDY_OPTIONS = ("--data-dir", "--out-dir", "--no-report")


def own_data_compare(args: list[str]) -> bool:
    """`fish-tune compare` has two forms: a preset / study YAML first (the paper's studies), or `fish-tune train`'s
    flags (your own model and data). Flags first, other than the study form's own options, mean the second."""
    if not args:
        return False
    first = args[0].split("=", 1)[0]
    return first.startswith("-") and first not in _STUDY_OPTIONS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compare"] and own_data_compare(argv[1:]):
        from .commands import compare

        return compare.main(argv[1:])
    if argv and argv[0] in HF_COMMANDS:
        import importlib

        return importlib.import_module(f".commands.{argv[0]}", __package__).main(argv[1:])
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # FileNotFoundError / PermissionError are OSErrors
        print(f"fish-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
