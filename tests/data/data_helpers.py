"""Shared pieces of the data tests: a small corpus on disk and a word-level encoder tokenizer that
segments text differently from the byte-level decoder tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def text_of(seed: int, n_words: int) -> str:
    """Deterministic prose: words, commas and line breaks."""
    out = []
    for i in range(n_words):
        w = WORDS[(seed * 7 + i * 13 + i // 5) % len(WORDS)]
        out.append(w + ("," if i % 7 == 3 else "") + ("\n" if i % 11 == 10 else " "))
    return "".join(out)


def write_corpus(root: Path, sizes: dict[str, int]) -> Path:
    """Files `name -> number of words` under `root` (names may hold sub-folders)."""
    for i, (name, n) in enumerate(sizes.items()):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text_of(i, n))
    return root


def word_tokenizer():
    """A fast WordLevel tokenizer over WORDS (+ punctuation), lower-casing, with BERT-style
    [CLS]/[SEP]/[MASK]/[PAD]: the 'encoder tokenizer' of the tests."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + WORDS + [",", ".", "!", "?"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())
