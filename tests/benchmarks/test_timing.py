"""Bench warm-up until repeated timings agree, the spread every timed row reports, the long-context
plan and time to first token over a stored document."""

from __future__ import annotations

import json

import pytest
import torch

import cepe.benchmarks.timing as timing
from cepe import CepeForCausalLM
from cepe.benchmarks.report import spread, summary
from cepe.benchmarks.runner import Bench, BenchConfig, run_bench
from cepe.benchmarks.timing import time_until_stable


class _Scripted:
    """Stands in for `Timer`: call i "takes" script[i] seconds (the fn still runs)."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0

    def __call__(self, device):
        return self

    def timer(self, fn, reps=1, warmup=0):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            fn()
            times.append(self.script[self.calls])
            self.calls += 1
        return times, None


@pytest.fixture
def scripted(monkeypatch):
    def install(script):
        s = _Scripted(script)
        monkeypatch.setattr(timing, "Timer", lambda device: s.timer)
        return s
    return install


def test_warms_up_until_three_calls_agree_within_5_percent(scripted):
    s = scripted([2.5, 1.3, 1.0, 1.2, 1.0, 1.02, 0.99, 7.0])
    t = time_until_stable(lambda: None, "cpu", reps=3)
    assert t.converged and t.times == [1.0, 1.02, 0.99] and t.warmup == [2.5, 1.3, 1.0, 1.2]
    assert s.calls == 7
    row = t.row()
    assert row["time_s"] == 1.0 and row["time_min_s"] == 0.99 and row["time_max_s"] == 1.02
    assert row["first_call_s"] == 2.5 and row["first_over_median"] == 2.5
    assert row["time_spread"] == pytest.approx(0.03) and 0 < row["time_cv"] < 0.02


def test_the_first_call_is_never_a_timed_one(scripted):
    scripted([1.0, 1.0, 1.0, 1.0, 1.0])
    t = time_until_stable(lambda: None, "cpu", reps=3)
    assert t.warmup == [1.0] and len(t.times) == 3 and t.converged


def test_warm_up_is_bounded_and_says_when_it_did_not_converge(scripted):
    s = scripted([1.0, 2.0] * 10)
    t = time_until_stable(lambda: None, "cpu", reps=3, max_calls=6)
    assert not t.converged and s.calls == 6 and t.times == [2.0, 1.0, 2.0] and len(t.warmup) == 3
    assert t.row()["warm_converged"] is False
    assert spread({**t.row(), "time_min_s": 1.0, "time_max_s": 2.0}).endswith("*")


def test_long_calls_need_two_agreeing_calls_and_at_most_three(scripted):
    s = scripted([50.0, 47.0, 47.5, 99.0])
    t = time_until_stable(lambda: None, "cpu", reps=3)
    assert t.converged and t.times == [47.0, 47.5] and s.calls == 3
    s = scripted([50.0, 40.0, 47.0, 47.0])
    t = time_until_stable(lambda: None, "cpu", reps=3)
    assert not t.converged and s.calls == 3 and t.times == [40.0, 47.0]


def test_compiled_first_call_is_not_timed(scripted):
    calls = []
    s = scripted([1.0, 1.0, 1.0])
    t = time_until_stable(lambda: calls.append(1), "cpu", reps=2, untimed_first=True)
    assert len(calls) == 4 and s.calls == 3 and t.converged


def test_plan_has_the_long_context_rows_and_ttft():
    bench = Bench(BenchConfig(device="cpu"))
    plan = bench.plan()
    for n in (262144, 524288, 1048576):
        assert ("score", "cepe", n) in plan and ("ttft", "cepe", n) in plan
        assert ("decode", "cepe", n, "auto", "graph") in plan
    assert ("ttft", "full", 131072) in plan


def test_ttft_reads_stored_states_without_running_the_encoder(monkeypatch, tmp_path):
    encodes = []
    real = CepeForCausalLM.encode

    def counting(self, *a, **k):
        encodes.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(CepeForCausalLM, "encode", counting)
    cfg = BenchConfig(preset="tiny", lengths=(16, 40), score_tokens=16, tasks=("ttft",), question_tokens=8,
                      device="cpu", dtype="float32", reps=2, full_max_len=16, out=str(tmp_path))
    result = run_bench(cfg)
    rows = {(r["method"], r["total_len"]): r for r in result["rows"]}
    assert set(rows) == {("cepe", 16), ("cepe", 40), ("full", 16), ("full", 40)}
    assert len(encodes) == 2  # one store per document; the >= 3 timed prefills never encode
    for n in (16, 40):
        r = rows[("cepe", n)]
        assert r["status"] == "ok" and r["context_tokens"] == n - 8 and r["question_tokens"] == 8
        assert r["stored_state_bytes_per_token"] == 16 * 4  # the tiny preset's encoder width, float32
        assert r["load_s"] > 0 and len(r["times_s"]) >= 2 and r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
    assert rows[("full", 16)]["status"] == "ok"
    assert rows[("full", 40)]["status"] == "skipped" and "beyond 16" in rows[("full", 40)]["error"]
    per_token = result["model"]["bytes_per_context_token"]  # tiny preset: 2 layers x 1 kv head x 8, encoder 16
    assert per_token["states"] == 16 * 4 and per_token["cross_kv_cache"] == 2 * 2 * 1 * 8 * 4
    assert per_token["full_attention_kv"] == 2 * 2 * 2 * 8 * 4
    text = summary(json.loads((tmp_path / "bench_tiny.json").read_text()))
    assert "time to first token, 8-token question" in text and "CEPE TTFT speed-up" in text
    assert "encoder states 64 B | cross-attention keys/values 128 B (2x)" in text
    assert (tmp_path / "bench_tiny.png").stat().st_size > 10_000


def test_ttft_call_uses_the_stored_tensors_and_no_carried_cache(monkeypatch):
    """Each timed call gets the same state tensors in a fresh context object: keys/values
    projected by an earlier call (under the `cache` policy) are not reused."""
    import cepe.benchmarks.stored as stored_mod
    from cepe.benchmarks.presets import build_model, get_spec
    from cepe.benchmarks.scoring import make_inputs

    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    inputs = make_inputs(model, total=40, score=8, device="cpu")
    doc = stored_mod.store_document(model, inputs)
    seen = []
    monkeypatch.setattr(stored_mod, "prefill", lambda m, method, ids, ctx, n: seen.append(ctx))
    fn = stored_mod.first_token_fn(model, "cepe", inputs, doc)
    fn()
    fn()
    assert seen[0] is not seen[1] and seen[0] is not doc
    assert all(c.hidden_states is doc.hidden_states and not c.cross_cache.filled for c in seen)
