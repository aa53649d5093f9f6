"""What the data pipeline reads and how it builds training samples (one section of a run's config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .corpus import ON_UNREADABLE
from .synthetic import SyntheticConfig

BUILDERS = ("warmup", "long_document", "retrieval")


@dataclass
class RetrievalConfig:
    """`retrieval` builder: the encoder reads `k` passages that BM25 retrieves for the decoder text."""

    k: int = 8
    passage_tokens: int = 256  # decoder tokens per passage (the pool is cut from the training documents)
    max_passages: int = 20000  # pool size cap (sampled with the data seed)


@dataclass
class DataConfig:
    """Training data.

    `train` lists inputs: folders (every file with one of `extensions`, recursively), `.jsonl`
    files (one document per line, text in `text_field`), single text files, saved `datasets`
    datasets, or the single word `synthetic` (the key-value task in `cepe.data.synthetic`).
    """

    train: list[str] = field(default_factory=list)
    text_field: str = "text"
    extensions: list[str] = field(default_factory=lambda: [".txt", ".py", ".md"])
    max_files: int | None = None
    max_tokens: int | None = None  # stop tokenizing after this many decoder tokens
    on_unreadable: str = "error"  # "error", "skip" (skipped files are listed in the run folder) or "replace" (bad bytes -> U+FFFD)
    # held-out split, by document: names matching `heldout` patterns ("persuasion.txt", "email/",
    # globs) plus a random `heldout_fraction` of the rest, fixed by `seed`
    heldout: list[str] = field(default_factory=list)
    heldout_fraction: float = 0.0
    seed: int = 0
    cache_dir: str | None = None  # token stores (default: ~/.cache/cepe/tokens)
    # samples: builder name -> weight
    mixture: dict[str, float] = field(default_factory=lambda: {"long_document": 1.0})
    context_tokens: int = 2048  # encoder tokens the context holds (long_document)
    decoder_tokens: int = 512  # decoder tokens per sample (loss on these)
    min_context_tokens: int | None = None  # shortest context accepted (default: context_tokens)
    encoder_mask_prob: float = 0.0  # replace encoder tokens by [MASK] with this probability
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    num_workers: int = 0  # DataLoader worker processes building samples

    def validate(self) -> None:
        if not self.train:
            raise ValueError("data.train: no training data given (a folder, .jsonl, dataset, or 'synthetic')")
        unknown = sorted(set(self.mixture) - set(BUILDERS))
        if unknown:
            raise ValueError(f"data.mixture: unknown builder(s) {unknown}; known: {list(BUILDERS)}")
        if not self.mixture or any(w < 0 for w in self.mixture.values()) or sum(self.mixture.values()) <= 0:
            raise ValueError(f"data.mixture: weights must be non-negative with a positive sum, got {self.mixture}")
        if self.on_unreadable not in ON_UNREADABLE:
            raise ValueError(f"data.on_unreadable must be one of {ON_UNREADABLE}, got {self.on_unreadable!r}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.encoder_mask_prob < 1.0:
            raise ValueError(f"data.encoder_mask_prob must be in [0, 1), got {self.encoder_mask_prob}")
        if self.decoder_tokens < 2:
            raise ValueError(f"data.decoder_tokens must be at least 2, got {self.decoder_tokens}")

    @property
    def is_synthetic(self) -> bool:
        return list(self.train) == ["synthetic"]
