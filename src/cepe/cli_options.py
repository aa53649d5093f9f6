"""The model flags that `cepe eval`, `cepe serve`, `cepe demo` and `cepe bench` share, and the model
they describe (through `cepe.model.loading.load_model`, the one loader).

    --decoder NAME|DIR|GGUF     base decoder (default smollm2-135m, or the one the adapter records)
    --encoder NAME|DIR|decoder  context encoder of an --init model (default minilm-l6); `decoder`:
                                the decoder-derived encoder; with --adapter, the adapter's own
    --adapter DIR|released      trained adapter weights  } one or the other; a command may default
    --init zero|copy            an untrained model       } to an adapter (serve, demo: released)
    --chunk-size N --encoder-layers N                    shapes of an --init model
    --dtype float32|bfloat16|float16 --device cpu|cuda|cuda:1 ...

Old spellings (`--adapter none`, `--adapter zero`, `--encoder none`, `--dtype bf16`...) still work for
one release, with a FutureWarning naming the new one.
"""

from __future__ import annotations

import argparse
from typing import Any

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def dtype_arg(text: str) -> str:
    """argparse type of --dtype: the canonical name (old short names accepted, with a warning)."""
    from .model.loading import dtype_name

    try:
        return dtype_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPE_CHOICES)}, got {text!r}") from None


def topk_flag(text: str) -> int | str:
    """argparse type of --cross-attn-topk (eval, serve): "off" or a positive number of keys."""
    if text.lower() == "off":
        return "off"
    from .model.configuration import topk_keys

    try:
        return topk_keys(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of keys or 'off', got {text!r}") from None


def add_model_arguments(
    parser: argparse.ArgumentParser | Any,
    *,
    weights: bool = True,
    default_adapter: str | None = None,
    device_default: str | None = None,
    dtype_default: str | None = None,
) -> Any:
    """Add the shared model flags to `parser` (a parser or an argument group, returned).
    `weights=False` adds only --dtype and --device (bench builds its shapes from presets)."""
    g = parser
    if weights:
        g.add_argument("--decoder", default=None, help="base decoder: asset name, folder or GGUF file "
                                                       "(default smollm2-135m, or the one --adapter records)")
        g.add_argument("--encoder", default=None,
                       help="context encoder of an --init model: asset name, folder, or 'decoder' (decoder-derived); "
                            "default minilm-l6 (with --adapter: the adapter's own)")
        g.add_argument("--adapter", default=None,
                       help="trained CEPE adapter folder, or 'released'"
                            + (f" (default {default_adapter} unless --init)" if default_adapter else ""))
        g.add_argument("--init", default=None, choices=["zero", "copy"],
                       help="an untrained CEPE model instead of --adapter (zero: exactly the base decoder)")
        g.add_argument("--chunk-size", type=int, default=256, help="encoder chunk size of an --init model")
        g.add_argument("--encoder-layers", type=int, default=4, help="decoder-derived encoder depth of an --init model")
        g.set_defaults(default_adapter=default_adapter)
    g.add_argument("--dtype", type=dtype_arg, default=dtype_default, metavar="{" + ",".join(DTYPE_CHOICES) + "}",
                   help="weights dtype" + ("" if dtype_default else " (default: as stored)"))
    g.add_argument("--device", default=device_default,
                   help="cpu, cuda, cuda:1 ..." + ("" if device_default else " (default: cuda when available)"))
    return g


def model_choice(args: argparse.Namespace) -> dict[str, Any]:
    """What the flags ask for, old spellings turned into the new ones and defaults applied:
    {decoder, encoder, adapter, init, dtype, chunk_size, encoder_layers}; adapter and init both
    None (eval without either) means the base decoder alone."""
    from .model.loading import DEFAULT_ENCODER, adapter_and_init, encoder_name

    adapter, init = args.adapter, args.init
    if adapter is None and init is None:
        adapter = getattr(args, "default_adapter", None)
    if adapter is not None or init is not None:
        adapter, init = adapter_and_init(adapter, init)
    encoder = encoder_name(args.encoder)
    if adapter is not None and encoder == "decoder" and args.encoder != "decoder":
        encoder = None  # the old `--encoder none` beside an adapter meant "the adapter's own"
    if adapter is None and encoder is None:
        encoder = DEFAULT_ENCODER
    return {"decoder": args.decoder, "encoder": encoder, "adapter": adapter, "init": init, "dtype": args.dtype,
            "chunk_size": args.chunk_size, "encoder_layers": args.encoder_layers}


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_from_args(args: argparse.Namespace, **options: Any):
    """The `CepeForCausalLM` the shared flags describe, in eval mode on --device (`options`: more
    keywords for `load_model`)."""
    from .model.loading import load_model

    c = model_choice(args)
    if c["adapter"] is None and c["init"] is None:
        raise ValueError("give --adapter DIR|released or --init zero|copy")
    if c["init"] is not None:
        options = {"chunk_size": c["chunk_size"], "encoder_num_layers": c["encoder_layers"], **options}
    device = resolve_device(args.device)
    return load_model(c["decoder"], c["encoder"], c["adapter"], c["init"], c["dtype"], device, **options)
