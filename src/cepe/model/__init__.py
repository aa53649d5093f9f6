from .configuration import CepeConfig
from .context import ContextStates
from .cross_attention import CrossAttention
from .modeling import CepeForCausalLM, weights_fingerprint

__all__ = ["CepeConfig", "CepeForCausalLM", "ContextStates", "CrossAttention", "weights_fingerprint"]
