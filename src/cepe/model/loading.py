"""Resolve model names and paths: asset names (`smollm2-135m`, `minilm-l6`), HF folders, GGUF files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .. import assets
from .encoder import HFEncoder, load_hf_encoder


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[dtype]


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
