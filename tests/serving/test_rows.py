"""serving/rows.py: incremental detokenisation equals a full decode; a step's events in one wake-up."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from serving_harness import tiny_serving_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cepe.serving.rows import Detokenizer, Outbox, TextState

SMOLLM2 = Path.home() / ".cache/cepe/models/smollm2-135m"


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style pieces: the decoder turns '▁' into spaces and strips the text's first one."""
    pieces = ["<unk>", "</s>", "▁the", "▁cat", "s", "▁sat", "▁on", "▁mat", ".", "▁", "ing"]
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def tokenizers():
    yield "chars", tiny_serving_model().tokenizer
    yield "metaspace", metaspace_tokenizer()
    if (SMOLLM2 / "tokenizer.json").exists():
        yield "smollm2", AutoTokenizer.from_pretrained(SMOLLM2)


@pytest.mark.parametrize("name,tok", list(tokenizers()), ids=lambda x: x if isinstance(x, str) else "")
def test_incremental_text_equals_full_decode(name, tok):
    detok = Detokenizer(tok, threading.Lock())
    assert detok.incremental
    rng = random.Random(0)
    vocab = len(tok)
    # random ids: special tokens, byte pieces that are not valid UTF-8 alone, ordinary words
    states, windowed = [TextState() for _ in range(6)], 0
    for _ in range(80):
        for s in states:  # low ids more often: specials and (byte-level) pieces of characters
            s.ids.append(rng.randrange(min(300, vocab)) if rng.random() < 0.3 else rng.randrange(vocab))
        detok.update(states)
        for s in states:
            assert s.current == tok.decode(s.ids, skip_special_tokens=True)
            windowed += s.read == len(s.ids)
    assert windowed > 0.7 * 80 * len(states)  # mostly from short windows, not full decodes


def test_incremental_rows_decode_windows_not_everything():
    tok = tiny_serving_model().tokenizer
    detok = Detokenizer(tok, threading.Lock())
    s = TextState()
    s.ids += tok("hello world", add_special_tokens=False).input_ids
    detok.update([s])
    for ch in " again":
        s.ids += tok(ch, add_special_tokens=False).input_ids
        detok.update([s])
        assert s.read == len(s.ids) and len(s.ids) - s.prefix <= 2  # a window of the last step's tokens
    assert s.current == "hello world again"


def test_cleanup_tokenizer_decodes_in_full():
    tok = metaspace_tokenizer()
    tok.clean_up_tokenization_spaces = True
    assert not Detokenizer(tok, threading.Lock()).incremental


class _CountingLoop:
    def __init__(self):
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1
        fn(*args)


class _Sink(list):
    put_nowait = list.append


def test_outbox_delivers_a_step_in_one_call_per_loop():
    a, b = _CountingLoop(), _CountingLoop()
    sa, sb = _Sink(), _Sink()
    box = Outbox()
    for i in range(5):
        box.put(a, sa, (0, ("delta", str(i))))
        box.put(b, sb, (1, ("delta", str(i))))
    assert a.calls == b.calls == 0 and not sa
    box.flush()
    assert a.calls == b.calls == 1
    assert [e[1][1] for e in sa] == ["0", "1", "2", "3", "4"] and len(sb) == 5
    box.flush()
    assert a.calls == 1  # nothing pending: no wake-up
