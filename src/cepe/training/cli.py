"""`cepe train --config FILE [key=value ...]`: train a CEPE adapter from a YAML recipe."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a CEPE adapter (warmup, long-document, distilled) from a YAML recipe",
        description="Train a CEPE adapter. Overrides are dotted keys, e.g. output_dir=runs/x "
        "train.max_steps=50 data.train=/path/to/texts (max_steps= is short for train.max_steps=). "
        "Run under `accelerate launch --config_file configs/accelerate/ddp.yaml -m cepe.cli train ...` "
        "for several GPUs.",
    )
    p.add_argument("--config", help="YAML recipe (see configs/)")
    # REMAINDER: options may also come after the overrides (`... max_steps=5 --no-progress`)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true", help="build the model and the data, print their sizes, and exit")
    p.add_argument(
        "--write-teacher",
        metavar="FILE",
        help="precompute top-k teacher probabilities for distill.teacher=file, then exit",
    )
    p.add_argument(
        "--teacher", help="with --write-teacher: a teacher decoder sharing the tokenizer (default: the base decoder)"
    )
    p.add_argument(
        "--teacher-samples",
        type=int,
        help="with --write-teacher: number of samples (default: max_steps x batch x grad_accum)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run, _train_parser=p)


VALUE_OPTIONS = {"--config", "--write-teacher", "--teacher", "--teacher-samples"}


def _split_trailing_options(args: argparse.Namespace) -> None:
    """Options that followed an override landed in `overrides`: parse them as options."""
    overrides, options = [], []
    tokens = iter(args.overrides)
    for tok in tokens:
        if tok.startswith("--"):
            options.append(tok)
            if tok in VALUE_OPTIONS:
                options.append(next(tokens, ""))
        else:
            overrides.append(tok)
    if options:
        args._train_parser.parse_args(options, namespace=args)
    args.overrides = overrides


def run(args: argparse.Namespace) -> int:
    from .config import dump_yaml, load_config

    _split_trailing_options(args)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    progress = not args.no_progress
    if args.write_teacher:
        from .trainer import write_teacher_file

        path = write_teacher_file(
            cfg, args.write_teacher, teacher=args.teacher, samples=args.teacher_samples, progress=progress
        )
        print(f"teacher top-{cfg.distill.topk} written to {path}")
        return 0
    from .trainer import Trainer

    trainer = Trainer(cfg, progress=progress)
    if args.dry_run:
        if trainer.acc.is_main_process:
            print(json.dumps({"model": trainer.description, "data": trainer.data.report}, indent=1, default=str))
        return 0
    trainer.fit()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cepe.training.cli --config ...`: the same as `cepe train`, without importing the
    other parts' command lines (and their optional dependencies, e.g. on a bare GPU machine)."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m cepe.training.cli")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cepe train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
