"""Pinned logits of the released adapter on CPU fp32.

Any change to the context path (binding, cross-attention cache, loading) must leave these values
unchanged. First pinned before the code-health refactor (#13) for the Austen + Python adapter (whose
config scaled cross-attention logits past 2,048 context tokens); re-pinned when the general-purpose
adapter (issue 15, step 3,300, no length scaling) replaced it, and again for its fourth stage (step 3,000
from step 3,300) its fifth (step 2,600 from stage 4), the soup of stages 4 and 5 (their weight-by-weight
midpoint), stage 11 averaged with stage 10 + that soup, stage 13 averaged with that (2026-12-03, session 19),
stage 17 averaged with that (2026-12-04, session 22), and stage 23 alone (2026-12-05, session 28).
The decoder-alone values did not move.
"""

from __future__ import annotations

import pytest
import torch

from cepe import CepeForCausalLM, assets
from cepe.demo import bundled_document
from cepe.release import released_adapter_path

pytestmark = pytest.mark.real

# (position, token id, CEPE logit, decoder-alone logit), measured 2026-12-05 for stage 23
PINNED = [
    (0, 0, 11.076862335205078, 16.595703125),
    (0, 5000, 7.480375289916992, 17.32735252380371),
    (31, 100, 16.10220718383789, 16.14277458190918),
    (31, 457, 23.082380294799805, 23.732444763183594),
    (63, 100, 5.717947006225586, 4.808642864227295),
    (63, 2736, 4.089991092681885, 3.2356770038604736),
]
PINNED_ABS_MEAN = 6.615220299477932


def test_released_adapter_logits_are_pinned():
    if not assets.is_installed("smollm2-135m"):
        pytest.skip("assets not installed: run `cepe assets`")
    torch.manual_seed(0)
    model = CepeForCausalLM.from_pretrained(released_adapter_path(), decoder="smollm2-135m").eval()
    ids = model.tokenizer(bundled_document(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    context = model.encode_context([model.tokenizer.decode(ids[:2560])])
    x = ids[2560:2624][None]
    with torch.no_grad():
        cepe = model(x, context=context).logits[0]
        alone = model.decoder(x).logits[0]
    for pos, tok, want_cepe, want_alone in PINNED:
        assert float(cepe[pos, tok]) == pytest.approx(want_cepe, abs=2e-4), (pos, tok)
        assert float(alone[pos, tok]) == pytest.approx(want_alone, abs=2e-4), (pos, tok)
    assert float(cepe.double().abs().mean()) == pytest.approx(PINNED_ABS_MEAN, abs=1e-5)
