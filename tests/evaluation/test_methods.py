"""Each method's log-likelihoods equal a direct computation; all methods score the same positions."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_cepe, tiny_decoder
from eval_helpers import random_ids
from transformers import AutoModelForCausalLM

from cepe.evaluation.methods import Cepe, DoesNotFit, Full, Replug, StreamingLLM, Truncated, build_methods
from cepe.evaluation.scoring import Request, greedy_generate, label_log_likelihoods, score
from cepe.evaluation.streaming import sink_attention


def direct(decoder, ids: list[int], first: int) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= first, from one plain forward."""
    with torch.no_grad():
        logp = decoder(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logp[first - 1 : -1].gather(-1, torch.tensor(ids[first:])[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def dec():
    return tiny_decoder("llama")


def test_request_validation():
    with pytest.raises(ValueError, match="score_start"):
        Request(tokens=[1, 2, 3], score_start=0)
    with pytest.raises(ValueError, match="weights"):
        Request(tokens=[1, 2], context=[[3]], weights=[1.0, 2.0])


def test_truncated_and_full_equal_direct(dec):
    ctx, toks = random_ids(20, 1), random_ids(16, 2)
    req = Request(tokens=toks, context=[ctx[:7], ctx[7:]], prefix=[5, 6], score_start=10)
    torch.testing.assert_close(score(Truncated(dec), req), direct(dec, [5, 6] + toks, 2 + 10))
    torch.testing.assert_close(score(Full(dec), req), direct(dec, [5, 6] + ctx + toks, 2 + 20 + 10))
    with pytest.raises(DoesNotFit):
        score(Full(dec, max_length=30), req)


@pytest.mark.parametrize("rope", ["linear", "dynamic", "yarn"])
def test_full_rope_scaling_equals_scaled_decoder(dec, rope):
    """full-<rope> == a decoder built from a config whose rope_parameters carry that scaling."""
    from cepe.evaluation.rope import scaled_config

    factor = 4.0
    ref = AutoModelForCausalLM.from_config(scaled_config(dec.config, rope, factor)).eval()
    ref.load_state_dict(dec.state_dict())
    toks = random_ids(600, 3)  # longer than the 512 trained positions: dynamic NTK kicks in
    req = Request(tokens=toks, score_start=590)
    before = score(Full(dec, max_length=10_000), req)
    out = score(Full(dec, rope=rope, rope_factor=factor), req)
    torch.testing.assert_close(out, direct(ref, toks, 590), rtol=1e-4, atol=1e-4)
    assert (out - before).abs().max() > 1e-5  # the scaling really changed something
    # the decoder's own RoPE is back afterwards
    torch.testing.assert_close(score(Full(dec, max_length=10_000), req), before)


def test_full_rope_auto_factor_is_plain_within_window(dec):
    req = Request(tokens=random_ids(40, 4), score_start=30)
    for rope in ("linear", "yarn"):
        torch.testing.assert_close(score(Full(dec, rope=rope), req), score(Full(dec), req), rtol=1e-5, atol=1e-5)


def test_streamingllm_window_larger_than_text_is_plain_decoder(dec):
    toks = random_ids(40, 5)
    req = Request(tokens=toks[20:], context=[toks[:20]], score_start=5)
    torch.testing.assert_close(score(StreamingLLM(dec, window=64), req), direct(dec, toks, 25))
    # the sink attention function itself, forced on, is the plain causal decoder too
    with torch.no_grad(), sink_attention(dec, 4, 64, block=7):
        forced = dec(input_ids=torch.tensor([toks])).logits
    torch.testing.assert_close(forced, dec(input_ids=torch.tensor([toks])).logits, rtol=1e-5, atol=1e-5)
    assert dec.config._attn_implementation == "sdpa"  # restored


def test_streamingllm_is_exact_with_renumbered_positions():
    """With one layer, a token's keys/values depend on its embedding alone, so StreamingLLM at
    token t equals the plain decoder on [sinks] + [most recent window-4 tokens], renumbered 0.."""
    one = tiny_decoder("llama", num_hidden_layers=1)
    toks, window = random_ids(50, 6), 12
    lp = StreamingLLM(one, window=window, block=5).log_probs(Request(tokens=toks), 20)
    for t in range(30, 50):
        kept = toks[:4] + toks[t - (window - 4) + 1 : t + 1]
        with torch.no_grad():
            ref = one(input_ids=torch.tensor([kept])).logits[0, -1].float().log_softmax(-1)
        torch.testing.assert_close(lp[t - 30], ref, rtol=1e-5, atol=1e-5)


def test_streamingllm_evicts(dec):
    toks = random_ids(60, 7)
    req = Request(tokens=toks, score_start=40)
    assert (score(StreamingLLM(dec, window=16), req) - direct(dec, toks, 40)).abs().max() > 1e-5


def test_replug_one_chunk_equals_plain_decoder_with_chunk_prepended(dec):
    chunk, toks = random_ids(9, 8), random_ids(12, 9)
    req = Request(tokens=toks, context=[chunk], prefix=[7], score_start=4)
    torch.testing.assert_close(score(Replug(dec), req), direct(dec, [7] + chunk + toks, 1 + 9 + 4))
    # no context at all: the plain decoder on the window
    torch.testing.assert_close(score(Replug(dec), Request(tokens=toks, score_start=4)), direct(dec, toks, 4))


@pytest.mark.parametrize("weighting", ["uniform", "score"])
def test_replug_mixture_of_uneven_passes(dec, weighting):
    docs, toks, scores = [random_ids(5, 10), random_ids(11, 11), random_ids(2, 12)], random_ids(8, 13), [1.0, 3.0, 0.5]
    req = Request(tokens=toks, context=docs, weights=scores, score_start=3)
    out = score(Replug(dec, weighting=weighting, batch_size=2), req)  # padding inside a batch, two batches
    w = torch.tensor(scores).softmax(0) if weighting == "score" else torch.full((3,), 1 / 3)
    per_pass = torch.stack([direct(dec, d + toks, len(d) + 3) for d in docs])
    torch.testing.assert_close(out, torch.logsumexp(per_pass + w.log()[:, None], 0), rtol=1e-5, atol=1e-5)


def test_replug_chunk_tokens_splits_the_context(dec):
    ctx, toks = random_ids(10, 14), random_ids(6, 15)
    req = Request(tokens=toks, context=[ctx], score_start=2)
    split = score(Replug(dec, chunk_tokens=4), req)  # chunks of 4, 4, 2
    parts = [ctx[:4], ctx[4:8], ctx[8:]]
    ref = score(Replug(dec), Request(tokens=toks, context=parts, score_start=2))
    torch.testing.assert_close(split, ref)


@pytest.mark.parametrize("encoder", ["bert", "decoder"])
def test_cepe_zero_init_equals_truncated(encoder):
    model = tiny_cepe("llama", encoder, init="zero")
    to_encoder = (lambda ids: [i % 80 for i in ids]) if encoder == "bert" else None
    cepe = Cepe(model, to_encoder=to_encoder)
    req = Request(tokens=random_ids(14, 16), context=[random_ids(20, 17), random_ids(5, 18)], score_start=6)
    torch.testing.assert_close(score(cepe, req), score(Truncated(model.decoder), req), rtol=0, atol=0)
    assert cepe.context(req) is not None  # the encoder did run


def test_cepe_copy_init_reads_the_context():
    model = tiny_cepe("llama", "decoder", init="copy")
    cepe, trunc = Cepe(model), Truncated(model.decoder)
    toks = random_ids(14, 19)
    with_ctx = Request(tokens=toks, context=[random_ids(20, 20)], score_start=6)
    no_ctx = Request(tokens=toks, score_start=6)
    assert not torch.allclose(score(cepe, with_ctx), score(trunc, with_ctx))
    torch.testing.assert_close(score(cepe, no_ctx), score(trunc, no_ctx), rtol=0, atol=0)


def test_cepe_reads_its_context_as_stored_in_eight_bits():
    model = tiny_cepe("llama", "decoder", init="copy")
    req = Request(tokens=random_ids(14, 19), context=[random_ids(20, 20)], score_start=6)
    exact = score(Cepe(model), req)
    for fmt, tol in (("int8", 0.02), ("fp8", 0.1)):
        cepe = Cepe(model)
        cepe.state_format = fmt
        got = score(cepe, req)
        assert not torch.equal(got, exact) and (got - exact).abs().max() < tol  # lossy, and close
        want = model.encode_context([list(d) for d in req.context]).stored_as(fmt).hidden_states
        assert torch.equal(cepe.context(req).hidden_states, want)
        assert torch.equal(cepe.batch_context([req, req]).hidden_states[0], want[0])


def test_all_methods_score_the_same_positions():
    model = tiny_cepe("llama", "decoder", init="zero")
    names = ["cepe", "truncated", "full", "full-linear", "full-dynamic", "full-yarn", "streamingllm", "replug"]
    methods = build_methods(names, model, window=16, replug_chunk_tokens=8)
    toks = random_ids(20, 21)
    # with context: every method returns exactly the scored positions
    req = Request(tokens=toks, context=[random_ids(30, 22)], score_start=12)
    outs = {n: score(m, req) for n, m in methods.items()}
    assert {tuple(o.shape) for o in outs.values()} == {(8,)}
    assert all(torch.isfinite(o).all() for o in outs.values())
    # without context: all the same numbers (the window here fits StreamingLLM's cache)
    bare = Request(tokens=toks[:16], score_start=9)
    ref = direct(model.decoder, toks[:16], 9)
    for name, m in methods.items():
        torch.testing.assert_close(score(m, bare), ref, rtol=1e-5, atol=1e-5, msg=name)


def test_bos_comes_first_for_every_method():
    # Gemma's decoder reads <bos> first (CEPE was trained with it before each window): every
    # method's decoder input starts with it, the scored positions stay the same
    model = tiny_cepe("llama", "decoder", init="zero")
    bos = 3
    names = ["cepe", "truncated", "full", "streamingllm", "replug"]
    methods = build_methods(names, model, window=32, replug_chunk_tokens=8, bos=bos)
    toks = random_ids(16, 31)
    bare = Request(tokens=toks, prefix=[5, 6], score_start=9)
    ref = direct(model.decoder, [bos, 5, 6] + toks, 3 + 9)
    assert not torch.allclose(ref, direct(model.decoder, [5, 6] + toks, 2 + 9))
    for name, m in methods.items():
        torch.testing.assert_close(score(m, bare), ref, rtol=1e-5, atol=1e-5, msg=name)
        assert m.decoder_length(bare) == 3 + 16
    with_ctx = Request(tokens=toks, context=[random_ids(12, 32)], score_start=9)
    full = direct(model.decoder, [bos] + with_ctx.context[0] + toks, 1 + 12 + 9)
    torch.testing.assert_close(score(methods["full"], with_ctx), full, rtol=1e-5, atol=1e-5)
    assert methods["truncated"].generate(bare, 4) == greedy_generate(methods["truncated"], bare, 4)
    # without bos (SmolLM2): unchanged
    assert build_methods(["truncated"], model)["truncated"].bos == ()


def test_cached_generation_equals_greedy_loop():
    model = tiny_cepe("llama", "decoder", init="copy")
    methods = build_methods(["cepe", "truncated", "full", "replug", "streamingllm"], model, window=24)
    req = Request(tokens=random_ids(10, 23), context=[random_ids(7, 24), random_ids(4, 25)], weights=[0.2, 0.9])
    for name, m in methods.items():
        fast = m.generate(req, 6)
        slow = greedy_generate(m, req, 6)
        assert fast == slow, name
        assert len(slow) == 6
    stop = {greedy_generate(methods["truncated"], req, 6)[2]}
    assert methods["truncated"].generate(req, 6, stop) == greedy_generate(methods["truncated"], req, 6, stop)
    assert len(greedy_generate(methods["truncated"], req, 6, stop)) <= 2


@pytest.mark.parametrize("encoder", ["decoder", "bert"])
def test_batched_generation_equals_one_at_a_time(encoder):
    """Left-padded batches (rows of different lengths, different numbers of context documents,
    one row with none) give each row the tokens it gets alone."""
    model = tiny_cepe("llama", encoder, init="copy")
    methods = build_methods(
        ["cepe", "truncated", "full", "replug"],
        model,
        to_encoder=(lambda ids: [t % 70 for t in ids]) if encoder == "bert" else None,
    )
    reqs = [
        Request(tokens=random_ids(10, 30), context=[random_ids(7, 31), random_ids(4, 32)], weights=[0.2, 0.9]),
        Request(tokens=random_ids(4, 33), context=[random_ids(12, 34)], prefix=[5, 6], weights=[1.0]),
        Request(tokens=random_ids(7, 35)),
        Request(tokens=random_ids(60, 41), context=[random_ids(6, 42)]),  # pads the others by 50+
        Request(tokens=random_ids(13, 36), context=[random_ids(3, 37), random_ids(9, 38), random_ids(5, 39)]),
    ]
    for name, m in methods.items():
        alone = [m.generate(r, 5) for r in reqs]
        assert m.generate_batch(reqs, 5) == alone, name
        stop = {alone[0][1], alone[3][0]}
        assert m.generate_batch(reqs, 5, stop) == [m.generate(r, 5, stop) for r in reqs], name
    # CEPE reads the context in a batch too: a copy-init model's answer depends on it
    cepe = methods["cepe"]
    swapped = [reqs[0], Request(tokens=reqs[1].tokens, context=[random_ids(40, 40)], prefix=[5, 6])]
    assert cepe.generate_batch(swapped, 5)[1] == cepe.generate(swapped[1], 5)


def test_label_log_likelihoods(dec):
    prompt = Request(tokens=random_ids(10, 26))
    cands = [[5], [6, 7]]
    out = label_log_likelihoods(Truncated(dec), prompt, cands)
    for (ll, n), c in zip(out, cands):
        assert n == len(c)
        assert ll == pytest.approx(float(direct(dec, prompt.tokens + c, 10).sum()), abs=1e-5)


@pytest.mark.parametrize("encoder", ["decoder", "bert"])
def test_batched_candidate_scoring_equals_one_at_a_time(encoder):
    """label_log_likelihoods scores all candidates in one left-padded batch; each equals the
    candidate scored alone through `score`, for every method (CEPE's shared context encoded once)."""
    from dataclasses import replace

    model = tiny_cepe("llama", encoder, init="copy")
    names = ["cepe", "truncated", "full", "full-linear", "replug", "streamingllm"]
    methods = build_methods(
        names, model, window=16, to_encoder=(lambda ids: [t % 70 for t in ids]) if encoder == "bert" else None
    )
    prompt = Request(tokens=random_ids(9, 50), context=[random_ids(11, 51), random_ids(5, 52)], prefix=[7, 8])
    cands = [[5], [6, 7, 8], [9, 10]]
    for name, m in methods.items():
        got = label_log_likelihoods(m, prompt, cands)
        for (ll, n), c in zip(got, cands):
            alone = score(m, replace(prompt, tokens=prompt.tokens + c, score_start=len(prompt.tokens)))
            assert n == len(c)
            assert ll == pytest.approx(float(alone.sum()), abs=1e-4), name
    with pytest.raises(ValueError, match="empty candidate"):
        label_log_likelihoods(methods["truncated"], prompt, [[5], []])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_full_reuses_shared_context_keys_values(family):
    """`full` keeps the keys/values of a long shared prefix + context (ICL's demonstrations) and runs
    only each row's tokens: same log-likelihoods as the whole sequence, for a second prompt too
    (gemma3: past its sliding window of 64)."""
    from dataclasses import replace

    m = Full(tiny_decoder(family))
    ctx = [random_ids(50, 60), random_ids(30, 61)]
    cands = [[5], [6, 7, 8], [9, 10]]
    for seed in (62, 63):
        prompt = Request(tokens=random_ids(9, seed), context=ctx, prefix=[5, 6])
        got = label_log_likelihoods(m, prompt, cands)
        for (ll, _), c in zip(got, cands):
            alone = score(m, replace(prompt, tokens=prompt.tokens + c, score_start=len(prompt.tokens)))
            assert ll == pytest.approx(float(alone.sum()), abs=1e-4)
        assert m._prefix.key == tuple([5, 6] + ctx[0] + ctx[1])


def test_build_methods_errors(dec):
    with pytest.raises(ValueError, match="needs a CEPE model"):
        build_methods(["cepe"], None, dec)
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(["nope"], None, dec)
    gemma = tiny_decoder("gemma3")
    with pytest.raises(ValueError, match="StreamingLLM"):
        score(StreamingLLM(gemma, window=8), Request(tokens=random_ids(20, 27), score_start=15))
    _ = copy  # keep import for readers extending the tests
