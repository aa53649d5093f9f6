"""The one decoding loop (cepe.model.decoding): padding, positions, prefill/step, per-row sampling."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_cepe, tiny_decoder

from cepe.model import decoding
from cepe.model.decoding import Batch, Row, Sampler, SamplingParams, decode, greedy, left_pad, pick, positions


def _full_forward_greedy(model, prompt: list[int], n: int, **kw) -> list[int]:
    """Reference: one uncached forward over the whole sequence per new token."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_batch_equals_uncached_loop(family):
    """Left-padded rows of different lengths, cached steps: each row's tokens are those of a
    full forward per token on that row alone."""
    dec = tiny_decoder(family)
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    got = greedy(dec, prompts, 6)
    assert got == [_full_forward_greedy(dec, p, 6) for p in prompts]


def test_greedy_cepe_with_context_equals_uncached_loop():
    model = tiny_cepe("llama", encoder="decoder")
    ctx = model.encode_context([[20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    got = greedy(model, [[3, 4, 5]], 5, context=ctx)[0]
    assert got == _full_forward_greedy(model, [3, 4, 5], 5, context=ctx)


def test_stop_ids_and_limits_per_row():
    dec = tiny_decoder()
    free = greedy(dec, [[3, 4, 5]], 6)[0]
    stop = free[2]
    cut = greedy(dec, [[3, 4, 5]], 6, stop_ids={stop})[0]
    assert cut == free[: free.index(stop)]
    rows = decode(dec, [Row([3, 4, 5], 2), Row([3, 4, 5], 6)])
    assert [r.tokens for r in rows] == [free[:2], free] and [r.finish_reason for r in rows] == ["length", "length"]
    assert greedy(dec, [[3]], 0) == [[]]


def test_keep_drops_rows_between_steps():
    """A row's state is separable: dropping a row mid-decoding leaves the others' tokens unchanged."""
    dec = tiny_decoder()
    prompts = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
    want = greedy(dec, prompts, 5)
    batch = Batch(dec, pad_id=0)
    logits = batch.prefill(prompts)
    out = [[] for _ in prompts]
    live = [0, 1, 2]
    for step in range(5):
        tokens = logits.argmax(-1)
        for i, t in zip(live, tokens.tolist()):
            out[i].append(t)
        if step == 1:  # drop the middle row
            batch.keep([0, 2])
            tokens, live = tokens[[0, 2]], [0, 2]
        logits = batch.step(tokens)
    assert out[0] == want[0] and out[2] == want[2] and out[1] == want[1][:2]


def test_sampling_is_per_row_and_seeded():
    dec = tiny_decoder()
    p = [3, 4, 5]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    alone = decode(dec, [Row(p, 8, seeded)])[0].tokens
    mixed = decode(dec, [Row([9, 10], 8, SamplingParams(0.7, seed=1)), Row(p, 8, seeded), Row(p, 8)])
    assert mixed[1].tokens == alone  # same seed, same tokens, whatever shares the batch
    assert mixed[2].tokens == greedy(dec, [p], 8)[0]
    other = decode(dec, [Row(p, 8, SamplingParams(1.0, seed=8))])[0].tokens
    assert other != alone  # the seed matters (a fixed model and prompt: these two differ)


def test_extreme_settings_neither_fail_nor_touch_other_rows():
    """Temperature 1e-50 is argmax (not NaN); a seed beyond 64 bits is folded, not an error;
    neither changes what the other rows get."""
    dec = tiny_decoder()
    p, q = [3, 4, 5], [6, 7]
    normal = SamplingParams(temperature=0.8, top_k=20, seed=3)
    want = decode(dec, [Row(q, 6, normal)])[0].tokens
    rows = decode(dec, [Row(p, 6, SamplingParams(temperature=1e-50, seed=10**40)), Row(q, 6, normal),
                        Row(p, 6, SamplingParams(temperature=2.0, top_p=1e-30, seed=-(2**70)))])
    assert rows[0].tokens == greedy(dec, [p], 6)[0]  # a vanishing temperature is greedy
    assert rows[2].tokens == greedy(dec, [p], 6)[0]  # top_p -> 0 keeps only the most likely token
    assert rows[1].tokens == want


def test_sampler_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert {top1(logits) for _ in range(20)} == {1}
    top2 = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {top2(logits) for _ in range(200)} == {1, 2}
    masked = torch.tensor([float("-inf"), 1.0, 1.0, float("-inf")])
    assert {Sampler(SamplingParams(1e-50, seed=s))(masked) for s in range(20)} <= {1, 2}
    assert pick(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), [None, Sampler()]).tolist() == [1, 0]
    for bad in (dict(temperature=-1.0), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_cache_keyword_follows_the_decoder():
    dec = tiny_decoder()
    kw = decoding.cache_keyword(dec)
    assert kw in ("cache", "past_key_values") and decoding.cache_keyword(tiny_cepe()) == kw
    assert decoding.new_cache(dec).get_seq_length() == 0 and VOCAB == dec.config.vocab_size


def _assert_pads(batch: Batch) -> None:
    """The host's record of each row's left padding is the mask's leading zeros."""
    leading = [int(row.tolist().index(1)) if 1 in row.tolist() else len(row) for row in batch.mask]
    assert batch.pads == leading


def test_step_without_padding_gives_the_masked_logits():
    """Unpadded rows step without a mask (no device read of it): the logits are those with the
    all-ones mask."""
    dec = tiny_decoder()
    with torch.no_grad():
        batch = Batch(dec)
        batch.prefill([[3, 4, 5], [6, 7, 8]])
        assert batch.pads == [0, 0]
        cache_copy = [(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers]
        got = batch.step(torch.tensor([9, 10]))
        for layer, (k, v) in zip(batch.cache.layers, cache_copy):
            layer.keys, layer.values = k, v
        want = decoding.forward(dec, torch.tensor([[9], [10]]), batch.cache, attention_mask=batch.mask,
                                position_ids=torch.tensor([[3], [3]])).logits[:, -1].float()
    assert torch.equal(got, want)


def test_join_adds_rows_mid_way_with_their_own_lengths():
    """Rows prefilled on their own join a running batch between steps (its cache and theirs are
    left-padded to a common length), leave it at different times, and each row's tokens are those
    it decodes alone; leaving trims the columns nobody attends to any more."""
    dec = tiny_decoder()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15], [16]]
    want = [greedy(dec, [p], 8)[0] for p in prompts]
    got = {}
    with torch.no_grad():
        batch = Batch(dec)
        rows = {0: batch.prefill([prompts[0]]).argmax(-1)}
        order, produced = [0], {0: []}
        for step in range(20):
            if step in (2, 5):  # one long-prompt row is running; short ones arrive later
                new = [1] if step == 2 else [2, 3]
                joiner = Batch(dec)
                first = joiner.prefill([prompts[i] for i in new]).argmax(-1)
                batch.join(joiner)
                _assert_pads(batch)
                for i, tok in zip(new, first.tolist()):
                    order.append(i)
                    rows[i] = tok
                    produced[i] = []
            for i in order:
                produced[i].append(int(rows[i]))
            done = [i for i in order if len(produced[i]) == 8 or (i == 1 and len(produced[i]) == 3)]
            for i in done:
                got[i] = produced[i]
            keep = [k for k, i in enumerate(order) if i not in done]
            if done:
                width = batch.length
                batch.keep(keep)
                _assert_pads(batch)
                order = [order[k] for k in keep]
                if 0 in done:  # the longest row left: its left padding is gone
                    assert batch.length < width and bool(batch.mask[:, 0].any())
            if not order:
                break
            logits = batch.step(torch.tensor([rows[i] for i in order]))
            for i, tok in zip(order, logits.argmax(-1).tolist()):
                rows[i] = tok
    assert got == {0: want[0], 1: want[1][:3], 2: want[2], 3: want[3]}


def test_join_with_cepe_context_rows():
    """CEPE rows with their own contexts, joined: the context batch is the caller's (here rebuilt
    by hand, right-padded); tokens equal each row decoded alone."""
    model = tiny_cepe("llama", encoder="decoder")
    docs = [[20 + i for i in range(10)], [40, 41, 42]]
    ctxs = [model.encode_context([d]) for d in docs]
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10]]
    want = [greedy(model, [p], 5, context=c)[0] for p, c in zip(prompts, ctxs)]
    s = max(c.hidden_states.shape[1] for c in ctxs)
    padded = [torch.nn.functional.pad(c.hidden_states, (0, 0, 0, s - c.hidden_states.shape[1])) for c in ctxs]
    masks = [torch.nn.functional.pad(c.attention_mask, (0, s - c.attention_mask.shape[1])) for c in ctxs]
    both = type(ctxs[0])(torch.cat(padded), torch.cat(masks), ctxs[0].encoder_hash)
    with torch.no_grad():
        batch = Batch(model, context=ctxs[0])
        toks = [[int(batch.prefill([prompts[0]]).argmax(-1))]]
        batch.kwargs["context"] = ctxs[0]
        toks[0].append(int(batch.step(torch.tensor([toks[0][-1]])).argmax(-1)))
        joiner = Batch(model, context=ctxs[1])
        toks.append([int(joiner.prefill([prompts[1]]).argmax(-1))])
        batch.join(joiner)
        batch.kwargs["context"] = both
        while len(toks[1]) < 5:
            nxt = batch.step(torch.tensor([toks[0][-1], toks[1][-1]])).argmax(-1).tolist()
            for t, n in zip(toks, nxt):
                t.append(n)
    assert toks[0][:5] == want[0] and toks[1] == want[1]
