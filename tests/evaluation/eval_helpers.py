"""Shared pieces of the evaluation tests: a real (character-level) HF tokenizer over the tiny
models' 96-token vocabulary, and random ids."""

from __future__ import annotations

import string

import torch

CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " .,:;?!'-\n"  # ids 3..74
MORE_CHARS = "()="  # ids 76..78 (RULER's prompts)
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer():
    """A `PreTrainedTokenizerFast`: one id per character, decode joins them back exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}, "<unk>": 3 + len(CHARS)}
    # characters added later go after <unk>, so that the ids above stay as they were
    vocab.update({c: 4 + len(CHARS) + i for i, c in enumerate(MORE_CHARS)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def random_ids(n: int, seed: int = 0, low: int = 3, high: int = 90) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=g).tolist()


WORDS = ("apple river stone cloud garden lamp music winter paper horse bread silver forest candle "
         "window ocean pencil mirror tiger basket").split()


def sentence_text(n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "."
