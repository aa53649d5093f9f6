"""Model shapes to benchmark, and the one function that builds the real `CepeForCausalLM` from them.

Speed does not depend on weight values, so presets use the base models' shapes with random weights
(Hugging Face's own initialisation: normal(0, 0.02) matrices, unit norms; small and nonzero). The
model is built directly on the target device in the target dtype, so a 7B decoder needs no slow
float32 initialisation on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..model import CepeConfig, CepeForCausalLM
from ..model.encoder import ContextEncoder, DecoderDerivedEncoder, HFEncoder
from ..model.families import FAMILIES
from ..model.loading import DECODER_DERIVED, load_model

# encoder kinds: "bidirectional" = a LLaMA-style stack of its own width run bidirectionally over each
# chunk (the paper's encoder; the library's DecoderDerivedEncoder class built from its own config);
# "hf" = a Hugging Face encoder AutoModel (BERT, MiniLM); "decoder" = the library's decoder-derived
# encoder (first k decoder layers, shared embeddings).
ENCODER_KINDS = ("bidirectional", "hf", "decoder")


@dataclass
class ModelSpec:
    """Everything needed to build a CEPE model: decoder config, encoder config and CEPE settings."""

    name: str
    decoder: PretrainedConfig
    encoder: PretrainedConfig | None
    encoder_kind: str = "bidirectional"
    encoder_layers: int = 4  # only for encoder_kind="decoder"
    chunk_size: int = 256
    cross_attn_num_kv_heads: int | None = None
    notes: dict = field(default_factory=dict)

    def describe(self) -> dict:
        d, e = self.decoder, self.encoder
        out = {
            "name": self.name,
            "decoder": {
                k: getattr(d, k, None)
                for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                          "num_key_value_heads", "intermediate_size", "vocab_size")
            },
            "encoder_kind": self.encoder_kind,
            "chunk_size": self.chunk_size,
            "cross_attn_num_kv_heads": self.cross_attn_num_kv_heads,
        }
        if e is not None:
            out["encoder"] = {
                k: getattr(e, k, None)
                for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                          "vocab_size")
            }
        else:
            out["encoder"] = {"decoder_layers": self.encoder_layers}
        return out


def _llama(**kw) -> PretrainedConfig:
    theta = kw.pop("rope_theta", 10000.0)
    base = dict(hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": theta})
    base.update(kw)
    return AutoConfig.for_model("llama", **base)


def _paper_encoder(vocab: int) -> PretrainedConfig:
    # the paper's encoder shape: 24 layers, 1024 wide, 16 heads, LLaMA-style blocks, LLaMA vocabulary
    return _llama(vocab_size=vocab, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)


def _preset(name: str) -> ModelSpec:
    if name == "llama2-7b":
        dec = _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        # 8 cross-attention key/value heads (of 32 query heads): 4x less cached context per layer,
        # which is what lets the `cache` policy fit 128K context tokens on one 80 GB card
        return ModelSpec(name, dec, _paper_encoder(32000), "bidirectional", cross_attn_num_kv_heads=8)
    if name == "llama3-8b":
        dec = _llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001)
        return ModelSpec(name, dec, _paper_encoder(128256), "bidirectional")
    if name == "smollm2-135m":
        dec = _llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     tie_word_embeddings=True, rope_theta=100000.0)
        # paired with the MiniLM-L6 encoder shape, as in the library's released adapter
        enc = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                   num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512,
                                   pad_token_id=0)
        return ModelSpec(name, dec, enc, "hf")
    if name == "tiny":  # CPU smoke test: seconds, not minutes
        dec = _llama(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        enc = _llama(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return ModelSpec(name, dec, enc, "bidirectional", chunk_size=8, cross_attn_num_kv_heads=1)
    if name == "tiny-bert":
        dec = _llama(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        enc = AutoConfig.for_model("bert", vocab_size=80, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
        return ModelSpec(name, dec, enc, "hf", chunk_size=8)
    raise KeyError(name)


PRESETS = ("llama2-7b", "llama3-8b", "smollm2-135m", "tiny", "tiny-bert")


def get_spec(preset: str | None = None, config_path: str | None = None, cross_kv_heads: int | None = None,
             chunk_size: int | None = None, encoder_layers: int | None = None) -> ModelSpec:
    """A preset by name, or shapes from a config JSON (a CEPE adapter's `config.json`, or any Hugging
    Face decoder's `config.json`, which then gets the decoder-derived encoder)."""
    if config_path is not None:
        spec = spec_from_config(config_path, encoder_layers=encoder_layers)
    elif preset in PRESETS:
        spec = _preset(preset)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS} or pass --config PATH")
    if cross_kv_heads is not None:
        heads = spec.decoder.num_attention_heads
        if cross_kv_heads < 1 or heads % cross_kv_heads:
            raise ValueError(f"--cross-kv-heads {cross_kv_heads} must divide the {heads} query heads")
        spec.cross_attn_num_kv_heads = cross_kv_heads
    if chunk_size is not None:
        spec.chunk_size = chunk_size
    if encoder_layers is not None and spec.encoder_kind == "decoder":
        spec.encoder_layers = encoder_layers
    return spec


def spec_from_config(path: str, encoder_layers: int | None = None) -> ModelSpec:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such config file")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {p}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"--config {p}: expected a Hugging Face or CEPE config with a 'model_type'")
    if raw["model_type"] == "cepe":
        cfg = CepeConfig.from_dict(raw)
        if cfg.encoder_type == "decoder":
            return ModelSpec(p.stem, cfg.text_config, None, "decoder", encoder_layers=cfg.encoder_num_layers,
                             chunk_size=cfg.chunk_size, cross_attn_num_kv_heads=cfg.cross_attn_num_kv_heads)
        enc = cfg.encoder_config
        kind = "bidirectional" if enc.model_type in FAMILIES else "hf"
        return ModelSpec(p.stem, cfg.text_config, enc, kind, chunk_size=cfg.chunk_size,
                         cross_attn_num_kv_heads=cfg.cross_attn_num_kv_heads)
    raw = dict(raw)
    model_type = raw.pop("model_type")
    dec = AutoConfig.for_model(model_type, **raw)
    return ModelSpec(p.parent.name or p.stem, dec, None, "decoder", encoder_layers=encoder_layers or 4)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_encoder(spec: ModelSpec) -> ContextEncoder | None:
    """The context encoder module (random weights); None means the decoder-derived encoder."""
    if spec.encoder_kind == "decoder":
        return None
    cfg = copy.deepcopy(spec.encoder)
    cfg._attn_implementation = "sdpa"
    if spec.encoder_kind == "bidirectional":
        return DecoderDerivedEncoder(cfg, cfg.num_hidden_layers)
    if spec.encoder_kind == "hf":
        return HFEncoder.from_config(cfg)
    raise ValueError(f"encoder kind must be one of {ENCODER_KINDS}, got {spec.encoder_kind!r}")


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, kv_policy: str = "recompute") -> CepeForCausalLM:
    """The library's `CepeForCausalLM` with random weights, built in place on `device` in `dtype`.

    Goes through the library's one loader (`load_model`, `CepeForCausalLM.from_base`), exactly as a
    user wraps a decoder: the benchmark times this object, nothing re-implemented."""
    torch.manual_seed(seed)
    device = torch.device(device)
    with torch.device(device), _default_dtype(dtype):
        dec_cfg = copy.deepcopy(spec.decoder)
        dec_cfg._attn_implementation = "sdpa"
        decoder = AutoModelForCausalLM.from_config(dec_cfg).eval()
        encoder = build_encoder(spec)
        model = load_model(
            decoder, DECODER_DERIVED if encoder is None else encoder, init="copy", dtype=dtype, device=device,
            chunk_size=spec.chunk_size, cross_attn_num_kv_heads=spec.cross_attn_num_kv_heads,
            encoder_num_layers=spec.encoder_layers, kv_policy=kv_policy,
        )
    return model


def parameter_bytes(module: torch.nn.Module, exclude: torch.nn.Module | None = None) -> int:
    """Bytes of a module's parameters (shared tensors once), minus those that also live in `exclude`."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
