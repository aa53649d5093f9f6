"""`cepe bench`: long-context speed and memory, CEPE against full attention.

    cepe bench --preset llama2-7b --out docs/bench            # the issue's sweep, on a GPU
    cepe bench --smoke --out /tmp/bench                         # tiny shapes on the CPU, seconds
    python3 -m cepe.benchmarks ...                               # the same, without the entry point
"""

from __future__ import annotations

import argparse
import sys

from ..cli_options import add_model_arguments
from ..evaluation.cli_args import size
from .presets import PRESETS
from .report import _k
from .runner import DEFAULT_LENGTHS, DEFAULT_POLICIES, POLICIES, BenchConfig, run_bench

SMOKE = dict(preset="tiny", lengths=(16, 32, 64), score_tokens=16, new_tokens=8, device="cpu", dtype="float32",
             hf_lengths=(32,), reps=2, question_tokens=8)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        out = [size(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths: expected e.g. 4K,8K,32768,1M, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive, got {text!r}")
    return tuple(sorted(set(out)))


def _names(allowed):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {sorted(allowed)}")
        return names
    return parse


def _budget(text: str):
    if text in ("free", "library"):
        return None if text == "library" else "free"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kv-budget-gb: a number, 'free' or 'library', got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="llama2-7b", choices=PRESETS, help="model shapes (random weights)")
    g.add_argument("--config", dest="config_path", help="shapes from a CEPE or Hugging Face config.json instead")
    g.add_argument("--cross-kv-heads", type=int, help="cross-attention key/value heads (grouped-query)")
    add_model_arguments(g, weights=False, device_default="cuda", dtype_default="bfloat16")
    g.add_argument("--compile-encoder", dest="encoder_compile", nargs="?", const="always", default="auto",
                   choices=("auto", "always", "never"),
                   help="torch.compile the context encoder: auto (the library's default: on CUDA from 64 "
                        "chunks up), always (the bare flag), never")
    g.add_argument("--sdpa", default="default", choices=("default", "flash", "cudnn", "efficient", "math"),
                   help="preferred scaled-dot-product-attention kernel")
    g = p.add_argument_group("what to measure")
    g.add_argument("--lengths", type=_lengths, default=DEFAULT_LENGTHS, help="total tokens, e.g. 4K,8K,128K")
    g.add_argument("--score-tokens", type=int, default=4096, help="D: tokens scored / decoder window")
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--methods", type=_names({"cepe", "full"}), default=("cepe", "full"))
    g.add_argument("--tasks", type=_names({"kernels", "score", "decode", "ttft"}),
                   default=("kernels", "score", "decode", "ttft"),
                   help="kernels: cross-attention alone under each SDPA kernel (CUDA only); "
                        "ttft: a 512-token question over a stored document")
    g.add_argument("--policies", type=_names(set(POLICIES)), default=DEFAULT_POLICIES,
                   help="cross-attention key/value policies, of: " + ", ".join(POLICIES))
    g.add_argument("--decode-mode", default="graph", choices=("graph", "eager", "compiled"),
                   help="decoding steps: CUDA graph replays, eager, or torch.compile'd then graphed")
    g.add_argument("--hf-lengths", type=_lengths, default=(), help="also time model.generate at these lengths")
    g.add_argument("--hf-policies", type=_names(set(POLICIES)), default=("recompute", "cache"))
    g.add_argument("--kv-budget-gb", type=_budget, default="free", help="`auto` budget: GB, 'free' or 'library'")
    g.add_argument("--reps", type=int, default=3)
    g.add_argument("--time-budget", dest="time_budget_s", type=float, help="stop starting measurements after N s")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI): seconds")
    p.add_argument("--out", help="folder for bench_<preset>.json and .png")


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces `args`: every option that differs from its default."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    defaults = vars(p.parse_args([]))
    parts = ["cepe bench"]
    for action in p._actions:
        key = action.dest
        if key == "help" or key not in vars(args) or vars(args)[key] == defaults.get(key):
            continue
        value = vars(args)[key]
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, tuple):
            parts.append(f"{flag} {','.join(_k(v) if isinstance(v, int) else str(v) for v in value)}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    fields = {k: v for k, v in vars(args).items() if k in BenchConfig.__dataclass_fields__}
    fields["command"] = command_line(args)
    if args.smoke:
        fields.update(SMOKE)
    if fields["score_tokens"] < 1 or fields["new_tokens"] < 2:
        raise ValueError("--score-tokens must be >= 1 and --new-tokens >= 2")
    return BenchConfig(**fields)


def run(args: argparse.Namespace) -> int:
    import torch

    from .report import summary

    cfg = config_from_args(args)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here (use --device cpu, or --smoke)")
    if args.smoke:  # tiny matrices: threads only add synchronisation
        torch.set_num_threads(1)
    result = run_bench(cfg)
    print(summary(result))
    if cfg.out:
        print(f"wrote {cfg.out}/bench_{result['model']['name']}.json and .png")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="long-context speed and memory: CEPE vs full attention",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m cepe.benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cepe bench: error: {e}", file=sys.stderr)
        return 2
