"""What the data pipeline reads and how it builds training samples (one section of a run's config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .corpus import ON_UNREADABLE
from .synthetic import SyntheticConfig

BUILDERS = ("warmup", "long_document", "retrieval", "copying", "facts", "demonstrations", "passage_qa")


@dataclass
class RetrievalConfig:
    """`retrieval` and `passage_qa` builders: the encoder reads `k` passages that BM25 retrieves
    for the decoder text."""

    # passages per sample: an int, or [lo, hi] drawn uniformly per sample (a reader of 20 retrieved
    # passages must not have learnt that there are always 8: NQ fell from k = 1 to k = 20)
    k: int | list[int] = 8
    passage_tokens: int = 256  # decoder tokens per passage (the pool is cut from the training documents)
    max_passages: int = 20000  # pool size cap (sampled with the data seed)
    # "any": from any other training document; "same_source": from other documents of the window's
    # source (its .jsonl file or folder: the paper's retrieval stage reads related passages), any
    # source when the own one has no other document
    scope: str = "any"
    # share of passage_qa samples laid out as open-domain QA prompts are: the top passage in the decoder
    # window before the questions, the others in the encoder; in half of them the first question asks
    # about that passage. Without it every answer is in the encoder, and with 20 passages there the
    # release overrode answers its window held (NQ, 100 questions: 13 right at k = 1 turn wrong at
    # k = 20; in 5 of the 6 whose rows are kept, the answer is in the window's passage)
    in_window: float = 0.0


@dataclass
class CopyingConfig:
    """`copying` builder: after a long-document window the decoder must reproduce text that only
    the context holds (loss on the copied tokens and on the window's text)."""

    task_tokens: int = 96  # decoder tokens (at most) given to the copy task at the window's end
    span_tokens: list[int] = field(default_factory=lambda: [8, 48])  # copied span length range
    queries: list[int] = field(default_factory=lambda: [2, 6])  # lookups per sample (records, lines)
    records: list[int] = field(default_factory=lambda: [8, 48])  # records in a synthesised table


@dataclass
class FactsConfig:
    """`facts` builder: random facts placed at random depths of the context, asked after the window
    (loss on the values; the task shares `copying.task_tokens`)."""

    facts: list[int] = field(default_factory=lambda: [1, 8])  # facts in a `single` sample's context
    queries: list[int] = field(default_factory=lambda: [1, 3])  # of them asked
    # [lo, hi] values of the one key in a `multi` sample, all asked (RULER's multi-value asks for 4;
    # 2-6 in stage 19 did not make the release's 2-value answers longer)
    values: list[int] = field(default_factory=lambda: [2, 4])
    # [lo, hi] assignments after the value in a `chain` sample's asked chain (RULER's vt has 4 hops)
    hops: list[int] = field(default_factory=lambda: [1, 4])
    # share of `multi` and `chain` answers listed with a drawn separator (", ", "; ", ". ", a new line,
    # " | ") instead of ", " / " ", so that "." after an item may go on to the next (RULER's needles
    # end in periods). Stage 20 learnt the form; its lists still stopped early
    separators: float = 0.0
    # the order of a `multi` answer: "appearance" (the context's order) or "random". Chunks are encoded
    # apart and cross-attention has no positions, so the order of values in different chunks cannot be
    # read; "appearance" asks for it anyway (held-out multi exact match stayed at 0-5% in stages 16-19)
    multi_order: str = "appearance"
    formats: dict[str, float] = field(default_factory=lambda: {"single": 0.6, "multi": 0.2, "chain": 0.2})
    # share of samples whose context is one short span of its own text repeated (a noise haystack:
    # the query must match the fact's words, not just the last token before the value)
    repeat: float = 0.3
    # of those, the share whose decoder window continues the haystack too (as in the pass-key test:
    # the window's own text then says "the sun is yellow" right before the question)
    repeat_window: float = 0.5
    same_attribute: float = 0.5  # share of keyed `single` samples whose facts all share one attribute (distractors)
    keyless: float = 0.35  # share of `single` samples whose facts have no name: told apart by attribute alone
    # share of the same-attribute samples whose keys also share one shape (all two-word, all hex...),
    # as RULER's needles do: keys of mixed shapes can be told apart by shape, not only by their tokens
    same_key_shape: float = 0.0
    # share of questions (keyed single, multi, chain) in wordings composed from parts (builders/wordings.py,
    # hundreds per format): with the short forms alone a list's length followed the wording (stages
    # 21-22 found 71-75% of RULER's multi-value values after their own forms, 40-54% after any other:
    # docs/results_general_stage21.md)
    question_styles: float = 0.0
    instruction: float = 0.25  # share of samples whose window opens with an instruction (as a user's prompt does)
    # [lo, hi] encoder tokens of a facts sample's context, drawn log-uniformly (None: data.context_tokens
    # and data.min_context_tokens, as every builder). Short contexts teach the key match fastest
    # (docs/results_binding_probe.md: 256-1K contexts moved 4-key lookups from 19% to 78%)
    context_tokens: list[int] | None = None


@dataclass
class DemonstrationsConfig:
    """`demonstrations` builder: labelled examples (text -> its category or source) in the
    context, a few more in the decoder; loss on the decoder's labels (and the text before them)."""

    # what a label names: "category", "source" (read from a document's name) or "sentiment" (a
    # snippet's tone, read by a lexicon: `cepe.data.builders.sentiment`)
    labels: list[str] = field(default_factory=lambda: ["category", "source"])
    classes: list[int] = field(default_factory=lambda: [2, 6])  # labels per sample
    context_examples: list[int] = field(default_factory=lambda: [8, 48])
    decoder_examples: list[int] = field(default_factory=lambda: [2, 6])  # the last ones are scored
    example_tokens: list[int] = field(default_factory=lambda: [16, 48])  # decoder tokens per example text
    renamed_labels: float = 0.5  # share of samples whose labels are arbitrary words (learnable only from the context)
    sentiment_pool: int = 20000  # snippets drawn (data seed) and read for tone; about a third are clear enough to keep
    # categories whose documents give the tone snippets (empty: all). A lexicon misreads technical
    # text ("should be no reference" reads negative) and code, so the mix's prose and talk only
    sentiment_categories: list[str] = field(default_factory=lambda: ["books", "dialogue", "mail"])


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
    on_unreadable: str = (
        "error"  # "error", "skip" (skipped files are listed in the run folder) or "replace" (bad bytes -> U+FFFD)
    )
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
    # variable decoder windows: each block of `window_block` consecutive samples draws its window
    # from this list (set window_block to train.batch_size: a micro-batch then has one width, no
    # padding); null: every sample has `decoder_tokens`
    decoder_windows: list[int] | None = None
    window_block: int = 1
    min_context_tokens: int | None = None  # shortest context accepted (default: context_tokens)
    # context length per sample: "max" reads up to context_tokens; "uniform" draws it in
    # [min_context_tokens, context_tokens], log-uniformly (short and long contexts alike); "block":
    # as uniform, but the draw's quantile is shared by each block of `window_block` samples, so a
    # micro-batch pads its contexts to similar lengths (each builder's distribution is unchanged)
    context_draw: str = "max"
    # draw the context length first, then a window with that much text before it (long documents,
    # copying, facts); false: the window first, so a context is cut wherever the window falls near
    # a document's start (stage 14's facts drawn in 256-16K reached 9K at the 90th percentile)
    context_fill: bool = False
    # put the decoder's BOS before every decoder window (no loss on it); null: when the decoder's
    # tokenizer adds one itself (Gemma needs <bos>; SmolLM2's BOS is a chat token, left out)
    decoder_bos: bool | None = None
    encoder_mask_prob: float = 0.0  # replace encoder tokens by [MASK] with this probability
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    copying: CopyingConfig = field(default_factory=CopyingConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    demonstrations: DemonstrationsConfig = field(default_factory=DemonstrationsConfig)
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
        if self.decoder_windows is not None and (not self.decoder_windows or min(self.decoder_windows) < 2):
            raise ValueError(f"data.decoder_windows: a non-empty list of windows >= 2, got {self.decoder_windows}")
        if self.window_block < 1:
            raise ValueError(f"data.window_block must be at least 1, got {self.window_block}")
        if self.context_draw not in ("max", "uniform", "block"):
            raise ValueError(f"data.context_draw must be 'max', 'uniform' or 'block', got {self.context_draw!r}")
        if not 0.0 <= self.retrieval.in_window <= 1.0:
            raise ValueError(f"data.retrieval.in_window must be in [0, 1], got {self.retrieval.in_window}")
        if self.retrieval.scope not in ("any", "same_source"):
            raise ValueError(f"data.retrieval.scope must be 'any' or 'same_source', got {self.retrieval.scope!r}")
        k = self.retrieval.k
        if isinstance(k, int) and k < 1:
            raise ValueError(f"data.retrieval.k must be at least 1, got {k}")
        retrieval_k = [] if isinstance(k, int) else [("retrieval.k", k)]
        own_context = [("facts.context_tokens", self.facts.context_tokens)] if self.facts.context_tokens else []
        for name, pair in (("copying.span_tokens", self.copying.span_tokens), ("copying.queries", self.copying.queries),
                           ("copying.records", self.copying.records), ("facts.facts", self.facts.facts),
                           ("facts.queries", self.facts.queries), ("facts.values", self.facts.values),
                           ("facts.hops", self.facts.hops),
                           *own_context, *retrieval_k,
                           ("demonstrations.classes", self.demonstrations.classes),
                           ("demonstrations.context_examples", self.demonstrations.context_examples),
                           ("demonstrations.decoder_examples", self.demonstrations.decoder_examples),
                           ("demonstrations.example_tokens", self.demonstrations.example_tokens)):
            if len(pair) != 2 or not 1 <= pair[0] <= pair[1]:
                raise ValueError(f"data.{name}: a range [lo, hi] with 1 <= lo <= hi, got {pair}")
        unknown = sorted(set(self.facts.formats) - {"single", "multi", "chain"})
        if unknown or any(w < 0 for w in self.facts.formats.values()) or sum(self.facts.formats.values()) <= 0:
            raise ValueError(f"data.facts.formats: weights of single, multi, chain (non-negative, positive sum), "
                             f"got {self.facts.formats}")
        if self.facts.multi_order not in ("appearance", "random"):
            raise ValueError(f"data.facts.multi_order must be 'appearance' or 'random', got {self.facts.multi_order!r}")
        if self.demonstrations.classes[0] < 2:
            raise ValueError("data.demonstrations.classes: at least 2 labels per sample")

    @property
    def windows(self) -> list[int]:
        """The decoder windows samples are drawn with."""
        return sorted(set(self.decoder_windows)) if self.decoder_windows else [self.decoder_tokens]

    @property
    def is_synthetic(self) -> bool:
        return list(self.train) == ["synthetic"]
