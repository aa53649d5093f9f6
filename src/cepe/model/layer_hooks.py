"""How the context reaches the cross-attention inside each decoder layer: as an argument.

`CepeForCausalLM.forward` passes `cepe_context=BoundContext(model, context)` to the decoder. Every
supported family (llama, mistral, qwen2, gemma3; transformers 5.17 to 5.24) forwards extra keywords
from `*ForCausalLM.forward` to each decoder layer and on to its self-attention. A pre-hook on the
self-attention takes the keyword out (attention kernels never see it) and hands the context to the
layer's two cross-attention hooks for that one call of the layer (where they sit: `families.py`).

Nothing is bound on the model between calls: under gradient checkpointing a layer is recomputed
from its saved keywords, so backward sees the student's context whatever ran in between (a
teacher forward, say); a call that fails leaves nothing behind, since every call of a layer starts
by setting what its hooks read; two CEPE models on one decoder each read only their own context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .context import ContextStates
from .families import DecoderFamily

CONTEXT_KWARG = "cepe_context"

# (layer index, residual stream (B, T, H), context) -> cross-attention delta (B, T, H)
CrossDelta = Callable[[int, torch.Tensor, ContextStates], torch.Tensor]


@dataclass(frozen=True)
class BoundContext:
    """The keyword value: the context, and the model whose cross-attention reads it."""

    owner: nn.Module
    context: ContextStates


class _LayerCall:
    """What one layer's hooks share during one call of that layer (set at its self-attention)."""

    __slots__ = ("context", "delta")

    def __init__(self) -> None:
        self.context: ContextStates | None = None
        self.delta: torch.Tensor | None = None


def install_cross_attention_hooks(
    owner: nn.Module, layers: nn.ModuleList, selected: list[int], family: DecoderFamily, cross_delta: CrossDelta
) -> None:
    """Hook `owner`'s cross-attention into `layers[i]` for i in `selected`; every layer's
    self-attention drops the keyword (only `owner`'s own `BoundContext`)."""
    for i, layer in enumerate(layers):
        call = _LayerCall() if i in selected else None
        layer.self_attn.register_forward_pre_hook(_take_context(owner, call), with_kwargs=True)
        if call is not None:
            getattr(layer, family.pre_mlp_norm).register_forward_pre_hook(
                _add_before_mlp(i, call, cross_delta), with_kwargs=True
            )
            getattr(layer, family.mlp_out).register_forward_hook(_add_after_mlp(call))


def _take_context(owner: nn.Module, call: _LayerCall | None):
    def pre_hook(module, args, kwargs):
        bound = kwargs.get(CONTEXT_KWARG)
        mine = isinstance(bound, BoundContext) and bound.owner is owner
        if call is not None:
            call.context, call.delta = (bound.context if mine else None), None
        if not mine:
            return None
        kwargs = dict(kwargs)
        del kwargs[CONTEXT_KWARG]
        return args, kwargs

    return pre_hook


def _add_before_mlp(idx: int, call: _LayerCall, cross_delta: CrossDelta):
    """The MLP branch reads h + xattn(h) (h: the residual stream after self-attention)."""

    def pre_hook(module, args, kwargs):
        if call.context is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        call.delta = cross_delta(idx, h, call.context)
        if args:
            return (h + call.delta, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h + call.delta}

    return pre_hook


def _add_after_mlp(call: _LayerCall):
    """The layer's own `residual + mlp_branch` sum gets the same delta, so the residual stream
    carries h + xattn(h) on."""

    def post_hook(module, args, output):
        delta, call.delta, call.context = call.delta, None, None
        return None if delta is None else output + delta

    return post_hook
