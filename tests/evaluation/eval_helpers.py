"""Shared pieces of the evaluation tests: a character tokenizer over the tiny models' vocabulary."""

from __future__ import annotations

import string

import torch

CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " .,:;?!'-\n"  # 72 symbols


class CharTokenizer:
    """One id per character (ids 3..74 of the tiny 96-token vocabulary); unknown chars -> ' '."""

    pad_token_id = 0
    eos_token_id = 2

    def __init__(self):
        self.to_id = {c: i + 3 for i, c in enumerate(CHARS)}
        self.to_char = {i: c for c, i in self.to_id.items()}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.to_id.get(c, self.to_id[" "]) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.to_char.get(int(i), "") for i in ids)


def random_ids(n: int, seed: int = 0, low: int = 3, high: int = 90) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()
