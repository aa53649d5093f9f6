"""Argument types and the model, method and output flags that every `cepe eval` task shares."""

from __future__ import annotations

import argparse

from ..cli_options import add_model_arguments, topk_flag

DEFAULT_METHODS = {
    "ppl": "cepe,truncated,full,streamingllm,replug",
    "rag-lm": "cepe,truncated,full,replug",
    "qa": "cepe,truncated,full,replug",
    "icl": "cepe,truncated,full",
    "passkey": "cepe,truncated,full,streamingllm,replug",
    "ruler": "cepe,truncated,full,streamingllm,replug",
}


def ints(text: str) -> list[int]:
    try:
        return [size(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers (K suffix allowed), got {text!r}"
        ) from None


def size(t: str) -> int:
    """A token count: 4096, 4K (x 1,024) or 1M (x 1,048,576)."""
    t = t.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    return int(float(t[:-1]) * scale) if scale > 1 else int(t)


def floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_common(p: argparse.ArgumentParser, task: str) -> None:
    g = add_model_arguments(p.add_argument_group("model"), device_default="cuda" if cuda_available() else "cpu")
    g.add_argument("--length-scaling", default=None, metavar="L|off",
                   help="cross-attention length scaling for every CEPE model: logits x log(L)/log(n) beyond L context "
                        "tokens (default: the adapter's config)")
    g.add_argument("--cross-attn-topk", type=topk_flag, default=None, metavar="K|off",
                   help="every CEPE model attends, per decoder token, to its K highest-scoring context tokens only "
                        "(default: the adapter's config; off: full attention)")
    g.add_argument("--compare-adapter", action="append", default=[], metavar="NAME=DIR",
                   help="another adapter on the same decoder, run as method NAME (e.g. ceped=runs/distill/adapter); "
                        "repeatable")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--context-format", default=None, choices=["float32", "bfloat16", "float16", "int8", "fp8"],
                   help="CEPE reads its encoded context as stored in this format (default: as encoded)")
    g = p.add_argument_group("methods")
    g.add_argument("--methods", default=DEFAULT_METHODS[task],
                   help="comma-separated: cepe, truncated, full, full-linear, full-dynamic, full-yarn, streamingllm, "
                        f"replug (default {DEFAULT_METHODS[task]})")
    g.add_argument("--sinks", type=int, default=4, help="StreamingLLM attention sinks (default 4)")
    g.add_argument("--stream-window", type=int, default=None,
                   help="StreamingLLM cache: sinks + recent tokens (default: the decoder window D)")
    g.add_argument("--rope-factor", type=float, default=None,
                   help="RoPE scaling factor for full-<rope> (default: length / trained window, >= 1)")
    g.add_argument("--replug-weighting", choices=["uniform", "score"], default="uniform",
                   help="REPLUG mixture weights (score: softmax of retrieval scores)")
    g.add_argument("--batch-size", type=int, default=4, help="REPLUG passes per forward (default 4)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results/eval", help="folder for <name>.json and <name>.png (default results/eval)")
    g.add_argument("--name", default=task.replace("-", "_"),
                   help=f"result file stem (default {task.replace('-', '_')})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False
