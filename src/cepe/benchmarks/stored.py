"""Time to first token over a stored document: the document's encoder states are already on the
device (a document store's hot path), so only the question is prefilled; no encoder run."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..model import CepeForCausalLM, ContextStates
from .decoding import prefill
from .scoring import ScoringInputs
from .timing import sync


@torch.no_grad()
def store_document(model: CepeForCausalLM, inputs: ScoringInputs) -> ContextStates | None:
    """Encode the document part of `inputs` once (untimed), as `cepe serve` does when it stores it."""
    if inputs.context_ids is None:
        return None
    return model.encode(inputs.context_ids, inputs.context_mask)


def first_token_fn(model: CepeForCausalLM, method: str, inputs: ScoringInputs,
                   stored: ContextStates | None) -> Callable[[], object]:
    """The timed call. CEPE: prefill the question (`decoder_ids`) against the stored states and
    pick the first token. Full attention: prefill all of `full_ids` into a cache, pick a token."""
    if method == "full":
        return lambda: prefill(model, "full", inputs.full_ids, None, 1)
    # a new object per call, so no keys/values projected by the previous call are reused
    return lambda: prefill(model, "cepe", inputs.decoder_ids, fresh(stored), 1)


def fresh(ctx: ContextStates | None) -> ContextStates | None:
    """The same state tensors in a new object (nothing cached on it)."""
    return None if ctx is None else ctx.to(ctx.hidden_states.device)


def load_time(ctx: ContextStates, device) -> dict:
    """Seconds to read stored states from a safetensors file onto the device. The file was just
    written, so it comes from the page cache: the warm path of a store that keeps files on disk."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "document.safetensors"
        ctx.save(path)
        sync(device)
        t0 = time.perf_counter()
        loaded = ContextStates.load(path, device=device)
        sync(device)
        seconds = time.perf_counter() - t0
        nbytes = path.stat().st_size
    del loaded
    return {"load_s": seconds, "stored_file_gb": nbytes / 1e9}
