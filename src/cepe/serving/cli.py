"""`cepe serve`: load a CEPE model and serve it over HTTP (see docs/serving.md)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import sys
from pathlib import Path

from ..cli_options import add_model_arguments, model_choice, model_from_args, topk_flag
from ..model.loading import DEFAULT_DECODER

log = logging.getLogger("cepe.serving")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with an encode-once document store",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = add_model_arguments(p.add_argument_group("model"), default_adapter="released")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    m.add_argument("--cross-attn-topk", type=topk_flag, default=None, metavar="K|off",
                   help="each token reads its K best context tokens only: better retrieval in long contexts, "
                        "worse perplexity (default: the adapter's own setting)")
    m.add_argument("--model-name", default=None, help="id clients pass as `model` (None: from the adapter)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--store", default="~/.cache/cepe/store", help="document store folder")
    s.add_argument(
        "--store-budget-mb", type=float, default=1024.0, help="store size; least recently used documents go first"
    )
    s.add_argument("--store-format", default=None, choices=["int8", "fp8", "bfloat16", "float16", "float32"],
                   help="how new documents' encoder states are stored (default: the model's dtype); int8/fp8 halve "
                        "bf16's bytes for +0.04/+0.06%% perplexity on the released adapter (docs/benchmarks.md)")
    s.add_argument("--memory-cache-mb", type=float, default=1024.0,
                   help="recently used documents kept in memory with their cross-attention keys/values")
    s.add_argument("--max-queue", type=int, default=64,
                   help="waiting jobs (one per completion choice or upload) before new requests get 429")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument(
        "--batching",
        choices=["continuous", "static"],
        default="continuous",
        help="continuous: requests join and leave the running batch at every step; static: a batch runs to its end",
    )
    s.add_argument("--batch-memory-mb", type=float, default=4096.0,
                   help="continuous batching: most memory the running batch's decoder cache and contexts may hold")
    s.add_argument("--queue-context-mb", type=float, default=2048.0,
                   help="most memory the encoder states of requests waiting to join the batch may hold (raw contexts "
                        "encoded for them, stored documents they read); a request beyond it gets 429")
    s.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                   help="continuous batching: run each decoding step on bucketed static buffers, captured as a CUDA "
                        "graph and replayed (auto: on a CUDA device; on: also on the CPU, eagerly; off: eager steps)")
    s.add_argument("--encoder-compile", choices=["auto", "always", "never"], default="never",
                   help="torch.compile the context encoder (auto: on CUDA, for uploads of 64+ chunks; the first "
                        "such upload waits for the compilation, about a minute)")
    s.add_argument("--prefill-share", type=float, default=0.5,
                   help="continuous batching: most of the worker's time that prefilling joining requests may take "
                        "while rows decode (1: join at every step)")
    s.add_argument("--switch-interval-ms", type=float, default=0.1,
                   help="Python's thread switch interval in this process: the model worker waits up to this long "
                        "for the GIL after each operator while the HTTP thread is busy (Python's default: 5)")
    s.add_argument("--sdpa", choices=["auto", "decode-order"], default="auto",
                   help="attention kernels on a GPU: auto (PyTorch's choice; cross-attention decoding steps prefer "
                        "FlashAttention) or decode-order (FlashAttention first for every attention, cuDNN after "
                        "memory-efficient: no cuDNN plan per new key length)")
    s.add_argument("--worker", choices=["thread", "process"], default="thread",
                   help="where the model runs: a thread of the HTTP process, or a process of its own (no GIL shared "
                        "with the HTTP side; this process then keeps a CPU copy only to describe the model)")
    s.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    s.add_argument(
        "--max-context-tokens", type=int, default=65536, help="largest context (encoder tokens) per document or request"
    )
    s.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, queueing included")
    p.set_defaults(func=serve)


def load_model(args: argparse.Namespace):
    """The `CepeForCausalLM` the flags describe, with both tokenizers attached."""
    return model_from_args(args)


def worker_model(**flags):
    """The model of `--worker process`, built in the child process from the serve command's flags."""
    import torch

    args = argparse.Namespace(**flags)
    if args.threads:
        torch.set_num_threads(args.threads)
    return model_from_args(args)


def default_model_name(args: argparse.Namespace) -> str:
    c = model_choice(args)
    if c["adapter"] == "released":
        from ..release import RELEASED_NAME

        return RELEASED_NAME
    if c["adapter"] is not None:
        return Path(c["adapter"]).resolve().name
    enc = "decoder" if c["encoder"] == "decoder" else Path(c["encoder"]).name
    return f"cepe-{Path(c['decoder'] or DEFAULT_DECODER).name}-{enc}-{c['init']}"


def serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .app import API_KEY_ENV, ServeConfig, create_app
    from .metrics import setup_json_logging

    for flag in ("max_queue", "max_batch", "max_tokens", "max_context_tokens", "port", "timeout", "max_body_mb",
                 "batch_memory_mb", "queue_context_mb"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not 0 < args.prefill_share <= 1:
        raise ValueError(f"--prefill-share must be in (0, 1], got {args.prefill_share}")
    if args.switch_interval_ms <= 0:
        raise ValueError(f"--switch-interval-ms must be positive, got {args.switch_interval_ms}")
    setup_json_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    worker = {}
    if args.worker == "process":
        from ..cli_options import resolve_device

        flags = {k: v for k, v in vars(args).items() if not callable(v)}
        worker = {"worker": "process", "worker_factory": "cepe.serving.cli:worker_model",
                  "worker_factory_kwargs": flags}
        # this process's copy only describes the model (tokenizers, encoder hash, sizes): on the CPU, in
        # the dtype the child runs, so the store's byte counts match
        gpu = torch.device(resolve_device(args.device)).type != "cpu"
        args = argparse.Namespace(**{**flags, "device": "cpu", "dtype": args.dtype or ("bfloat16" if gpu else None)})
    config = ServeConfig(
        model_name=args.model_name or default_model_name(args),
        store_dir=args.store,
        store_budget_mb=args.store_budget_mb,
        memory_cache_mb=args.memory_cache_mb,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_tokens=args.max_tokens,
        max_context_tokens=args.max_context_tokens,
        max_body_mb=args.max_body_mb,
        timeout_s=args.timeout,
        batching=args.batching,
        batch_memory_mb=args.batch_memory_mb,
        queue_context_mb=args.queue_context_mb,
        cuda_graphs=args.cuda_graphs,
        prefill_share=args.prefill_share,
        encoder_compile=args.encoder_compile,
        cross_attn_topk=args.cross_attn_topk,
        store_format=args.store_format,
        **worker,
    )
    # every PyTorch operator releases the GIL and takes it back: with the default 5 ms interval, a busy
    # HTTP thread made an eager prefill ~300x slower (scripts/bench_gil_contention.py, docs/serving.md).
    # Set before the app is built (a process worker's child takes this process's interval then), after
    # the model loads (a model that fails to load leaves the caller's process as it was)
    model = load_model(args)
    sys.setswitchinterval(args.switch_interval_ms / 1e3)
    app = create_app(model, config)
    if not _is_loopback(args.host) and not config.api_key:
        log.warning(f"serving on {args.host} without an API key: set {API_KEY_ENV} to require one")
    from ..model.cross_attention import decode_kernels

    # the kernel order is process-wide: entered here, it holds for the model worker's thread too
    with decode_kernels() if args.sdpa == "decode-order" else contextlib.nullcontext():
        uvicorn.run(app, host=args.host, port=args.port, log_config=None, access_log=False)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
