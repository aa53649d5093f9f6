"""scripts/gpu/check_absorbed_policy.py on the tiny preset in float32 on the CPU: `absorbed` gives
`cache`'s tokens and logits, the context is encoded without an autograd graph (the 128K run that
ran out of memory kept one), and `cache` is skipped, not crashed, where it does not fit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cepe.benchmarks.presets import build_model, get_spec
from cepe.benchmarks.scoring import make_inputs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/gpu/check_absorbed_policy.py"
ARGS = ["--preset", "tiny", "--prompt", "8", "--new-tokens", "6", "--device", "cpu"]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_absorbed_policy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_absorbed_matches_cache_in_float32(check, tmp_path):
    rows = check.main(ARGS + ["--context", "40,96", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "check_absorbed_policy.json").read_text()) == rows
    assert [r["context"] for r in rows] == [40, 96]
    for r in rows:
        assert r["dtype"] == "torch.float32" and r["status_cache"] == r["status_absorbed"] == "ok"
        assert r["forced_steps"] == 6 and r["forced_argmax_agree"] == 6
        assert r["same_tokens"] and r["tokens_agreeing"] == 6
        assert r["prefill_rel_err"] < 1e-5 and r["max_step_rel_err"] < 1e-5
        assert 0 <= r["mean_step_rel_err"] <= r["max_step_rel_err"]
        assert r["step_ms_cache"] > 0 and r["step_ms_absorbed"] > 0
        assert r["peak_gb_cache"] is None and r["cache_kv_gb"] > 0  # no CUDA: no peak to read


def test_context_is_encoded_without_an_autograd_graph(check):
    """The encoder's weights are trainable, so `model.encode` with grad on records every layer's
    activations (~1.1 MB per context token at LLaMA-2-7B shapes); the script's states carry none."""
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    inputs = make_inputs(model, 40, 8, "cpu")
    assert any(p.requires_grad for p in model.encoder.parameters())
    assert model.encode(inputs.context_ids, inputs.context_mask).hidden_states.grad_fn is not None
    states = check.encode(model, inputs).hidden_states
    assert states.grad_fn is None and not states.requires_grad


def test_cache_is_skipped_where_its_keys_values_do_not_fit(check):
    (row,) = check.main(ARGS + ["--context", "40", "--cache-budget-gb", "1"])
    assert row["status_cache"].startswith("skipped") and row["peak_gb_cache"] is None
    assert row["status_absorbed"] == "ok" and row["step_ms_absorbed"] > 0
    assert "max_step_rel_err" not in row
