"""`cepe bench` on tiny shapes: the benchmark measures the library's model, counts work right,
decodes what `generate` decodes, and records out of memory as a result."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cepe import CepeForCausalLM, CrossAttention
from cepe.benchmarks import flops as F
from cepe.benchmarks.decoding import DecodeStep, decode_hf, decode_static, prefill
from cepe.benchmarks.presets import build_encoder, build_model, get_spec
from cepe.benchmarks.runner import BenchConfig, run_bench
from cepe.benchmarks.scoring import cepe_scores, full_scores, make_inputs
from cepe.model.graphs import HostSyncs


@pytest.fixture(scope="module", params=["tiny", "tiny-bert"])
def bench_model(request):
    return request.param, build_model(get_spec(request.param), "cpu", torch.float32)


# ---------------------------------------------------------------- the benchmark measures the real model
def test_benchmark_model_gives_the_library_models_logits(bench_model, tmp_path):
    """Save the benchmark's model as an adapter, load it back through the library's own
    `from_pretrained`, and compare the timed scoring callables with plain library calls."""
    name, model = bench_model
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    spec = get_spec(name)
    model.save_pretrained(tmp_path)
    encoder = build_encoder(spec) if spec.encoder_kind == "bidirectional" else None  # "hf": built from the config
    reloaded = CepeForCausalLM.from_pretrained(tmp_path, decoder=copy.deepcopy(model.decoder), encoder=encoder).eval()
    with torch.no_grad():
        library = reloaded(inputs.decoder_ids, context_input_ids=inputs.context_ids,
                           context_attention_mask=inputs.context_mask).logits
        base = reloaded.decoder(inputs.full_ids).logits[:, -16:]
    torch.testing.assert_close(cepe_scores(model, inputs), library, rtol=0, atol=0)
    torch.testing.assert_close(full_scores(model, inputs), base, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(library, base)  # the context is really used
    for p in model.parameters():  # random, small, no all-zero matrix (biases start at zero)
        assert p.dim() == 1 or 0 < p.abs().max() < 10


def test_scoring_inputs_cut_one_sequence_two_ways():
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    inputs = make_inputs(model, total=60, score=16, device="cpu")  # 44 context tokens: 6 chunks, last padded
    assert inputs.context_ids.shape == (1, 6, 8) and inputs.context_tokens == 44
    torch.testing.assert_close(inputs.context_ids[inputs.context_mask.bool()], inputs.full_ids[0, :44])
    torch.testing.assert_close(inputs.decoder_ids, inputs.full_ids[:, 44:])
    with torch.no_grad():  # padding at the end of the last chunk takes the masked path: same as unpadded
        logits = cepe_scores(model, inputs)
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------- FLOP counter
def test_flop_counter_against_a_hand_count():
    dec = F.StackShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    enc = F.StackShape(layers=1, hidden=4, heads=1, kv_heads=1, head_dim=4, intermediate=8, vocab=10)
    cross = F.CrossShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, encoder_hidden=4)
    # decoder layer: q,o 2*8*8=128; k,v 2*8*4=64; MLP 3*8*16=384 -> 576 weights
    assert dec.layer_params == 576
    full = F.full_scoring_flops(dec, total=6, score=2)
    assert full["decoder_linear"] == 2 * 6 * 2 * 576  # 13824
    assert full["decoder_attention"] == 4 * 2 * 4 * 21 * 2  # 21 causal pairs over 6 tokens: 1344
    assert full["lm_head"] == 2 * 2 * 8 * 10  # 320
    assert full["total"] == 15488
    cepe = F.cepe_scoring_flops(dec, enc, cross, total=10, score=2, chunk_len=4)  # 8 context tokens, 2 chunks
    assert cepe["encoder_linear"] == 2 * 8 * 1 * 160  # encoder layer: 32 + 32 + 96 weights
    assert cepe["encoder_attention"] == 4 * 1 * 4 * (2 * 16)  # each chunk with itself
    assert cepe["decoder_linear"] == 2 * 2 * 2 * 576
    assert cepe["decoder_attention"] == 4 * 2 * 4 * 3 * 2
    assert cepe["cross_q_o"] == 2 * 2 * 128 * 2
    assert cepe["cross_k_v"] == 2 * 8 * (2 * 4 * 4) * 2
    assert cepe["cross_attention"] == 4 * 2 * 4 * 2 * 8 * 2
    assert cepe["total"] == 11264
    step = F.decode_step_cost(dec, self_kv_len=6, cross=cross, context=8, policy="cache", dtype_bytes=2)
    weights = 2 * 576 + 8 * 10
    assert step["bytes"] == 2 * weights + 6 * (2 * 2 * 1 * 4 * 2) + 2 * 128 * 2 + 2 * 2 * 1 * 4 * 8 * 2
    absorbed = F.decode_step_cost(dec, self_kv_len=6, cross=cross, context=8, policy="absorbed", dtype_bytes=2)
    # per layer: q,o and k,v weights once, the 8 x 4 states twice; no keys/values
    assert absorbed["bytes"] == step["bytes"] - 2 * 2 * 1 * 4 * 8 * 2 + 2 * (2 * 4 * 4 + 2 * 8 * 4) * 2
    # per layer: q,o 2*128; absorbing 2*2*2*4*4 = 128; scores and mix over He = 4 wide states 4*2*4*8 = 256
    assert absorbed["flops"] == step["flops"] - 2 * (2 * 128 + 4 * 2 * 4 * 8) + 2 * (2 * 128 + 128 + 256)


def test_flop_counter_matches_torch_count_on_the_real_model():
    """torch's FlopCounterMode on the real tiny model (math attention, so attention is matmuls):
    every matmul the analytic count expects, and no other. The math kernel computes the masked
    upper triangle of causal attention too, so the decoder's self-attention is counted square."""
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    dec, x = F.StackShape.from_config(model.decoder.config), F.CrossShape.from_model(model)
    enc = F.StackShape.from_config(model.config.encoder_config)
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        cepe_scores(model, inputs)
    expected = F.cepe_scoring_flops(dec, enc, x, total=64, score=16, chunk_len=8)
    square = dec.attention_flops(16 * 16)
    # older transformers (5.17) compute rotary angles with a tiny matmul: a few hundred FLOPs here
    rotary = 2 * (dec.head_dim // 2) * 64  # angles for at most 64 positions
    extra = counter.get_total_flops() - (expected["total"] - expected["decoder_attention"] + square)
    assert 0 <= extra <= rotary
    with FlopCounterMode(display=False) as counter:
        full_scores(model, inputs)
    expected = F.full_scoring_flops(dec, total=64, score=16)
    extra = counter.get_total_flops() - (expected["decoder_linear"] + expected["lm_head"])  # SDPA on CPU: uncounted
    assert 0 <= extra <= rotary


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize("policy", ["recompute", "cache", "absorbed", "auto"])
def test_static_cache_decoding_matches_generate(bench_model, policy):
    _, model = bench_model
    model.config.kv_policy = policy
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    try:
        ours = decode_static(
            model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 10, mode="eager"
        )
        theirs = decode_hf(model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 10)
    finally:
        model.config.kv_policy = "recompute"
    assert ours["tokens"] == theirs["tokens"] and len(ours["tokens"]) == 10
    assert ours["policy_used"] == ("cache" if policy == "auto" else policy)
    full = decode_static(model, "full", inputs.full_ids, None, None, 10, mode="eager")
    assert full["tokens"] == decode_hf(model, "full", inputs.full_ids, None, None, 10)["tokens"]


def test_graph_decoding_bookkeeping_with_replay_stand_in(monkeypatch):
    """The CUDA-graph path (save, eager check, capture, restore, replays) on the CPU, with a
    stand-in graph whose replay runs the step: it must still decode what `generate` decodes."""
    import cepe.benchmarks.decoding as decoding

    class Replay:
        def __init__(self, step):
            self.step = step

        def replay(self):
            self.step()

    monkeypatch.setattr(decoding, "capture", lambda step, device: Replay(step))
    monkeypatch.setattr(decoding, "is_cuda", lambda device: True)
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    model.config.kv_policy = "cache"
    out = decode_static(model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 12, mode="graph")
    ref = decode_hf(model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 12)
    assert out["mode"] == "graph" and out["tokens"] == ref["tokens"]
    # on a GPU the first prefill is a warm-up, reported apart; TTFT is the second, whose state decodes
    assert out["ttft_first_s"] > 0 and out["ttft_s"] > 0 and "state" not in out
    assert out["graph_matches_eager"] and out["graph_logits_rel_err"] == 0.0
    assert out["eager_repeats_bitwise"] and out["graph_repeats_bitwise"]


def test_compiled_decoding_step_decodes_what_generate_decodes():
    """`--decode-mode compiled` on the CPU: the torch.compile'd step (no graph here) gives the
    uncompiled step's logits to float rounding and `generate`'s tokens."""
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    model.config.kv_policy = "cache"
    out = decode_static(model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 8,
                        mode="compiled")
    ref = decode_hf(model, "cepe", inputs.decoder_ids, inputs.context_ids, inputs.context_mask, 8)
    assert out["mode"] == "compiled" and out["compile_s"] > 0
    assert out["compiled_logits_rel_err"] < 1e-5
    assert out["tokens"] == ref["tokens"]


@pytest.mark.parametrize("method,policy", [("cepe", "recompute"), ("cepe", "cache"), ("cepe", "absorbed"),
                                           ("full", "recompute")])
def test_decoding_step_never_syncs_with_the_host(method, policy):
    model = build_model(get_spec("tiny"), "cpu", torch.float32)
    model.config.kv_policy = policy
    inputs = make_inputs(model, total=64, score=16, device="cpu")
    with torch.no_grad():
        ctx = model.encode(inputs.context_ids, inputs.context_mask) if method == "cepe" else None
        state = prefill(model, method, inputs.decoder_ids if method == "cepe" else inputs.full_ids, ctx, 4)
        step = DecodeStep(model, method, state, 4)
        with HostSyncs() as syncs:
            step()
            step()
    assert syncs.seen == []
    assert step.step.item() == 3 and (step.tokens[:3] >= 0).all()


# ---------------------------------------------------------------- cross-attention fast path (core change)
def test_grouped_query_cross_attention_matches_repeated_keys():
    torch.manual_seed(0)
    norm = torch.nn.Identity()
    block = CrossAttention(hidden_size=16, encoder_hidden_size=12, num_heads=4, num_kv_heads=2, head_dim=4, norm=norm)
    h, enc = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    k, v = block.project_kv(enc)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    q = block.q_proj(h).view(2, 5, 4, 4).transpose(1, 2)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # the textbook form
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask[:, None, None, :])
    ref = block.o_proj(ref.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(block(h, k, v, mask), ref, rtol=1e-5, atol=1e-6)
    full = torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(block(h, k, v, None), block(h, k, v, full), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the sweep
def test_out_of_memory_is_a_row_and_the_sweep_goes_on(monkeypatch, tmp_path):
    import cepe.benchmarks.runner as runner

    real = runner.full_scores

    def tight(model, inputs):
        if inputs.full_ids.shape[1] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(model, inputs)

    monkeypatch.setattr(runner, "full_scores", tight)
    cfg = BenchConfig(preset="tiny", lengths=(32, 64, 128), score_tokens=16, new_tokens=4, tasks=("score",),
                      device="cpu", dtype="float32", reps=1, out=str(tmp_path))
    result = run_bench(cfg)
    status = {(r["method"], r["total_len"]): r["status"] for r in result["rows"]}
    assert status == {("cepe", 32): "ok", ("cepe", 64): "ok", ("cepe", 128): "ok",
                      ("full", 32): "ok", ("full", 64): "oom", ("full", 128): "skipped"}
    saved = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert [r["status"] for r in saved["rows"]] == [r["status"] for r in result["rows"]]


def test_cli_smoke_writes_json_and_plot(tmp_path, capsys):
    from cepe.cli import main

    assert main(["bench", "--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert (tmp_path / "bench_tiny.png").stat().st_size > 10_000
    rows = result["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    for r in rows:  # every row says where and how it was measured
        for key in ("device", "torch", "transformers", "dtype", "attention", "command"):
            assert r[key], key
    assert "bench --smoke" in rows[0]["command"]
    kinds = {(r["task"], r["method"], r.get("mode")) for r in rows}
    assert {("score", "cepe", None), ("score", "full", None), ("decode", "cepe", "eager"),
            ("decode", "full", "hf")} <= kinds
    assert {r["policy_used"] for r in rows if r["task"] == "decode" and r["method"] == "cepe"} >= {"recompute", "cache"}
    out = capsys.readouterr().out
    assert "CEPE speed-up" in out and "ms/tok" in out


def test_cli_rejects_bad_input(tmp_path, capsys):
    from cepe.cli import main

    assert main(["bench", "--smoke", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--lengths", "four"])
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    assert main(["bench", "--smoke", "--config", str(bad)]) == 2
    assert "c.json" in capsys.readouterr().err


def test_shapes_from_a_config_json(tmp_path):
    cfg = get_spec("tiny").decoder.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = get_spec(config_path=str(tmp_path), encoder_layers=1)
    assert spec.encoder_kind == "decoder" and spec.encoder_layers == 1
    model = build_model(spec, "cpu", torch.float32)
    assert model.config.encoder_type == "decoder" and model.decoder.config.hidden_size == 32


def test_lengths_take_k_and_m_suffixes_and_refuse_the_rest():
    import argparse

    from cepe.benchmarks.cli import _lengths

    assert _lengths("512K, 1M,4096,4K") == (4096, 512 * 1024, 1024 * 1024)
    for bad in ("1G", "0", "K"):
        with pytest.raises(argparse.ArgumentTypeError):
            _lengths(bad)


def test_fp8_states_policy_decodes_and_restores_the_config(tmp_path, monkeypatch):
    """`--policies absorbed-fp8`: kv_policy absorbed over an fp8 copy of the states for its rows
    only (packed by the context's cache); the next row runs with the native states again."""
    import cepe.benchmarks.runner as runner
    from cepe.model.cross_cache import CrossAttentionCache

    seen, packed = [], []
    real_decode, real_pack = runner.decode_static, CrossAttentionCache.fp8_states

    def decode(model, *args, **kwargs):
        seen.append((model.config.kv_policy, model.config.absorbed_states))
        return real_decode(model, *args, **kwargs)

    def pack(self, states):
        packed.append(seen[-1])
        return real_pack(self, states)

    monkeypatch.setattr(runner, "decode_static", decode)
    monkeypatch.setattr(CrossAttentionCache, "fp8_states", pack)
    cfg = BenchConfig(preset="tiny", lengths=(64,), score_tokens=16, new_tokens=4, tasks=("decode",),
                      policies=("absorbed-fp8", "absorbed"), hf_policies=(), device="cpu", dtype="float32",
                      reps=1, out=str(tmp_path))
    result = run_bench(cfg)
    rows = {r["policy"]: r for r in result["rows"] if r["method"] == "cepe"}
    assert rows["absorbed-fp8"]["status"] == rows["absorbed"]["status"] == "ok"
    assert rows["absorbed-fp8"]["policy_used"] == "absorbed"
    cepe_calls = [c for c in seen if c[0] != "recompute" or c[1] != "native"]
    assert ("absorbed", "fp8") in cepe_calls and cepe_calls[-1] == ("absorbed", "native")
    assert packed and set(packed) == {("absorbed", "fp8")}


@pytest.mark.parametrize("mode, compiles", [("auto", False), ("always", True), ("never", False)])
def test_encoder_compilation_is_timed_apart_from_every_row(tmp_path, monkeypatch, mode, compiles):
    """The bench runs the model's own `encoder_compile` setting; `auto` on the CPU stays eager, and a
    compiled encoder is compiled once, before any row is timed."""
    from cepe.benchmarks.cli import SMOKE
    from cepe.benchmarks.runner import BenchConfig, run_bench

    compiled = []

    def fake_compile(fn, dynamic):
        compiled.append(dynamic)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = BenchConfig(**{**SMOKE, "tasks": ("score",), "lengths": (64,), "hf_lengths": ()}, encoder_compile=mode)
    result = run_bench(cfg)
    assert (result["model"]["encoder_compile_s"] is not None) == compiles
    assert compiled == ([False] if compiles else [])  # static graphs
    assert all(r["status"] == "ok" for r in result["rows"])


def test_plot_labels_a_short_log_axis_and_leaves_out_methods_not_run(tmp_path, monkeypatch):
    # run 14's TTFT panel spanned 0.13-0.74 s: with every minor tick removed it had no y labels
    import matplotlib.pyplot as plt

    from cepe.benchmarks import report

    figures = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])
    monkeypatch.setattr(plt, "close", lambda fig: None)
    base = {"method": "cepe", "status": "ok", "peak_gb": 1.0}
    rows = [dict(base, task="score", total_len=n, time_s=t) for n, t in ((131072, 0.86), (1048576, 5.6))]
    rows += [dict(base, task="ttft", total_len=n, time_s=t, question_tokens=512)
             for n, t in ((131072, 0.13), (1048576, 0.74))]
    env = {"dtype": "bfloat16", "device": "H200", "date": "today"}
    result = {"rows": rows, "model": {"name": "llama2-7b"}, "env": env}
    report.plot(result, tmp_path / "b.png")
    (fig, axes), = figures
    fig.canvas.draw()
    ttft = axes[3]
    lo, hi = ttft.get_ylim()
    ticks = ttft.yaxis.get_major_ticks() + ttft.yaxis.get_minor_ticks()
    assert any(t.label1.get_text() and lo <= t.get_loc() <= hi for t in ticks)
    assert [t.get_text() for t in ttft.xaxis.get_ticklabels(which="both") if t.get_text()] == ["128K", "1024K"]
    assert ttft.get_legend_handles_labels()[1] == ["CEPE, stored states"]


def test_kernel_rows_time_each_backend_and_record_those_that_refuse():
    from cepe.benchmarks.kernels import BACKENDS, kernel_rows

    shape = F.CrossShape(layers=1, hidden=64, heads=4, kv_heads=2, head_dim=16, encoder_hidden=64)
    rows = kernel_rows(shape, context=512, queries=8, total=520, device=torch.device("cpu"), dtype=torch.float32)
    assert [(r["phase"], r["backend"]) for r in rows] == [(p, b) for p in ("prefill", "decode") for b in BACKENDS]
    default = [r for r in rows if r["backend"] == "default"]
    assert all(r["status"] == "ok" and r["time_ms"] > 0 and r["tflops_per_s"] > 0 for r in default)
    assert [r["queries"] for r in default] == [8, 1]
    # cuDNN and memory-efficient attention are CUDA kernels: on a CPU they refuse, and the refusal is a row
    assert all(r["status"] == "error" and r["error"] for r in rows if r["backend"] in ("cudnn", "efficient"))
