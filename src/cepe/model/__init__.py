from .configuration import CepeConfig
from .context import ContextStates
from .cross_attention import CrossAttention
from .modeling import CepeForCausalLM, sampled_weights_hash, weights_fingerprint

__all__ = [
    "CepeConfig",
    "CepeForCausalLM",
    "ContextStates",
    "CrossAttention",
    "sampled_weights_hash",
    "weights_fingerprint",
]
