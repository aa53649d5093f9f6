"""Gemma-3-270m as a base decoder: the asset (a GGUF in four PyPI parts), <bos> before every
training window, and the perplexity the model should have with it (skips unless installed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cepe import assets
from cepe.data import Collator, DataConfig, build_data
from cepe.data.pipeline import decoder_bos

BOOK = Path(__file__).resolve().parents[3] / "shared" / "data" / "books" / "austen" / "persuasion.txt"
ENGLISH = (
    "The history of the city dates back to the Roman period, when a small settlement was founded on the banks "
    "of the river. Over the following centuries it grew into an important trading centre, and by the Middle Ages "
    "it had become one of the largest towns in the region. Today it is known for its university, its museums "
    "and its old churches."
)


def test_gemma_asset_is_assembled_from_its_parts_in_order():
    a = assets.ASSETS["gemma3-270m"]
    assert assets.canonical("gemma-3-270m") == "gemma3-270m" and not a.default and a.kind == "decoder"
    members = [m for _, m in a.parts]
    assert members == sorted(members) and [m[-2:] for m in members] == ["00", "01", "02", "03"]
    assert all(p.endswith("==1.0.0") for p, _ in a.parts) and len(a.sha256) == 64
    # a bare `cepe assets` keeps installing only the two default assets
    assert sorted(n for n, x in assets.ASSETS.items() if x.default) == ["minilm-l6", "smollm2-135m"]


def _tokenizer(words: bool, bos: bool):
    """A word-level (merges kept) or character-level (merges lost) tokenizer, with or without
    <bos> added by its post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = sorted(set(assets.PROBE.replace(",", " ").replace(".", " ").split() if words else assets.PROBE))
    vocab = {p: i + 3 for i, p in enumerate(pieces)} | {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if words else pre_tokenizers.Split("", "isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def test_a_misread_gguf_tokenizer_is_refused():
    # transformers 5.17 reads Gemma-3's GGUF tokenizer per character and without <bos>
    assert assets.check_tokenizer(_tokenizer(words=True, bos=True), add_bos=True) is None
    assert assets.check_tokenizer(_tokenizer(words=True, bos=False), add_bos=False) is None
    assert "merges lost" in assets.check_tokenizer(_tokenizer(words=False, bos=True), add_bos=True)
    assert "add_bos_token=True" in assets.check_tokenizer(_tokenizer(words=True, bos=False), add_bos=True)
    assert "add_bos_token=False" in assets.check_tokenizer(_tokenizer(words=True, bos=True), add_bos=False)


@pytest.mark.real
def test_gemma_reads_bos_first(tmp_path):
    if not assets.is_installed("gemma3-270m"):
        pytest.skip("gemma3-270m not installed: run `cepe assets gemma3-270m`")
    from cepe.model.loading import load_decoder

    model, tok = load_decoder("gemma3-270m")
    assert assets.check_tokenizer(tok, add_bos=True) is None
    bos = decoder_bos(DataConfig(train=["x"]), tok)
    assert bos == tok.bos_token_id  # auto: Gemma's tokenizer adds <bos> itself
    ids = tok(ENGLISH, add_special_tokens=False)["input_ids"]

    def ppl(seq: list[int], scored_from: int) -> float:
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, scored_from - 1 : -1].float()
        return math.exp(torch.nn.functional.cross_entropy(logits, torch.tensor(seq[scored_from:])).item())

    with_bos, without = ppl([bos] + ids, 2), ppl(ids, 1)
    assert with_bos < 10 and without > 3 * with_bos, (with_bos, without)  # measured 7.2 vs 186 (ASSETS.md: 6.6 vs 68.7)
    if not BOOK.is_file():
        return
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "persuasion.txt").write_text(BOOK.read_text()[:20000])
    cfg = DataConfig(train=[str(tmp_path / "books")], cache_dir=str(tmp_path / "cache"), context_tokens=256,
                     decoder_tokens=64, decoder_windows=[32, 64], mixture={"long_document": 1.0})
    data = build_data(cfg, tok, None, progress=False)
    batch = Collator(32, [], [], 0, tok.pad_token_id)([data.train[i] for i in range(4)])
    assert (batch["input_ids"][:, 0] == bos).all() and (batch["labels"][:, 0] == -100).all()
