"""`python -m fish_lab`: the paper's studies from a source checkout (not part of the fish_tuning wheel).

    python -m fish_lab compare configs/glue6.yaml seeds=[0,1,2]   # a study preset or YAML, resumable
    python -m fish_lab report benchmarks/results/glue6.jsonl       # its table and plots from the results file
    python -m fish_lab demo                                        # the old short demo (keep 5 %)
    python -m fish_lab data sst2 data/sst2                         # a task as files for fish-tune compare / train

Your own data goes through `fish-tune compare` with `fish-tune train`'s flags instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys


def _needs_extras(command: str) -> None:
    """The lab uses the [experiments] extra; say so in one line instead of a bare import error."""
    missing = [m for m in ("yaml", "matplotlib", "sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"fish_lab {command} needs the experiments extra (missing: {', '.join(missing)}): "
                          "pip install 'fish-tuning[experiments]'")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time (so redirected / captured output gets the lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def _show_progress() -> None:
    """The runner logs its progress lines through ``logging``; the command line shows them on stdout, once."""
    log = logging.getLogger("fish_lab")
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _demo(args: argparse.Namespace) -> int:
    _needs_extras("demo")
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(data_dir=args.data_dir, keep=args.keep, train_examples=args.train_examples,
                        seed=args.seed, save_mask=args.save_mask))
    return 0


def _compare(args: argparse.Namespace) -> int:
    _needs_extras("compare")
    from .config import load_config
    from .presets import resolve_config
    from .report import table, write_report
    from .runner import Study, results_path

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
        print(f"results: {results_path(cfg)} (python -m fish_lab report builds the table and plots)")
        return 0
    paths = write_report(results_path(cfg))
    print()
    print(table([r for r in records if r.get("id")]))
    print()
    print(f"results: {results_path(cfg)}")
    print(f"table:   {paths['table']}")
    print(f"plots:   {paths['proportion_plot']}  {paths['epoch_plot']}  {paths.get('mask_plot', '')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    _needs_extras("report")
    from .report import write_report

    paths = write_report(args.results, args.out_dir)
    print(paths["table"].read_text())
    print(f"table: {paths['table']}\nplots: {paths['proportion_plot']}  {paths['epoch_plot']}  "
          f"{paths.get('mask_plot', '')}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from .export import export_task

    paths = export_task(args.task, args.out, args.data_dir, args.train_examples, args.dev_examples)
    columns = "" if args.task == "gsm8k" else " --label_column label"
    print(f"train: {paths['train']}\ndev:   {paths['dev']}\nthen: fish-tune compare --model_name_or_path minilm "
          f"--train_file {paths['train']} --validation_file {paths['dev']}{columns} --arms original,fish,rand "
          "--seeds 0,1,2 --output_dir cmp")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fish_lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MiniLM + LoRA (PiSSA) on SST-2, keep 5%%, short masked training")
    demo.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (default: $FISH_DATA_DIR or ../shared/data)")
    demo.add_argument("--keep", type=float, default=0.05, help="fraction of LoRA entries to train")
    demo.add_argument("--train-examples", type=int, default=2000, help="SST-2 train sentences for the short run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save-mask", help="write the mask to this .safetensors file")
    demo.set_defaults(func=_demo)

    cmp_ = sub.add_parser("compare", help="Original PEFT vs FISH vs rand vs rev at equal budget (a preset or YAML)")
    cmp_.add_argument("config", help="a preset name (demo, glue6, gsm8k, ...) or a YAML study config file")
    cmp_.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seeds=[0] train.epochs=1")
    cmp_.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (same as data_dir=DIR)")
    cmp_.add_argument("--out-dir", help="where results and report go (same as out_dir=DIR)")
    cmp_.add_argument("--no-report", action="store_true",
                      help="write only the results file (jobs that share a study: run report once after)")
    cmp_.set_defaults(func=_compare)

    data = sub.add_parser("data", help="write a GLUE task (CSV) or GSM8K (prompt/completion JSONL) as files for "
                          "fish-tune train / compare")
    data.add_argument("task", help="cola, sst2, mrpc, rte, stsb, wnli or gsm8k")
    data.add_argument("out", help="folder for train.* and dev.*")
    data.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (default: $FISH_DATA_DIR or ../shared/data)")
    data.add_argument("--train-examples", type=int, help="a subset of train, drawn as the studies draw it "
                      "(GLUE: seeded random rows; GSM8K: the first rows; default: every row)")
    data.add_argument("--dev-examples", type=int, help="a subset of dev, drawn the same way (default: every row)")
    data.set_defaults(func=_data)

    rep = sub.add_parser("report", help="rebuild the markdown table and plots from a results .jsonl file")
    rep.add_argument("results", help="results file written by compare")
    rep.add_argument("--out-dir", help="where to write them (default: beside the results file)")
    rep.set_defaults(func=_report)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``compare`` also takes ``key=value`` overrides after its options
    (``compare cfg.yaml --out-dir R seeds=[0]``)."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "command", None) == "compare":
        stray = [e for e in extra if e.startswith("-") or "=" not in e]
        if not stray:
            args.overrides = [*args.overrides, *extra]
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as err:  # FileNotFoundError / PermissionError are OSErrors
        print(f"fish_lab: error: {err}", file=sys.stderr)
        return 2
