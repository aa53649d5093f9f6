"""The context encoder under `torch.compile` where it pays: long contexts on a GPU, by default.

Compiling fuses the encoder's norms, activations and rotary passes (measured on an H200 with
LLaMA-2-7B shapes: scoring 128K tokens 0.95 -> 0.82 s, 1M 6.6 -> 5.5 s). The price is a
compilation per process (about a minute), so `auto` compiles only on CUDA, for inference, and
for at least `AUTO_MIN_CHUNKS` chunks; shorter contexts, training and the CPU run eagerly.

Compiled passes have fixed sizes (`PASS_CHUNKS`): a context is cut into passes of 256 and 64
chunks, each size one static graph, and the last < 64 chunks run eagerly. A graph with a symbolic
chunk axis was tried first: its first calls at new lengths were 3.4x (128K) and 12x (1M: 65 s)
the repeated time on the H200, recompiling inside requests; fixed sizes compile once for every
length.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .configuration import ENCODER_COMPILE
from .encoder import ContextEncoder

PASS_CHUNKS = (256, 64)  # compiled pass sizes, largest first: 64K and 16K tokens at 256 per chunk
AUTO_MIN_CHUNKS = PASS_CHUNKS[-1]  # below this the eager pass takes a few ms
INT32_ELEMENTS = 2**31 - 1  # beyond this a tensor needs 64-bit indexing (other kernels)


def pass_sizes(encoder: ContextEncoder, chunk_len: int) -> list[int]:
    """`PASS_CHUNKS`, each cut to the largest power of two whose widest activation (n, L, widest
    linear output) stays within 32-bit indexing, for a very wide encoder."""
    width = max((m.out_features for m in encoder.modules() if isinstance(m, nn.Linear)), default=0)
    cap = max(1, INT32_ELEMENTS // (chunk_len * max(width, encoder.hidden_size)))
    cap = 1 << (cap.bit_length() - 1)
    return sorted({min(n, cap) for n in PASS_CHUNKS}, reverse=True)


def split_passes(n: int, sizes: list[int]) -> list[int]:
    """n chunks -> pass lengths: as many of each size (largest first) as fit, then the rest."""
    out = []
    for size in sizes:
        out += [size] * ((n - sum(out)) // size)
    rest = n - sum(out)
    return out + ([rest] if rest else [])


class EncoderRunner:
    """Runs `encoder` eagerly or compiled, per pass, as `mode` (`ENCODER_COMPILE`) decides.

    Not an `nn.Module`: it holds no weights of its own, and the compiled function is derived
    state (built on first use, never saved). A compilation that fails warns once and the runner
    stays eager from then on."""

    def __init__(self, encoder: ContextEncoder, compile_fn: Callable | None = None):
        self.encoder = encoder
        self._compile_fn = compile_fn
        self._compiled: Callable | None = None
        self.failure: str | None = None  # why compilation was given up, if it was

    def __deepcopy__(self, memo: dict) -> EncoderRunner:
        # a copied model gets its own runner over its own encoder; compiled code is not copied
        return EncoderRunner(copy.deepcopy(self.encoder, memo), self._compile_fn)

    def wants_compile(self, mode: str, n_chunks: int, device: torch.device) -> bool:
        """Whether a pass over `n_chunks` chunks on `device` runs compiled under `mode`."""
        if mode not in ENCODER_COMPILE:
            raise ValueError(f"encoder_compile must be one of {ENCODER_COMPILE}, got {mode!r}")
        if mode == "never" or self.failure is not None or n_chunks == 0:
            return False
        if mode == "always":
            return True
        inference = not torch.is_grad_enabled() and not self.encoder.training
        return device.type == "cuda" and inference and n_chunks >= AUTO_MIN_CHUNKS

    def compile_pending(self, mode: str, n_chunks: int, device: torch.device) -> bool:
        """True when the next such pass would compile first (its time includes compilation)."""
        return self._compiled is None and self.wants_compile(mode, n_chunks, device)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
        """(N, L) ids and mask -> (N, L, He) states, the same with or without compilation."""
        n = input_ids.shape[0]
        if not self.wants_compile(mode, n, input_ids.device):
            return self.encoder(input_ids, attention_mask)
        sizes = pass_sizes(self.encoder, input_ids.shape[1])
        out, start = [], 0
        for size in split_passes(n, sizes):
            ids, mask = input_ids[start : start + size], attention_mask[start : start + size]
            start += size
            # the remainder (< the smallest pass) runs eagerly under `auto`: a new shape would compile
            compiled = size in sizes or mode == "always"
            out.append(self._run_compiled(ids, mask) if compiled and self.failure is None
                       else self.encoder(ids, mask))
        return out[0] if len(out) == 1 else torch.cat(out)

    def _run_compiled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._compiled is None:
            # a bound method, not the module: the compiled wrapper must not enter the state dict
            self._compiled = (self._compile_fn or torch.compile)(self.encoder.forward, dynamic=False)
        try:
            return self._compiled(input_ids, attention_mask)
        except torch.OutOfMemoryError:
            raise  # memory, not compilation: eager would fail the same way
        except Exception as e:  # e.g. no working compiler toolchain: the eager encoder still answers
            self.failure = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"compiling the context encoder failed; running it eagerly ({self.failure})",
                          stacklevel=3)
            return self.encoder(input_ids, attention_mask)
