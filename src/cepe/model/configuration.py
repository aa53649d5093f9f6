"""`CepeConfig`: one config for the decoder, the context encoder and the cross-attention between them."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

CROSS_ATTN_INITS = ("copy", "zero")
KV_POLICIES = ("recompute", "cache", "absorbed", "auto")
ABSORBED_STATES = ("native", "fp8", "fp8-compiled")
ENCODER_TYPES = ("hf", "decoder")
ENCODER_COMPILE = ("auto", "always", "never")


def length_scaling(value: Any) -> int | None:
    """A valid `cross_attn_length_scaling`: None (off) or a context length L >= 2, as int."""
    if value is None:
        return None
    if int(value) < 2:
        raise ValueError(f"cross_attn_length_scaling must be None or a context length >= 2, got {value}")
    return int(value)


def _positive_or_none(value: Any, setting: str, unit: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or int(value) < 1:
        raise ValueError(f"{setting} must be None or a positive number of {unit}, got {value!r}")
    return int(value)


def topk_keys(value: Any) -> int | None:
    """A valid `cross_attn_topk`: None (full attention) or a positive number of keys, as int."""
    return _positive_or_none(value, "cross_attn_topk", "keys")


def chunks_per_pass(value: Any) -> int | None:
    """A valid `encoder_chunks_per_pass`: None (all chunks at once) or a positive int."""
    return _positive_or_none(value, "encoder_chunks_per_pass", "chunks")


# settings that change how a trained adapter runs, not what was trained: `from_pretrained` may override them
RUNTIME_SETTINGS = ("kv_policy", "kv_cache_budget_bytes", "cross_attn_length_scaling", "cross_attn_topk",
                    "encoder_chunks_per_pass", "absorbed_states", "encoder_compile")


def apply_runtime_settings(config: CepeConfig, overrides: dict[str, Any]) -> None:
    """Set `RUNTIME_SETTINGS` from `overrides` on a loaded config, each validated as the
    constructor would; any other key is refused (a misspelt setting must not pass silently)."""
    unknown = sorted(set(overrides) - set(RUNTIME_SETTINGS))
    if unknown:
        raise TypeError(
            f"unknown keyword(s) {unknown}; settings a loaded adapter can override: {list(RUNTIME_SETTINGS)}"
        )
    for key, value in overrides.items():
        if key == "kv_policy" and value not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {value!r}")
        if key == "absorbed_states" and value not in ABSORBED_STATES:
            raise ValueError(f"absorbed_states must be one of {ABSORBED_STATES}, got {value!r}")
        if key == "encoder_compile" and value not in ENCODER_COMPILE:
            raise ValueError(f"encoder_compile must be one of {ENCODER_COMPILE}, got {value!r}")
        if key == "kv_cache_budget_bytes" and (isinstance(value, bool) or int(value) < 0):
            raise ValueError(f"kv_cache_budget_bytes must be a number of bytes >= 0, got {value!r}")
        value = {
            "cross_attn_length_scaling": length_scaling,
            "cross_attn_topk": topk_keys,
            "encoder_chunks_per_pass": chunks_per_pass,
            "kv_cache_budget_bytes": int,
        }.get(key, lambda v: v)(value)
        setattr(config, key, value)


def _as_config(value: Any) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError("a nested config dict needs a 'model_type'")
        return AutoConfig.for_model(model_type, **value)
    raise TypeError(f"expected a config or a dict, got {type(value).__name__}")


class CepeConfig(PretrainedConfig):
    r"""Configuration of a CEPE model (Yen, Gao, Chen 2024).

    Args:
        text_config: config of the frozen decoder (any supported `*ForCausalLM`).
        encoder_config: config of the Hugging Face context encoder (`encoder_type="hf"`); `None` for
            the decoder-derived encoder.
        encoder_type: `"hf"` (a bidirectional `AutoModel`, e.g. BERT/MiniLM) or `"decoder"` (the
            first `encoder_num_layers` decoder layers run bidirectionally, sharing its embeddings).
        encoder_num_layers: depth of the decoder-derived encoder.
        chunk_size: content tokens per context chunk; each chunk is encoded independently.
        cross_attn_layers: decoder layers that get a cross-attention block: `"all"`, `"every:k"`,
            `"last:n"`, or a list of layer indices.
        cross_attn_num_kv_heads: key/value heads of cross-attention (grouped-query); `None` takes
            the decoder's self-attention value.
        cross_attn_init: `"copy"` (from the layer's self-attention, as in the paper) or `"zero"`
            (output projection zero: the model starts exactly as the base decoder).
        kv_policy: cross-attention keys/values during generation: `"recompute"` every step (the
            paper), `"cache"` once per call, `"absorbed"` (none kept: decoding steps attend over the
            encoder states with the key/value projections absorbed into query and output: He values
            per context token for all layers instead of 2 x Hkv x d per layer; `cepe.model.absorbed`), or `"auto"`
            (cache when it fits `kv_cache_budget_bytes`, else absorbed).
        absorbed_states: what `absorbed` decoding reads: `"native"` (the encoder states as they are),
            `"fp8"` (a copy in e4m3 with a scale per token, in the two layouts fp8 tensor-core matmuls
            need, made once per context: `cepe.model.absorbed_fp8`; needs He a multiple of 16), or
            `"fp8-compiled"` (the same, the passes between the two matmuls under `torch.compile`).
        cross_attn_length_scaling: `None` (off) or the context length L (tokens) the adapter was
            trained on: a row with n > L real context tokens has its cross-attention logits multiplied
            by log(L) / log(n), so attention spreads over a longer context as it did over L tokens
            instead of sharpening onto a few of them (measured in docs/results.md; no retraining).
            Not applied under `cross_attn_topk` (`applied_length_scaling`).
        cross_attn_topk: `None` (full attention) or k: each decoder token attends to its k
            highest-scoring context tokens only, so a fact in one chunk does not fade among the
            other chunks as the context grows (`cross_attention.topk_attention`; no retraining). With
            it, `absorbed` decoding projects the keys per call instead.
        encoder_chunks_per_pass: at most this many chunks go through the encoder in one forward
            pass (`None`: all at once). Chunks are independent, so this bounds peak memory without
            changing the result (1,024 by default: 256K tokens at 256). Measured on an H200 with
            SmolLM2's 4-layer encoder, 1,280 chunks: 5.1 GiB peak at once, 1.9 GiB in slices of 256.
        encoder_compile: `"auto"` (the encoder runs under `torch.compile` on CUDA, for inference, in
            passes of at least 64 chunks: where the one-time compilation pays), `"always"` or `"never"`
            (`cepe.model.encoder_compile`). The states are the same either way, up to float rounding.
        encoder_frozen: `None`, `"embeddings"` or `"all"`: encoder parts kept frozen in training; they
            are not saved with the adapter and load from the base encoder.
        base_fingerprint: hash of the base decoder's weights this adapter was trained on.
        base_encoder_fingerprint: hash of the frozen base-encoder weights (when some are frozen).
        base_decoder / base_encoder: where the base models came from (provenance, for loading).
    """

    model_type = "cepe"
    sub_configs = {"text_config": AutoConfig, "encoder_config": AutoConfig}

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        encoder_config: PretrainedConfig | dict | None = None,
        encoder_type: str = "hf",
        encoder_num_layers: int = 4,
        chunk_size: int = 256,
        cross_attn_layers: str | list[int] = "all",
        cross_attn_num_kv_heads: int | None = None,
        cross_attn_init: str = "copy",
        kv_policy: str = "recompute",
        kv_cache_budget_bytes: int = 8 * 2**30,
        cross_attn_length_scaling: int | None = None,
        cross_attn_topk: int | None = None,
        encoder_chunks_per_pass: int | None = 1024,
        absorbed_states: str = "native",
        encoder_compile: str = "auto",
        encoder_frozen: str | None = None,
        base_fingerprint: str | None = None,
        base_encoder_fingerprint: str | None = None,
        base_decoder: str | None = None,
        base_encoder: str | None = None,
        **kwargs,
    ):
        self.text_config = _as_config(text_config)
        self.encoder_config = _as_config(encoder_config)
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {encoder_type!r}")
        if cross_attn_init not in CROSS_ATTN_INITS:
            raise ValueError(f"cross_attn_init must be one of {CROSS_ATTN_INITS}, got {cross_attn_init!r}")
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
        if absorbed_states not in ABSORBED_STATES:
            raise ValueError(f"absorbed_states must be one of {ABSORBED_STATES}, got {absorbed_states!r}")
        if encoder_compile not in ENCODER_COMPILE:
            raise ValueError(f"encoder_compile must be one of {ENCODER_COMPILE}, got {encoder_compile!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.encoder_type = encoder_type
        self.encoder_num_layers = encoder_num_layers
        self.chunk_size = chunk_size
        self.cross_attn_layers = cross_attn_layers
        self.cross_attn_num_kv_heads = cross_attn_num_kv_heads
        self.cross_attn_init = cross_attn_init
        self.kv_policy = kv_policy
        self.kv_cache_budget_bytes = kv_cache_budget_bytes
        self.cross_attn_length_scaling = length_scaling(cross_attn_length_scaling)
        self.cross_attn_topk = topk_keys(cross_attn_topk)
        self.encoder_chunks_per_pass = chunks_per_pass(encoder_chunks_per_pass)
        self.absorbed_states = absorbed_states
        self.encoder_compile = encoder_compile
        self.encoder_frozen = encoder_frozen
        self.base_fingerprint = base_fingerprint
        self.base_encoder_fingerprint = base_encoder_fingerprint
        self.base_decoder = base_decoder
        self.base_encoder = base_encoder
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def applied_length_scaling(self) -> int | None:
        """The length scaling's L that attention applies: None under top-k attention, whose softmax
        spans k keys however long the context, so the spread that length scaling corrects for never
        arises (on the release, 64K repeated-filler pass key with top-k 16: 4/4 unscaled, 3/4 scaled)."""
        return None if self.cross_attn_topk is not None else self.cross_attn_length_scaling

    def selected_layers(self) -> list[int]:
        """Indices of the decoder layers that get a cross-attention block."""
        n = self.text_config.num_hidden_layers
        spec = self.cross_attn_layers
        if isinstance(spec, (list, tuple)):
            layers = sorted({int(i) for i in spec})
        elif spec == "all":
            layers = list(range(n))
        elif isinstance(spec, str) and spec.startswith("every:"):
            k = int(spec.split(":", 1)[1])
            layers = list(range(k - 1, n, k))
        elif isinstance(spec, str) and spec.startswith("last:"):
            k = int(spec.split(":", 1)[1])
            layers = list(range(max(0, n - k), n))
        else:
            raise ValueError(f"cross_attn_layers: expected 'all', 'every:k', 'last:n' or a list, got {spec!r}")
        bad = [i for i in layers if not 0 <= i < n]
        if bad or not layers:
            raise ValueError(f"cross_attn_layers {spec!r} selects no valid layer of {n} (bad: {bad})")
        return layers

    @property
    def encoder_hidden_size(self) -> int:
        if self.encoder_type == "decoder":
            return self.text_config.hidden_size
        return self.encoder_config.hidden_size
