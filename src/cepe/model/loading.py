"""Load models: `load_model`, the one loader every entry point uses (training, evaluation, serving,
the demo, benchmarks), and the parts it is made of: names and paths resolved (asset names like
`smollm2-135m` / `minilm-l6`, HF folders, GGUF files), decoders, encoders, tokenizers.

One spelling for each choice (older ones still work for one release, with a FutureWarning):
the decoder-derived encoder is `encoder="decoder"`; an untrained model is `init="zero" | "copy"`
without an adapter; dtypes are torch's names `float32 | bfloat16 | float16`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .. import assets
from .encoder import HFEncoder, load_hf_encoder

DEFAULT_DECODER = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"
DECODER_DERIVED = "decoder"  # encoder= spelling of the decoder-derived encoder (first layers, bidirectional)
INITS = ("zero", "copy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OLD_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_OLD_DECODER_DERIVED = ("none", "null", "None", "")


def deprecated(old: str, new: str) -> None:
    """Warn that spelling `old` is deprecated (kept for one release) in favour of `new`."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use {new}", FutureWarning,
                  stacklevel=3)


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """The canonical name (`float32` | `bfloat16` | `float16`) of a dtype, a name or an old
    short name (`fp32` | `bf16` | `fp16`: deprecated); None stays None (as stored)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return names[dtype]
    if dtype in _OLD_DTYPES:
        deprecated(f"dtype {dtype!r}", repr(_OLD_DTYPES[dtype]))
        return _OLD_DTYPES[dtype]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    name = dtype_name(dtype)
    return None if name is None else DTYPES[name]


def encoder_name(encoder: Any) -> Any:
    """`encoder` with the old spellings of the decoder-derived encoder (`none`, `null`, `None`,
    "": deprecated) turned into `"decoder"`; anything else unchanged (None included)."""
    if isinstance(encoder, str) and encoder in _OLD_DECODER_DERIVED:
        deprecated(f"encoder {encoder!r}", f"{DECODER_DERIVED!r} for the decoder-derived encoder")
        return DECODER_DERIVED
    return encoder


def adapter_and_init(adapter: str | os.PathLike | None, init: str | None) -> tuple[str | None, str | None]:
    """One spelling of "which weights": a trained `adapter`, or `init` (zero | copy) for an untrained
    model. Old spellings: adapter `none` (+ init, zero by default) and adapter `zero`."""
    if adapter is not None and str(adapter) in ("none", "zero"):
        if str(adapter) == "zero":
            deprecated("adapter 'zero'", "init='zero' (--init zero) without an adapter")
            if init not in (None, "zero"):
                raise ValueError(f"adapter 'zero' contradicts init {init!r}")
            init = "zero"
        else:
            deprecated("adapter 'none'", "init='zero' | 'copy' (--init) without an adapter")
            init = init or "zero"
        adapter = None
    if adapter is not None and init is not None:
        raise ValueError("give either an adapter (trained weights) or init (an untrained model), not both")
    if adapter is None and init is None:
        raise ValueError("nothing to load: give an adapter (a folder or 'released') or init ('zero' | 'copy')")
    if init is not None and init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return (None if adapter is None else str(adapter)), init


def load_model(
    decoder: str | nn.Module | None = None,
    encoder: str | nn.Module | None = None,
    adapter: str | os.PathLike | None = None,
    init: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **options: Any,
):
    """A `CepeForCausalLM`, in eval mode: a trained `adapter` (a folder, or `released`) on `decoder`
    (default: the decoder the adapter records), or an untrained model with `init` (`zero`: exactly
    the base decoder; `copy`: cross-attention copied from self-attention) on `decoder` (default
    SmolLM2-135M) and `encoder` (an asset name, a folder, a module, or `"decoder"` for the
    decoder-derived encoder; with an adapter, None means the encoder it records).

    `dtype` (None: as stored) is the whole model's; `device` None leaves it where it was built.
    `options` go to `CepeForCausalLM.from_base` (chunk_size, encoder_num_layers, cross_attn_layers,
    ..., tokenizer) or, with an adapter, to `from_pretrained` (run-time settings like kv_policy)."""
    from .modeling import CepeForCausalLM

    adapter, init = adapter_and_init(adapter, init)
    torch_dtype = _dtype(dtype)
    legacy = isinstance(encoder, str) and encoder in _OLD_DECODER_DERIVED
    encoder = encoder_name(encoder)
    if adapter is not None:
        if encoder == DECODER_DERIVED:
            from .configuration import CepeConfig

            kind = CepeConfig.from_pretrained(str(resolve_adapter(adapter))).encoder_type
            if kind != DECODER_DERIVED and not legacy:  # the old `none` meant "the adapter's own"
                raise ValueError(f"adapter {adapter} was trained with an HF encoder, not the decoder-derived one")
            encoder = None
        model = CepeForCausalLM.from_pretrained(adapter, decoder=decoder, encoder=encoder, dtype=torch_dtype, **options)
    else:
        if encoder is None:
            deprecated("encoder=None (YAML null) for the decoder-derived encoder", f"encoder={DECODER_DERIVED!r}")
            encoder = DECODER_DERIVED
        model = CepeForCausalLM.from_base(decoder if decoder is not None else DEFAULT_DECODER,
                                          None if encoder == DECODER_DERIVED else encoder,
                                          cross_attn_init=init, dtype=torch_dtype, **options)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def resolve_path(name_or_path: str) -> Path:
    """An asset name -> its installed folder; anything else is taken as a local path."""
    if assets.canonical(name_or_path) is not None and not os.path.exists(name_or_path):
        return assets.locate(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a local path nor a known asset ({sorted(assets.ASSETS)}); "
            "no model hub is used"
        )
    return path


def load_decoder(name_or_path: str, gguf_file: str | None = None, dtype=None) -> tuple[Any, Any]:
    """Load a `*ForCausalLM` and its tokenizer from an asset name, a folder, or a GGUF file."""
    path = resolve_path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if _dtype(dtype) is not None:
        kwargs["dtype"] = _dtype(dtype)
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if gguf_file:
        model.hf_quantizer = None
    model.name_or_path = str(name_or_path)
    try:
        tok = load_tokenizer(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok


def unbounded(tokenizer: Any) -> Any:
    """Lift the tokenizer's length warning/limit: documents are tokenized whole, then cut into
    windows or chunks by the caller, so the model's position limit applies per window or chunk."""
    tokenizer.model_max_length = 10**12
    return tokenizer


def load_tokenizer(path: str | os.PathLike, **kwargs) -> Any:
    """`AutoTokenizer.from_pretrained`, unbounded (see `unbounded`)."""
    return unbounded(AutoTokenizer.from_pretrained(str(path), **kwargs))


def load_encoder(name_or_path: str, tokenizer_only: bool = False, dtype=None) -> tuple[HFEncoder | None, Any]:
    path = resolve_path(name_or_path)
    tok = load_tokenizer(path)
    if tokenizer_only:
        return None, tok
    AutoConfig.from_pretrained(str(path))  # fails clearly on a folder that is no HF model
    with _quiet():
        return load_hf_encoder(str(path), _dtype(dtype)), tok


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """An adapter folder; `cepe-smollm2` names the adapter released in this repository."""
    if str(name_or_path) in ("cepe-smollm2", "released"):
        from ..release import released_adapter_path

        return released_adapter_path()
    return Path(name_or_path)


class _quiet:
    """Silence transformers' load reports (e.g. an encoder's unused pooler) for the duration."""

    def __enter__(self):
        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        hf_logging.set_verbosity(self.level)
        hf_logging.enable_progress_bar()
