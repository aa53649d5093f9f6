"""CEPE: Context Expansion with Parallel Encoding for any Hugging Face decoder."""

from transformers import AutoConfig, AutoModelForCausalLM

from .model import CepeConfig, CepeForCausalLM, ContextStates, CrossAttention, sampled_weights_hash, weights_fingerprint

__version__ = "0.1.0"

AutoConfig.register("cepe", CepeConfig, exist_ok=True)
AutoModelForCausalLM.register(CepeConfig, CepeForCausalLM, exist_ok=True)

__all__ = ["CepeConfig", "CepeForCausalLM", "ContextStates", "CrossAttention", "sampled_weights_hash",
           "weights_fingerprint", "__version__"]
