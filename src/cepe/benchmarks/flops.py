"""Analytic work and traffic: matrix-multiply FLOPs for scoring, bytes read per decoded token.

Conventions (as in nanoGPT's `estimate_mfu` and the PaLM paper): a (m x k) @ (k x n) product is
2mkn FLOPs; norms, activations, rotary embeddings and softmax are not counted; attention is
4 * heads * head_dim FLOPs per (query, key) pair (QK^T and PV), over the pairs a fused kernel
really computes (causal: the lower triangle; chunked encoder: each chunk with itself).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class StackShape:
    """The matmul shapes of a transformer stack (decoder or encoder)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int = 3  # gated MLP (SwiGLU: gate, up, down); 2 for BERT's plain MLP

    @classmethod
    def from_config(cls, cfg: PretrainedConfig, layers: int | None = None) -> StackShape:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        gated = cfg.model_type not in ("bert", "roberta", "xlm-roberta", "camembert", "mpnet", "distilbert")
        return cls(
            layers=layers if layers is not None else cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size,
            mlp_matrices=3 if gated else 2,
        )

    @property
    def layer_params(self) -> int:
        """Matmul weights of one layer: q, k, v, o and the MLP."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + self.mlp_matrices * self.hidden * self.intermediate

    def linear_flops(self, tokens: int) -> int:
        return 2 * tokens * self.layers * self.layer_params

    def attention_flops(self, pairs: int) -> int:
        """`pairs` (query, key) pairs per layer."""
        return 4 * self.heads * self.head_dim * pairs * self.layers

    def lm_head_flops(self, tokens: int) -> int:
        return 2 * tokens * self.hidden * self.vocab

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Self-attention cache per token, all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CrossShape:
    """The cross-attention blocks CEPE adds."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    encoder_hidden: int

    @classmethod
    def from_model(cls, model) -> CrossShape:
        blocks = list(model.cross_attn.values())
        b = blocks[0]
        return cls(len(blocks), b.q_proj.in_features, b.num_heads, b.num_kv_heads, b.head_dim, b.k_proj.in_features)

    @property
    def query_params(self) -> int:  # q and o, per layer
        return 2 * self.hidden * self.heads * self.head_dim

    @property
    def kv_params(self) -> int:  # k and v, per layer
        return 2 * self.encoder_hidden * self.kv_heads * self.head_dim

    def flops(self, queries: int, keys: int, project_keys: bool = True) -> dict:
        q_o = 2 * queries * self.query_params * self.layers
        k_v = 2 * keys * self.kv_params * self.layers if project_keys else 0
        core = 4 * self.heads * self.head_dim * queries * keys * self.layers
        return {"q_o": q_o, "k_v": k_v, "attention": core}

    def kv_bytes(self, keys: int, dtype_bytes: int = 2) -> int:
        """The `cache` policy's memory: keys and values of every cross-attention layer."""
        return self.layers * 2 * self.kv_heads * self.head_dim * keys * dtype_bytes


def causal_pairs(new: int, past: int = 0) -> int:
    """(query, key) pairs of causal attention: `new` queries after `past` cached keys."""
    return new * past + new * (new + 1) // 2


def full_scoring_flops(dec: StackShape, total: int, score: int) -> dict:
    """The base decoder over all `total` tokens, logits for the last `score` only."""
    parts = {
        "decoder_linear": dec.linear_flops(total),
        "decoder_attention": dec.attention_flops(causal_pairs(total)),
        "lm_head": dec.lm_head_flops(score),
    }
    parts["total"] = sum(parts.values())
    return parts


def cepe_scoring_flops(dec: StackShape, enc: StackShape | None, cross: CrossShape, total: int, score: int,
                       chunk_len: int) -> dict:
    """Encoder over the first `total - score` tokens in independent chunks of `chunk_len`, then the
    decoder over the last `score` tokens with cross-attention to every encoded token.

    `enc=None` counts nothing for the encoder (context already encoded)."""
    context = total - score
    n_chunks = -(-context // chunk_len)
    enc_tokens = n_chunks * chunk_len  # the last chunk is padded: the hardware does that work too
    parts = {}
    if enc is not None:
        parts["encoder_linear"] = enc.linear_flops(enc_tokens)
        parts["encoder_attention"] = enc.attention_flops(n_chunks * chunk_len * chunk_len)
    parts["decoder_linear"] = dec.linear_flops(score)
    parts["decoder_attention"] = dec.attention_flops(causal_pairs(score))
    if context > 0:
        x = cross.flops(score, enc_tokens)
        parts["cross_q_o"], parts["cross_k_v"], parts["cross_attention"] = x["q_o"], x["k_v"], x["attention"]
    parts["lm_head"] = dec.lm_head_flops(score)
    parts["total"] = sum(parts.values())
    return parts


def decode_step_cost(dec: StackShape, self_kv_len: int, cross: CrossShape | None = None, context: int = 0,
                     policy: str = "none", dtype_bytes: int = 2) -> dict:
    """FLOPs and the fewest device-memory bytes of one decoding step (batch 1).

    Bytes: every matmul weight once (the embedding table: one row, ignored), the self-attention cache
    up to `self_kv_len`, and for cross-attention either the cached keys/values (`cache`), the
    encoder states plus the keys/values the library writes and reads back (`recompute`), or the
    encoder states read twice per layer by the two matmuls of `absorbed` (He-wide heads)."""
    weights = dec.layers * dec.layer_params + dec.hidden * dec.vocab
    flops = 2 * weights + dec.attention_flops(self_kv_len)
    nbytes = weights * dtype_bytes + self_kv_len * dec.kv_bytes_per_token(dtype_bytes)
    if cross is not None and context > 0 and policy == "absorbed":
        c = cross
        absorb = 2 * 2 * c.heads * c.head_dim * c.encoder_hidden  # q~ = W_k^T q, then W_v on the mix
        flops += c.layers * (2 * c.query_params + absorb + 4 * c.heads * c.encoder_hidden * context)
        nbytes += c.layers * (c.query_params + c.kv_params + 2 * context * c.encoder_hidden) * dtype_bytes
    elif cross is not None and context > 0:
        x = cross.flops(1, context, project_keys=policy == "recompute")
        flops += x["q_o"] + x["k_v"] + x["attention"]
        nbytes += cross.layers * cross.query_params * dtype_bytes
        kv = cross.kv_bytes(context, dtype_bytes)
        if policy == "recompute":
            states = cross.layers * context * cross.encoder_hidden * dtype_bytes
            nbytes += cross.layers * cross.kv_params * dtype_bytes + states + 2 * kv  # written, then read
        else:
            nbytes += kv
    return {"flops": flops, "bytes": nbytes}
