"""The one import of `bm25s`, made safe on a GPU machine that also has JAX installed.

`bm25s.selection` runs a JAX top-k when it is imported, whenever JAX is installed. On a GPU machine
that initialises JAX's CUDA backend, which by default takes 75% of the GPU's memory (about 105 GB on
an H200) outside PyTorch's allocator: training with the retrieval builder then ran out of memory at
30 GB allocated, and forked DataLoader workers deadlocked on JAX's threads (H200, 2026-12-01). BM25
top-k is cheap on the CPU and every retrieval asks for the numpy backend, so `bm25s` is imported with
JAX hidden: no JAX threads, no GPU memory, DataLoader workers fork safely. Where the process already
imported JAX itself, that JAX is left as it is.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

TOPK_BACKEND = "numpy"  # `backend_selection=` for every `BM25.retrieve` call


def import_bm25s() -> ModuleType:
    """`import bm25s` without letting it import JAX (unless the process already has)."""
    if "bm25s" in sys.modules:
        return sys.modules["bm25s"]
    hide = "jax" not in sys.modules
    if hide:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # should anything import JAX later: the CPU
        sys.modules["jax"] = None  # type: ignore[assignment]  # `import jax.lax` raises ImportError
    try:
        import bm25s
    finally:
        if hide:
            del sys.modules["jax"]
    return bm25s
