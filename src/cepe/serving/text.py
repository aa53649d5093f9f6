"""Tokenizing on the HTTP side, apart from the model worker.

Handlers tokenize prompts and raw documents with their own copies of the tokenizers, behind their
own lock: a long text never holds the lock the model worker needs to decode its streams (fast
tokenizers are not re-entrant, so each copy is used by one thread at a time). Before tokenizing, a
text is measured in characters: no token covers more than `chars_per_token` characters, so a text
longer than `limit * chars_per_token` characters cannot fit `limit` tokens and is refused at once,
whatever its size. A long document is tokenized in pieces cut at single spaces between words
(where every supported pre-tokenizer splits anyway, so the ids are the same as in one call), the
lock released between pieces, and reading stops once the limit is passed.
"""

from __future__ import annotations

import copy
import re
import threading

from .protocol import ApiError

PIECE_CHARS = 1 << 16  # a long document is tokenized this many characters at a time
_CUT = re.compile(r"(?<=\S) (?=\S)")  # a single space between two words


def chars_per_token(tokenizer) -> int:
    """The most characters one token can cover: the longest vocabulary entry, or the longest word a
    WordPiece model maps to one unknown token."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    return max(longest, int(getattr(backend, "max_input_chars_per_word", 0) or 0), 1)


class TextTokenizers:
    """The decoder's and the encoder's tokenizers, copied for the HTTP handlers."""

    def __init__(self, decoder_tokenizer, encoder_tokenizer):
        self.decoder, self.encoder = copy.deepcopy(decoder_tokenizer), copy.deepcopy(encoder_tokenizer)
        self.decoder_chars, self.encoder_chars = chars_per_token(self.decoder), chars_per_token(self.encoder)
        self.lock = threading.Lock()

    def check_chars(
        self, n_chars: int, limit_tokens: int, per_token: int, what: str, limit_name: str, code: str
    ) -> None:
        """413 when `n_chars` characters cannot be `limit_tokens` tokens or fewer."""
        most = limit_tokens * per_token
        if n_chars > most:
            raise ApiError(413, f"{what} has {n_chars} characters: more than {limit_tokens} tokens ({limit_name}) "
                           f"can hold (at most {most} characters)", code=code)

    def prompt(self, text: str, limit_tokens: int, limit_name: str) -> list[int]:
        """Decoder token ids of a prompt (no special tokens), refused first if it is far too long."""
        self.check_chars(len(text), limit_tokens, self.decoder_chars, "prompt", limit_name, "prompt_too_large")
        with self.lock:
            return self.decoder(text, add_special_tokens=False)["input_ids"]

    def document(self, text: str, limit_tokens: int | None = None) -> list[int]:
        """Encoder token ids of a document (no special tokens); callers check `check_chars` first.
        Past `limit_tokens`, stops early: the result is then longer than the limit, not complete."""
        ids: list[int] = []
        for piece in _pieces(text):
            with self.lock:
                ids += self.encoder(piece, add_special_tokens=False)["input_ids"]
            if limit_tokens is not None and len(ids) > limit_tokens:
                break
        return ids


def _pieces(text: str):
    """`text` in consecutive pieces of about `PIECE_CHARS` characters, each after the first starting
    at a single space between two words (one piece when there is no such space)."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _CUT.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.start()
    yield text[start:]
