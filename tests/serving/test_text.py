"""Handler-side tokenizing: the character bound refuses without tokenizing, and a long document
tokenized in pieces gives the same ids as one call (real tokenizers, when installed)."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
from serving_harness import tiny_serving_model

from cepe import assets
from cepe.serving.protocol import ApiError
from cepe.serving.text import PIECE_CHARS, TextTokenizers, _pieces, chars_per_token

BOOKS = "/work/shared/data/books/austen/*.txt"


def test_pieces_cut_between_words_and_cover_the_text():
    text = ("word " * 10 + "x" * 50 + "  \n ") * (3 * PIECE_CHARS // 100)
    pieces = list(_pieces(text))
    assert "".join(pieces) == text and len(pieces) > 2
    for p in pieces[1:]:
        assert p[0] == " " and not p[1].isspace()
    assert list(_pieces("z" * (3 * PIECE_CHARS))) == ["z" * (3 * PIECE_CHARS)]  # no space: one piece


def test_character_bound_and_early_stop():
    model = tiny_serving_model()
    text = TextTokenizers(model.tokenizer, model.encoder_tokenizer)
    assert text.decoder_chars == chars_per_token(model.tokenizer) == 5  # "<pad>": one token, 5 characters
    with pytest.raises(ApiError) as e:
        text.prompt("x" * 51, 10, "--limit")
    assert e.value.status == 413 and "51 characters" in e.value.message
    assert len(text.prompt("x" * 10, 10, "--limit")) == 10
    doc = "ab " * PIECE_CHARS
    assert text.document(doc) == model.encoder_tokenizer(doc, add_special_tokens=False)["input_ids"]
    early = text.document(doc, limit_tokens=100)
    assert 100 < len(early) < len(doc) // 2  # stopped after the first piece


@pytest.mark.real
@pytest.mark.parametrize("name", ["minilm-l6", "smollm2-135m"])
def test_pieces_give_the_ids_of_one_call(name):
    if not assets.is_installed(name):
        pytest.skip("assets not installed: run `cepe assets`")
    from transformers import AutoTokenizer

    books = sorted(glob.glob(BOOKS))
    if not books:
        pytest.skip("shared data not present")
    tok = AutoTokenizer.from_pretrained(str(assets.locate(name)))
    sample = Path(books[0]).read_text(encoding="utf-8")[: 4 * PIECE_CHARS]
    text = TextTokenizers(tok, tok)
    assert text.document(sample) == tok(sample, add_special_tokens=False)["input_ids"]
