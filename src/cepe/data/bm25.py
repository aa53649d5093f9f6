"""The one import of `bm25s`, made safe on a GPU machine that also has JAX installed.

`bm25s.selection` runs a JAX top-k when it is imported, whenever JAX is installed. On a GPU machine
that initialises JAX's CUDA backend, which by default takes 75% of the GPU's memory (about 105 GB on
an H200) outside PyTorch's allocator: training with the retrieval builder then ran out of memory at
30 GB allocated, and forked DataLoader workers deadlocked on JAX's threads (H200, 2026-12-01). BM25
top-k is cheap on the CPU, so JAX is kept there unless the user chose a platform, and every
retrieval asks for the numpy backend.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

TOPK_BACKEND = "numpy"  # `backend_selection=` for every `BM25.retrieve` call


def import_bm25s() -> ModuleType:
    """`import bm25s`, with JAX (if installed and not yet imported) confined to the CPU."""
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    return bm25s
