"""The harness on the real SmolLM2-135M-Instruct + MiniLM (installed by `cepe assets`) and the
shared Austen text (`../shared/data`); skipped cleanly where either is missing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cepe import assets

pytestmark = pytest.mark.real

BOOK = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "books" / "austen" / "persuasion.txt"


@pytest.fixture(scope="module")
def em():
    if not (assets.is_installed("smollm2-135m") and assets.is_installed("minilm-l6")):
        pytest.skip("assets not installed: run `cepe assets`")
    if not BOOK.is_file():
        pytest.skip(f"shared data not found at {BOOK}")
    from cepe.evaluation import load_eval_model

    torch.manual_seed(0)
    return load_eval_model("smollm2-135m", "minilm-l6", init="zero")


def test_real_ppl_bookkeeping(em):
    """Zero-init CEPE equals the truncated decoder token for token; context in the window helps."""
    from cepe.evaluation import build_methods
    from cepe.evaluation.tasks import ppl

    ids = em.tokenizer(BOOK.read_text()[:20_000], add_special_tokens=False)["input_ids"]
    methods = build_methods(["cepe", "truncated", "full", "streamingllm", "replug"], em.cepe, window=128,
                            replug_chunk_tokens=128)
    s = ppl.PplSettings(decoder_tokens=128, scored_tokens=64, context_tokens=[0, 384])
    out = ppl.run(methods, [("persuasion", ids)], s, progress=False)
    assert out["checks"]["cepe_vs_truncated_max_abs_loglik_diff"] == 0.0
    res = out["methods"]
    assert all(math.isfinite(res[m]["512"]["ppl"]) for m in methods)
    assert res["full"]["512"]["ppl"] < res["truncated"]["512"]["ppl"]
    # the encoder really ran on the re-tokenized text (MiniLM WordPiece, lower-cased)
    req = ppl.make_request(ids, len(ids), s, 384)
    ctx = methods["cepe"].context(req)
    assert ctx is not None and ctx.num_tokens > 300
