"""Adapter files: what `save_pretrained` writes and `from_pretrained` reads (config, safetensors
sharded above a size, the encoder tokenizer), the checks on them, and the weight hashes that tie an
adapter to the base models it was trained on."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .configuration import RUNTIME_SETTINGS, CepeConfig, apply_runtime_settings
from .encoder import ContextEncoder, HFEncoder
from .stored_states import QuantizedStates, quantize_states

if TYPE_CHECKING:
    from .modeling import CepeForCausalLM

ADAPTER_FILE = "model.safetensors"
ADAPTER_INDEX = "model.safetensors.index.json"
ENCODER_TOKENIZER_DIR = "encoder_tokenizer"
# how `save_pretrained` writes weight matrices: as floats (in its `dtype`), or as int8 with one float32
# scale per output row under `<name>` + INT8_SCALE_SUFFIX (norms and other vectors stay floats)
WEIGHT_FORMATS = ("float", "int8")
INT8_SCALE_SUFFIX = ".int8_scale"

# what `AutoModelForCausalLM.from_pretrained` forwards for the Hub; a local adapter folder ignores it
_HUB_KWARGS = {
    "revision",
    "trust_remote_code",
    "adapter_kwargs",
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "proxies",
    "subfolder",
    "code_revision",
    "_from_auto",
    "_commit_hash",
}


def save_adapter(
    model: CepeForCausalLM,
    save_directory: str | os.PathLike,
    max_shard_size: int = 16 * 2**20,
    dtype: torch.dtype | None = None,
    weight_format: str = "float",
) -> None:
    """Write config, adapter weights (safetensors, sharded above `max_shard_size` bytes) and
    the encoder tokenizer. The base decoder's weights are never written. `weight_format="int8"`
    stores each weight matrix in 8 bits a value (`quantize_weights`): half of bf16's bytes."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in saved_tensors(model).items()
    }
    if weight_format == "int8":
        sd = quantize_weights(sd)
    model.config.base_encoder_fingerprint = frozen_encoder_weights_hash(model)
    write_tensors(
        out, sd, {"format": "pt", "cepe_base_fingerprint": model.config.base_fingerprint or "",
                  "cepe_weight_format": weight_format}, max_shard_size
    )
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    if model.encoder_tokenizer is not None and model.config.encoder_type == "hf":
        model.encoder_tokenizer.save_pretrained(out / ENCODER_TOKENIZER_DIR)


def load_pretrained(cls: type[CepeForCausalLM], pretrained_model_name_or_path: str | os.PathLike, *,
                    decoder: nn.Module | str | None = None, encoder: nn.Module | str | None = None,
                    dtype: torch.dtype | str | None = None, gguf_file: str | None = None, tokenizer: Any = None,
                    check_base: bool = True, **kwargs) -> CepeForCausalLM:
    """`CepeForCausalLM.from_pretrained`: an adapter folder onto its base decoder."""
    from .loading import load_decoder, load_encoder, load_tokenizer, resolve_adapter

    folder = resolve_adapter(pretrained_model_name_or_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a CEPE adapter folder)")
    given = kwargs.pop("config", None)  # `AutoModelForCausalLM.from_pretrained` passes the config it read
    for key in _HUB_KWARGS & set(kwargs):  # Hub download options: nothing to fetch from a local folder
        kwargs.pop(key)
    if isinstance(given, CepeConfig):
        config = given
        apply_runtime_settings(config, {k: getattr(config, k) for k in RUNTIME_SETTINGS})  # as validated
    else:
        config = CepeConfig.from_pretrained(str(folder))
    apply_runtime_settings(config, kwargs)
    if decoder is None:
        decoder = config.base_decoder
        if decoder is None:
            raise ValueError("no decoder given and the adapter records none: pass decoder=")
    if isinstance(decoder, (str, os.PathLike)):
        decoder, tok = load_decoder(str(decoder), gguf_file=gguf_file, dtype=dtype)
        tokenizer = tokenizer or tok
    if check_base and config.base_fingerprint and sampled_weights_hash(decoder) != config.base_fingerprint:
        raise ValueError(
            f"{folder}: adapter was trained on another base decoder (fingerprint {config.base_fingerprint}, "
            f"given {sampled_weights_hash(decoder)}); pass check_base=False to override"
        )
    enc_module, enc_tok = None, None
    if config.encoder_type == "hf":
        if encoder is None and config.encoder_frozen:
            if not config.base_encoder:
                raise ValueError("adapter keeps base-encoder weights frozen and unsaved: pass encoder=")
            encoder = config.base_encoder
        if isinstance(encoder, (str, os.PathLike)):
            enc_module, enc_tok = load_encoder(str(encoder))
        elif encoder is not None:
            enc_module = encoder if isinstance(encoder, ContextEncoder) else HFEncoder(encoder)
        tok_dir = folder / ENCODER_TOKENIZER_DIR
        if tok_dir.is_dir():
            enc_tok = load_tokenizer(tok_dir)
        elif enc_tok is None and config.base_encoder:
            _, enc_tok = load_encoder(config.base_encoder, tokenizer_only=True)
    else:
        if encoder is not None:  # it would be ignored: say so rather than run another model than asked
            given = encoder if isinstance(encoder, (str, os.PathLike)) else type(encoder).__name__
            raise ValueError(f"{folder}: the adapter reads context through its own decoder-derived encoder; "
                             f"encoder={given!r} cannot replace it (leave encoder unset)")
        enc_tok = tokenizer
    model = cls(config, decoder=decoder, encoder=enc_module, encoder_tokenizer=enc_tok, tokenizer=tokenizer)
    model.load_adapter_weights(folder)
    return model


def load_adapter_weights(model: CepeForCausalLM, folder: str | os.PathLike,
                         fresh: Callable[[str], bool] | None = None) -> None:
    """Copy an adapter folder's tensors into `model` (checked: names, shapes, frozen base).
    `fresh(name)` true: the folder may lack that tensor, which then keeps the model's own values
    (a run that adds cross-attention layers to a saved adapter)."""
    folder = Path(folder)
    loaded = read_tensors(folder)
    expected = saved_tensors(model)
    if fresh is not None:
        expected = {k: v for k, v in expected.items() if k in loaded or not fresh(k)}
    if model.config.encoder_frozen and getattr(model.config, "base_encoder_fingerprint", None):
        if frozen_encoder_weights_hash(model) != model.config.base_encoder_fingerprint:
            raise ValueError(
                f"{folder}: the frozen encoder weights ({model.config.encoder_frozen}) differ from the base encoder "
                "the adapter was trained with: pass encoder= the same base encoder"
            )
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{folder}: adapter does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    with torch.no_grad():
        for k, t in expected.items():
            if t.shape != loaded[k].shape:
                raise ValueError(f"{folder}: {k} has shape {tuple(loaded[k].shape)}, model expects {tuple(t.shape)}")
            t.copy_(loaded[k].to(dtype=t.dtype, device=t.device))


def saved_tensors(model: CepeForCausalLM) -> dict[str, torch.Tensor]:
    """The adapter tensors `save_pretrained` writes: frozen encoder weights come from the base."""
    frozen = {f"encoder.{n}" for n, p in model.encoder.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.adapter_state_dict().items() if k not in frozen}


def frozen_encoder_weights_hash(model: CepeForCausalLM) -> str | None:
    frozen = [(n, p) for n, p in model.encoder.named_parameters() if not p.requires_grad]
    return _named_tensors_hash(frozen) if frozen else None


def write_tensors(out: Path, sd: dict[str, torch.Tensor], meta: dict[str, str], max_shard_size: int) -> None:
    """`sd` into `out/model.safetensors`, or shards plus an index above `max_shard_size` bytes
    (earlier weight files in `out` removed first)."""
    for old in list(out.glob("model*.safetensors")) + [out / ADAPTER_INDEX]:
        if old.exists():
            old.unlink()
    shards, current, size = [], {}, 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k] = sd[k]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / ADAPTER_FILE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / ADAPTER_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def _weight_files(folder: Path) -> list[Path]:
    """An adapter folder's safetensors files: the shards its index lists, or the one file."""
    index = folder / ADAPTER_INDEX
    if not index.is_file():
        return [folder / ADAPTER_FILE]
    try:
        return [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{index}: corrupted shard index ({e})") from e


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an adapter folder (one file, or the shards its index lists), on CPU."""
    loaded: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: adapter weight file missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    loaded[k] = f.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: corrupted or unreadable safetensors file ({e})") from e
    try:
        return dequantize_weights(loaded)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e


def quantize_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight matrices (out, in) -> int8 plus a float32 scale per output row, max |w| of the row / 127
    (`quantize_states`' symmetric rounding, its per-token scale being per row here: rows of one
    projection differ in range); vectors stay as given."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.dim() == 2:
            q = quantize_states(v, "int8")
            out[k] = q.data.contiguous()
            out[k + INT8_SCALE_SUFFIX] = q.scale.squeeze(1).contiguous()
        else:
            out[k] = v
    return out


def dequantize_weights(loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_weights` (float32 matrices); float tensors pass through unchanged."""
    out = {k: v for k, v in loaded.items() if not k.endswith(INT8_SCALE_SUFFIX)}
    for k in loaded:
        if k.endswith(INT8_SCALE_SUFFIX):
            name = k[: -len(INT8_SCALE_SUFFIX)]
            q, scale = out.get(name), loaded[k]
            if q is None or q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
                raise ValueError(f"{k}: an int8 scale without a matching int8 matrix {name}")
            out[name] = QuantizedStates(q, scale.float()[:, None], "int8", torch.float32).dequantize()
    stray = [k for k, v in out.items() if v.dtype == torch.int8]
    if stray:
        raise ValueError(f"int8 tensors without their scales: {stray[:5]}")
    return out


def _named_tensors_hash(params: list[tuple[str, torch.Tensor]]) -> str:
    """Fingerprint of a list of named tensors (e.g. the frozen part of an encoder)."""
    return _hash_tensors([(f"p{i}", p) for i, (_, p) in enumerate(params)], extra=",".join(n for n, _ in params))


def sampled_weights_hash(module: nn.Module, extra: str = "") -> str:
    """A cheap, dtype-independent hash of a module's weights: shapes plus a strided sample of
    values rounded to bfloat16 (so fp32 and bf16 loads of the same checkpoint agree)."""
    seen, named = set(), []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:  # a tied or shared tensor counts once
            seen.add(id(p))
            named.append((name, p))
    return _hash_tensors(named, extra)


def _hash_tensors(named: list[tuple[str, torch.Tensor]], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for name, p in named:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].float().to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


weights_fingerprint = sampled_weights_hash  # the old name, still exported


# config keys two adapters of one architecture may differ in: run-time settings (an adapter saved
# before a setting existed has no key for it), and the base configs as each transformers version
# writes them (the bases themselves are pinned by base_fingerprint / base_encoder_fingerprint)
_NOT_ARCHITECTURE = frozenset(RUNTIME_SETTINGS) | {"transformers_version", "text_config", "encoder_config"}


def average_adapters(folders: list[str | os.PathLike], out: str | os.PathLike, weights: list[float] | None = None,
                     max_shard_size: int = 16 * 2**20) -> Path:
    """A weighted average of adapters of one architecture (a "model soup": stages trained from one
    another, whose strengths differ, averaged weight by weight). The configs must agree; tensors are
    averaged in float32 and stored in the first adapter's float dtype (int8 files are read back to
    floats first); config, tokenizer and safetensors metadata come from the first adapter."""
    if len(folders) < 2:
        raise ValueError("average_adapters needs at least two adapters")
    weights = [1.0 / len(folders)] * len(folders) if weights is None else list(weights)
    if len(weights) != len(folders) or any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"weights must be {len(folders)} non-negative numbers summing to 1, got {weights}")
    paths = [Path(f) for f in folders]
    configs = [json.loads((p / "config.json").read_text()) for p in paths]
    for p, c in zip(paths[1:], configs[1:]):
        diff = sorted(k for k in (set(c) | set(configs[0])) - _NOT_ARCHITECTURE if c.get(k) != configs[0].get(k))
        if diff:
            raise ValueError(f"{p}: config differs from {paths[0]} in {diff}: adapters of one architecture only")
    states = [read_tensors(p) for p in paths]
    for p, sd in zip(paths[1:], states[1:]):
        if sd.keys() != states[0].keys() or any(sd[k].shape != states[0][k].shape for k in sd):
            raise ValueError(f"{p}: tensors differ in names or shapes from {paths[0]}")
    floats: list[str] = []  # the first adapter's stored float dtypes (headers only)
    meta: dict[str, str] = {}
    for i, path in enumerate(_weight_files(paths[0])):
        with safe_open(str(path), framework="pt") as f:
            if i == 0:
                meta = dict(f.metadata() or {})
            # an int8 file's float32 row scales do not tell the dtype; its norms do
            floats += [f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(INT8_SCALE_SUFFIX)]
    floats = [d for d in floats if d in ("BF16", "F16", "F32")]
    store_dtype = {"BF16": torch.bfloat16, "F16": torch.float16}.get(floats[0] if floats else "", torch.float32)
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            avg[k] = sum(w * sd[k].float() for w, sd in zip(weights, states)).to(store_dtype).contiguous()
        else:
            avg[k] = v
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    meta["cepe_weight_format"] = "float"
    write_tensors(dst, avg, meta, max_shard_size)
    (dst / "config.json").write_text(json.dumps(configs[0], indent=2) + "\n")
    tok = paths[0] / ENCODER_TOKENIZER_DIR
    if tok.is_dir():
        shutil.copytree(tok, dst / ENCODER_TOKENIZER_DIR, dirs_exist_ok=True)
    return dst
