"""Where cross-attention goes in each decoder family.

CEPE puts a cross-attention block between a layer's self-attention and its MLP. We do not copy a
modeling file to get there: we read the residual stream at the input of the module that normalises
it before the MLP (a forward pre-hook, so the MLP sees `h + xattn(h)`), and add the same delta to
the output of the last module of the MLP branch (a forward hook), so that the layer's own
`residual + mlp_branch` sum becomes `(h + xattn(h)) + mlp(norm(h + xattn(h)))`. State-dict keys of
the decoder stay untouched. Adding a family is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class DecoderFamily:
    pre_mlp_norm: str  # module whose input is the residual stream right after self-attention
    mlp_out: str  # last module of the MLP branch, whose output is added to the residual stream
    query_norm: str = "input_layernorm"  # norm copied to the cross-attention's query side


_LLAMA_LIKE = DecoderFamily(pre_mlp_norm="post_attention_layernorm", mlp_out="mlp")
_GEMMA_LIKE = DecoderFamily(pre_mlp_norm="pre_feedforward_layernorm", mlp_out="post_feedforward_layernorm")

FAMILIES: dict[str, DecoderFamily] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma3_text": _GEMMA_LIKE,
    "gemma2": _GEMMA_LIKE,
}


def family_of(model_type: str) -> DecoderFamily:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"decoder family {model_type!r} is not supported yet (supported: {sorted(FAMILIES)}); "
            "add a DecoderFamily entry in cepe/model/families.py"
        ) from None


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a `*ForCausalLM`."""
    inner = decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder.model
    return inner.layers
