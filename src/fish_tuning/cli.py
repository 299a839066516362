"""The `fish-tune` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .experiments.demo import DemoConfig, run_demo

    cfg = DemoConfig(data_dir=args.data_dir, keep=args.keep, train_examples=args.train_examples,
                     seed=args.seed, save_mask=args.save_mask)
    run_demo(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fish-tune", description="FISH-Tuning for peft / transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="MiniLM + LoRA (PiSSA) on SST-2, keep 5%%, short masked training")
    demo.add_argument("--data-dir", help="folder with glue/ and gsm8k/ (default: $FISH_DATA_DIR or ../shared/data)")
    demo.add_argument("--keep", type=float, default=0.05, help="fraction of LoRA entries to train")
    demo.add_argument("--train-examples", type=int, default=2000, help="SST-2 train sentences for the short run")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save-mask", help="write the mask to this .safetensors file")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"fish-tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
