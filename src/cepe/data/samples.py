"""Sample builders: what the encoder and the decoder read in one training example.

A sample is a dict:
    input_ids (D,), labels (D,)  decoder tokens; labels -100 where no loss is taken
    context                      list of 1-D arrays of encoder token ids; each is chunked on its own
    teacher_prefix (T,)          decoder tokens the online teacher reads before `input_ids` (the
                                 tail of the same context, in the decoder's tokens)
    kind, index                  builder name and global sample index
    doc, position                where the window comes from (text builders)

Every sample is a pure function of (seed, split, index): the stream needs no state beyond its
position, so resuming is exact and processes can share a global batch without communicating.
With `data.decoder_windows`, the window D is a function of (seed, split, index // window_block)
alone, so a block of consecutive samples (one micro-batch) shares it and the collator pads
nothing; the other builders (retrieval, copying, demonstrations) live in `cepe.data.builders`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.context import chunk_token_ids, pad_chunk_batch
from .config import DataConfig
from .synthetic import SyntheticConfig, make_example, value_ids
from .token_store import TokenStore


@dataclass
class Corpus:
    """Paired token stores (one corpus, two tokenizers; the same store twice when they agree)
    and the documents of one split."""

    decoder: TokenStore
    encoder: TokenStore
    docs: np.ndarray  # document indices of this split

    def decoder_tokens(self, doc: int, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.decoder.doc_tokens(doc)[lo:hi], dtype=np.int64)

    def encoder_span(self, doc: int, char_lo: int, char_hi: int) -> np.ndarray:
        """Encoder tokens of `doc` whose text ends in (char_lo, char_hi]."""
        a = self.encoder.tokens_before(doc, char_lo)
        b = self.encoder.tokens_before(doc, char_hi)
        return np.asarray(self.encoder.doc_tokens(doc)[a:b], dtype=np.int64)


class TooShort(ValueError):
    """No document of a split is long enough for a builder."""


def window_table(docs: np.ndarray, first: np.ndarray, lens: np.ndarray, d: int) -> tuple[tuple | None, np.ndarray]:
    """Windows of d decoder tokens in `docs` (lengths `lens`), starting at `first` or later (-1: no
    window) -> ((docs, first, cumulative window counts) of the documents with one, or None; that
    mask), the table `pick_window` draws from."""
    windows = np.where(first >= 0, lens - d - first + 1, 0)
    ok = windows > 0
    return ((docs[ok], first[ok], np.cumsum(windows[ok])) if ok.any() else None), ok


class _WindowBuilder:
    """Shared part of the text builders: pick a decoder window [p, p+D) uniformly among all
    valid windows of all eligible documents (documents weighted by their number of windows).
    One table per window size in `data.decoder_windows` (a size no document of the split holds is
    served by the largest one that fits)."""

    kind = ""

    def __init__(self, corpus: Corpus, cfg: DataConfig, teacher_tokens: int = 0):
        self.corpus, self.cfg, self.D, self.teacher_tokens = corpus, cfg, cfg.decoder_tokens, teacher_tokens
        first = np.array([self.first_position(int(d)) for d in corpus.docs], dtype=np.int64)
        lens = corpus.decoder.doc_lens()[corpus.docs] if len(corpus.docs) else np.zeros(0, np.int64)
        self.longest = int(lens.max()) if len(lens) else 0
        self.tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for d in sorted(set(cfg.windows) | {self.D}):
            table, ok = window_table(corpus.docs, first, lens, d)
            if table is not None:
                self.tables[d] = table
            if d == min(cfg.windows):
                self.skipped_short = int((~ok).sum())
        if min(cfg.windows) not in self.tables:
            self.D = min(cfg.windows)
            raise TooShort(
                f"no document is long enough for the {self.kind} builder ({self.requirement()}); "
                f"{self.skipped_short} of {len(corpus.docs)} documents skipped as too short "
                f"(longest: {self.longest} decoder tokens)"
            )
        self.docs, self.first, self.cum = self.tables[self.fit(self.D)]

    def fit(self, d: int) -> int:
        """The largest window size <= d that some document holds (else the smallest)."""
        sizes = [k for k in self.tables if k <= d]
        return max(sizes) if sizes else min(self.tables)

    def requirement(self) -> str:
        return f"needs {self.D} decoder tokens"

    def first_position(self, doc: int) -> int:
        """Earliest window start in `doc`, or -1 if the document cannot give a sample."""
        return 0

    def pick_window(self, rng: np.random.Generator, d: int | None = None, table=None) -> tuple[int, int]:
        """(document, start) uniform over the windows of `table` (default: size d's, or D's)."""
        if table is None:
            table = self.tables[self.fit(d)] if d is not None else (self.docs, self.first, self.cum)
        docs, first, cum = table
        r = int(rng.integers(int(cum[-1])))
        j = int(np.searchsorted(cum, r, side="right"))
        offset = r - (int(cum[j - 1]) if j else 0)
        return int(docs[j]), int(first[j]) + offset

    def window(self, doc: int, p: int, d: int | None = None) -> dict[str, Any]:
        ids = self.corpus.decoder_tokens(doc, p, p + (d or self.D))
        return {"input_ids": ids, "labels": ids.copy(), "doc": doc, "position": p}

    def teacher_prefix(self, doc: int, p: int) -> np.ndarray:
        lo = max(0, p - self.teacher_tokens)
        return np.asarray(self.corpus.decoder.doc_tokens(doc)[lo:p], dtype=np.int64)


class WarmupBuilder(_WindowBuilder):
    """The encoder reads the decoder's own tokens, in chunks: cross-attention learns to copy."""

    kind = "warmup"

    def sample(self, rng: np.random.Generator, d: int | None = None) -> dict[str, Any]:
        d = self.fit(d or self.D)
        doc, p = self.pick_window(rng, d)
        dec = self.corpus.decoder
        c_lo, c_hi = dec.char_start(doc, p), dec.char_start(doc, p + d)
        # the teacher reads the window as is: the "context" is the window itself
        return {
            **self.window(doc, p, d),
            "context": [self.corpus.encoder_span(doc, c_lo, c_hi)],
            "teacher_prefix": np.zeros(0, np.int64),
        }


def log_uniform(rng: np.random.Generator, lo: int, hi: int, q: float | None = None) -> int:
    """An integer drawn log-uniformly in [lo, hi]: short and long contexts alike. With `q` in
    [0, 1) the draw is that quantile instead (the generator still advances by one draw, so the
    rest of a sample does not move)."""
    x = rng.uniform(np.log(lo), np.log(hi))
    if q is not None:
        x = np.log(lo) + q * (np.log(hi) - np.log(lo))
    return int(round(np.exp(x)))


class LongDocumentBuilder(_WindowBuilder):
    """The encoder reads up to N tokens that precede the decoder window (at least
    `min_context_tokens`); the decoder reads the next D tokens; loss on the decoder tokens."""

    kind = "long_document"
    draws_context = True  # takes `context_q`: SampleStream shares it across a block

    def __init__(self, corpus: Corpus, cfg: DataConfig, teacher_tokens: int = 0):
        self.N = cfg.context_tokens
        self.min_ctx = cfg.min_context_tokens if cfg.min_context_tokens is not None else cfg.context_tokens
        if not 1 <= self.min_ctx <= self.N:
            raise ValueError(f"data.min_context_tokens must be in [1, context_tokens={self.N}], got {self.min_ctx}")
        super().__init__(corpus, cfg, teacher_tokens)
        self._fill_tables: dict[tuple[int, int], tuple | None] = {}

    def requirement(self) -> str:
        return f"needs {self.min_ctx} encoder tokens of context, then {self.D} decoder tokens"

    def first_position(self, doc: int, need: int | None = None) -> int:
        need = need or self.min_ctx
        enc_ends = self.corpus.encoder.doc_ends(doc)
        if len(enc_ends) < need:
            return -1
        # first decoder position whose preceding text holds `need` encoder tokens
        c_min = int(enc_ends[need - 1])
        return int(np.searchsorted(self.corpus.decoder.doc_ends(doc), c_min, side="left")) + 1

    def context_length(self, rng: np.random.Generator, q: float | None = None) -> int:
        """Encoder tokens this sample's context may hold (`data.context_draw`); `q`: the
        quantile of the draw, shared by a block of samples (context_draw "block")."""
        if self.cfg.context_draw == "max" or self.min_ctx == self.N:
            return self.N
        return log_uniform(rng, self.min_ctx, self.N, q)

    def table_for_context(self, d: int, n: int) -> tuple:
        """The windows of size d with at least `need` encoder tokens before them, `need` the
        largest power of two <= n (>= min_context_tokens) that some document holds: a drawn length
        is read whole (or at least half of it) instead of being cut by where the window fell."""
        need = max(self.min_ctx, 1 << max(int(n).bit_length() - 1, 0))
        while need > self.min_ctx:
            if (d, need) not in self._fill_tables:
                first = np.array([self.first_position(int(x), need) for x in self.corpus.docs], dtype=np.int64)
                lens = self.corpus.decoder.doc_lens()[self.corpus.docs]
                self._fill_tables[(d, need)] = window_table(self.corpus.docs, first, lens, d)[0]
            if self._fill_tables[(d, need)] is not None:
                return self._fill_tables[(d, need)]
            need //= 2
        return self.tables[d]

    def sample(self, rng: np.random.Generator, d: int | None = None, context_q: float | None = None) -> dict[str, Any]:
        d = self.fit(d or self.D)
        if self.cfg.context_fill:  # the length first, then a window that has it before it
            n = self.context_length(rng, context_q)
            doc, p = self.pick_window(rng, d, self.table_for_context(d, n))
        else:  # the window first; a context longer than the text before it is cut short
            doc, p = self.pick_window(rng, d)
            n = self.context_length(rng, context_q)
        c = self.corpus.decoder.char_start(doc, p)
        b = self.corpus.encoder.tokens_before(doc, c)
        context = np.asarray(self.corpus.encoder.doc_tokens(doc)[max(0, b - n) : b], dtype=np.int64)
        return {**self.window(doc, p, d), "context": [context], "teacher_prefix": self.teacher_prefix(doc, p)}


class SyntheticBuilder:
    """Key-value recall (`cepe.data.synthetic`): answers only in the context."""

    kind = "synthetic"
    skipped_short = 0

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.candidates = value_ids(cfg)

    def sample(self, rng: np.random.Generator, d: int | None = None) -> dict[str, Any]:
        ex = make_example(self.cfg, rng)
        return {"input_ids": ex["input_ids"], "labels": ex["labels"], "context": [ex["context"]],
                "teacher_prefix": ex["context"], "task_mask": ex["labels"] != -100}


def block_quantile(seed: int, split: int, block: int) -> float:
    """The context-length quantile shared by the samples of `block` (context_draw "block"), from
    its own generator like `block_window`."""
    return float(np.random.default_rng([seed, split, int(block), 2]).uniform())


def block_window(seed: int, split: int, windows: list[int], block: int) -> int:
    """The decoder window of every sample of `block` (consecutive `window_block` indices): drawn
    from its own generator, so that the builders' draws do not move."""
    windows = sorted(windows)
    return windows[int(np.random.default_rng([seed, split, int(block), 1]).integers(len(windows)))]


class SampleStream(torch.utils.data.Dataset):
    """Sample `i` of a split: builder chosen by the mixture weights, then built, then (optionally)
    encoder tokens masked, all from one generator seeded by (seed, split, i)."""

    def __init__(self, builders: dict[str, Any], weights: dict[str, float], seed: int, split: int,
                 mask_prob: float = 0.0, mask_id: int | None = None, length: int = 2**62,
                 windows: list[int] | None = None, window_block: int = 1, bos_id: int | None = None,
                 context_block: bool = False):
        self.builders, self.context_block = builders, context_block
        self.windows, self.window_block, self.bos_id = (sorted(windows) if windows else None), window_block, bos_id
        self.kinds = [k for k in builders if weights.get(k, 0) > 0]
        w = np.array([weights[k] for k in self.kinds], dtype=np.float64)
        self.probs = w / w.sum()
        self.seed, self.split, self.length = seed, split, length
        self.mask_prob, self.mask_id = mask_prob, mask_id
        if mask_prob > 0 and mask_id is None:
            raise ValueError("data.encoder_mask_prob > 0 needs an encoder tokenizer with a mask (or unk) token")

    def __len__(self) -> int:
        return self.length

    def window_of(self, index: int) -> int | None:
        """The decoder window of sample `index` (None: each builder's own)."""
        if self.windows is None:
            return None
        return block_window(self.seed, self.split, self.windows, int(index) // self.window_block)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.split, int(index)])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probs))] if len(self.kinds) > 1 else self.kinds[0]
        builder = self.builders[kind]
        if self.context_block and getattr(builder, "draws_context", False):
            # one context quantile per micro-batch: its contexts pad to similar lengths
            q = block_quantile(self.seed, self.split, int(index) // self.window_block)
            sample = builder.sample(rng, self.window_of(index), context_q=q)
        else:
            sample = builder.sample(rng, self.window_of(index))
        if self.mask_prob > 0:
            sample["context"] = [
                np.where(rng.random(len(c)) < self.mask_prob, self.mask_id, c) for c in sample["context"]
            ]
        if self.bos_id is not None:
            # Gemma reads <bos> first (without it English ppl 6.6 -> 68.7); no loss on it
            sample["input_ids"] = np.concatenate([[self.bos_id], sample["input_ids"]]).astype(np.int64)
            sample["labels"] = np.concatenate([[-100], sample["labels"]]).astype(np.int64)
            if "task_mask" in sample:  # answers stay where they are: one position later
                sample["task_mask"] = np.concatenate([[False], sample["task_mask"]]).astype(bool)
        sample["kind"], sample["index"] = kind, int(index)
        return sample


class Collator:
    """Samples -> tensors: input_ids, labels, task_mask (B, D) (True on the answer tokens of
    copying, facts and demonstration tasks); context_input_ids, context_attention_mask
    (B, N, L); teacher_prefix_ids, teacher_prefix_mask (B, T) left-padded; index (B,).
    Decoder windows of different lengths are right-padded to the longest (D) with the decoder's
    pad id and label -100: the decoder is causal, so a real token never sees a pad."""

    def __init__(
        self, chunk_size: int, prefix: list[int], suffix: list[int], encoder_pad_id: int, decoder_pad_id: int = 0
    ):
        self.chunk_size, self.prefix, self.suffix = chunk_size, prefix, suffix
        self.encoder_pad_id, self.decoder_pad_id = encoder_pad_id, decoder_pad_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        per_example = [
            chunk_token_ids(
                [c.tolist() for c in s["context"]], self.chunk_size, self.encoder_pad_id, self.prefix, self.suffix
            )
            for s in samples
        ]
        ctx_ids, ctx_mask = pad_chunk_batch(per_example, self.encoder_pad_id)
        t = max(len(s["teacher_prefix"]) for s in samples)
        prefix_ids = torch.full((len(samples), t), self.decoder_pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(samples), t), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["teacher_prefix"])
            if n:
                prefix_ids[i, t - n :] = torch.as_tensor(s["teacher_prefix"], dtype=torch.long)
                prefix_mask[i, t - n :] = 1
        d = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), d), self.decoder_pad_id, dtype=torch.long)
        labels = torch.full((len(samples), d), -100, dtype=torch.long)
        task_mask = torch.zeros((len(samples), d), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[i, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(s["labels"], dtype=torch.long)
            if "task_mask" in s:
                task_mask[i, :n] = torch.as_tensor(s["task_mask"], dtype=torch.bool)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "task_mask": task_mask,
            "context_input_ids": ctx_ids,
            "context_attention_mask": ctx_mask,
            "teacher_prefix_ids": prefix_ids,
            "teacher_prefix_mask": prefix_mask,
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }
