"""The token store with the real tokenizers (SmolLM2's byte-level BPE, MiniLM's uncased
WordPiece) on a real book: the encoder's context is exactly the text before the decoder window."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import words

from cepe import assets
from cepe.data import DataConfig, build_data

pytestmark = pytest.mark.real
BOOK = Path(__file__).resolve().parents[3] / "shared" / "data" / "books" / "austen" / "persuasion.txt"


def test_minilm_context_precedes_the_smollm2_window(tmp_path):
    if not (assets.is_installed("smollm2-135m") and assets.is_installed("minilm-l6")):
        pytest.skip("assets not installed: run `cepe assets`")
    if not BOOK.is_file():
        pytest.skip("../shared/data is not here")
    from transformers import AutoTokenizer

    dec_tok = AutoTokenizer.from_pretrained(str(assets.locate("smollm2-135m")))
    enc_tok = AutoTokenizer.from_pretrained(str(assets.locate("minilm-l6")))
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "persuasion.txt").write_text(BOOK.read_text()[:60000])
    cfg = DataConfig(
        train=[str(tmp_path / "books")], cache_dir=str(tmp_path / "cache"), context_tokens=512, decoder_tokens=128
    )
    data = build_data(cfg, dec_tok, enc_tok, progress=False)
    text = (tmp_path / "books" / "persuasion.txt").read_text()
    store = data.train.builders["long_document"].corpus.decoder
    for i in range(5):
        s = data.train[i]
        c = store.char_start(s["doc"], s["position"])
        assert text[c:].startswith(dec_tok.decode(s["input_ids"].tolist()))
        (context,) = s["context"]
        assert len(context) == 512
        ctx_words = words(enc_tok.decode(context.tolist()))
        # MiniLM lower-cases and drops accents; compare the last 40 words
        assert ctx_words[-40:] == words(text[:c])[-40:]
