"""A byte-level tokenizer for tiny random models: any text, no download, 260 ids."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<mask>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """ids 0-3: <pad> <s> </s> <mask>; ids 4-259: the 256 bytes. A fast tokenizer, so it gives
    character offsets like the real ones (the token store needs them)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's printable stand-ins for bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", mask_token="<mask>"
    )

