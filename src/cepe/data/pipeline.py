"""From a `DataConfig` to the train and held-out sample streams: read, tokenize (cached), split, build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .builders import (
    CopyingBuilder,
    DemonstrationsBuilder,
    FactsBuilder,
    PassagePool,
    PassageQABuilder,
    RetrievalBuilder,
    TextCodec,
)
from .config import DataConfig
from .corpus import CorpusReport, is_saved_dataset, iter_documents, list_files, matches
from .samples import Corpus, LongDocumentBuilder, SampleStream, SyntheticBuilder, TooShort, WarmupBuilder
from .token_store import TokenStore, build_token_stores, open_token_stores, tokenizer_hash

TRAIN_SPLIT, HELDOUT_SPLIT = 0, 1


@dataclass
class DataBundle:
    train: SampleStream
    heldout: SampleStream | None
    report: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)  # written to the run folder as split.json
    candidates: np.ndarray | None = None  # restrict accuracy to these ids (synthetic values)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CEPE_HOME", Path.home() / ".cache" / "cepe")) / "tokens"


def _sources_key(cfg: DataConfig) -> str:
    """Changes whenever the documents could: paths, file sizes and modification times, options."""
    h = hashlib.sha256()
    for src in cfg.train:
        path = Path(src).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"data.train: {src} does not exist")
        files = (
            [path]
            if path.is_file()
            else (
                sorted(p for p in path.rglob("*") if p.is_file())
                if is_saved_dataset(path)
                else list_files(path, cfg.extensions)
            )
        )
        h.update(str(path).encode())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    opts = [cfg.text_field, sorted(cfg.extensions), cfg.max_files, cfg.max_tokens, cfg.on_unreadable]
    h.update(json.dumps(opts).encode())
    return h.hexdigest()[:16]


def load_token_stores(cfg: DataConfig, tokenizer: Any, encoder_tokenizer: Any, progress: bool = True,
                      main_process_first=contextlib.nullcontext) -> tuple[TokenStore, TokenStore, dict]:
    """Decoder and encoder stores for `cfg.train`, built once and cached by content."""
    if tokenizer is None:
        raise ValueError("text data needs the decoder's tokenizer (a `tiny` decoder uses the byte tokenizer)")
    dec_hash = tokenizer_hash(tokenizer)
    enc_hash = tokenizer_hash(encoder_tokenizer) if encoder_tokenizer is not None else dec_hash
    shared = enc_hash == dec_hash
    names = ["decoder"] if shared else ["decoder", "encoder"]
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    folder = cache / f"{_sources_key(cfg)}-{dec_hash}-{enc_hash}"
    report = CorpusReport()
    with main_process_first():
        stores = open_token_stores(folder, names)
        if stores is None:
            docs = iter_documents(cfg.train, cfg.text_field, cfg.extensions, cfg.max_files, cfg.on_unreadable, report)
            toks = {"decoder": tokenizer} if shared else {"decoder": tokenizer, "encoder": encoder_tokenizer}
            stores = build_token_stores(docs, toks, folder, cfg.max_tokens, progress=progress, count_with="decoder")
            (folder / "corpus_report.json").write_text(json.dumps(asdict(report), indent=1))
        else:
            report_path = folder / "corpus_report.json"
            if report_path.is_file():
                report = CorpusReport(**json.loads(report_path.read_text()))
    dec = stores["decoder"]
    enc = dec if shared else stores["encoder"]
    if len(dec) == 0:
        raise ValueError(f"data.train {cfg.train}: no documents (empty corpus)")
    if dec.num_tokens == 0:
        raise ValueError(f"data.train {cfg.train}: all {len(dec)} documents are empty (empty corpus)")
    info = {"store": str(folder), "documents": len(dec), "decoder_tokens": dec.num_tokens,
            "encoder_tokens": enc.num_tokens, "files": report.files, "skipped_unreadable": report.skipped_unreadable,
            "shared_tokenizer": shared}
    return dec, enc, info


def split_documents(names: list[str], patterns: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out documents: names matching any pattern, plus a random `fraction`
    of the others (fixed by `seed`). A pattern that matches nothing is an error (a typo would
    otherwise leak the intended held-out text into training)."""
    held = np.zeros(len(names), dtype=bool)
    for pat in patterns:
        hit = np.array([matches(n, pat) for n in names], dtype=bool)
        if not hit.any():
            raise ValueError(f"data.heldout: pattern {pat!r} matches no document (e.g. {names[:3]})")
        held |= hit
    if fraction > 0:
        rest = np.flatnonzero(~held)
        rng = np.random.default_rng([seed, 11])
        n = int(round(fraction * len(rest)))
        held[rng.choice(rest, size=n, replace=False)] = True
    return held


def tokenizer_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts it before text itself (Gemma, through its post-processor:
    its add_bos_token reads False), else None (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos) if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def decoder_bos(cfg: DataConfig, tokenizer: Any) -> int | None:
    """The BOS id put before every decoder window (`data.decoder_bos`; auto: when the decoder's
    tokenizer adds one itself, as Gemma's does; SmolLM2's GGUF BOS is a chat token and is off)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    wanted = cfg.decoder_bos
    if wanted is None:
        wanted = tokenizer_bos(tokenizer) is not None
    if wanted and bos is None:
        raise ValueError("data.decoder_bos=true: the decoder's tokenizer has no BOS token")
    return int(bos) if wanted else None


def _builders(
    corpus: Corpus, cfg: DataConfig, codec: TextCodec, teacher_tokens: int, pool: PassagePool | None
) -> dict[str, Any]:
    out = {}
    for kind, weight in cfg.mixture.items():
        if weight <= 0:
            continue
        if kind == "warmup":
            out[kind] = WarmupBuilder(corpus, cfg, teacher_tokens)
        elif kind == "long_document":
            out[kind] = LongDocumentBuilder(corpus, cfg, teacher_tokens)
        elif kind == "retrieval":
            out[kind] = RetrievalBuilder(corpus, cfg, pool, teacher_tokens)
        elif kind == "copying":
            out[kind] = CopyingBuilder(corpus, cfg, codec, teacher_tokens)
        elif kind == "facts":
            out[kind] = FactsBuilder(corpus, cfg, codec, teacher_tokens)
        elif kind == "demonstrations":
            out[kind] = DemonstrationsBuilder(corpus, cfg, codec, teacher_tokens)
        elif kind == "passage_qa":
            out[kind] = PassageQABuilder(corpus, cfg, codec, pool, teacher_tokens)
    return out


def build_data(cfg: DataConfig, tokenizer: Any = None, encoder_tokenizer: Any = None, *, teacher_tokens: int = 0,
               progress: bool = True, main_process_first=contextlib.nullcontext) -> DataBundle:
    """Streams of training and held-out samples. `teacher_tokens`: decoder tokens of context the
    online teacher reads (0 when not distilling)."""
    cfg.validate()
    if cfg.is_synthetic:
        b = SyntheticBuilder(cfg.synthetic)
        return DataBundle(
            train=SampleStream({"synthetic": b}, {"synthetic": 1.0}, cfg.seed, TRAIN_SPLIT),
            heldout=SampleStream({"synthetic": b}, {"synthetic": 1.0}, cfg.seed, HELDOUT_SPLIT),
            report={"synthetic": asdict(cfg.synthetic)},
            split={"seed": cfg.seed, "heldout": "fresh synthetic examples (split 1 of the sample stream)"},
            candidates=b.candidates,
        )
    if "synthetic" in cfg.train:
        raise ValueError("data.train: 'synthetic' cannot be mixed with files")
    dec, enc, info = load_token_stores(cfg, tokenizer, encoder_tokenizer, progress, main_process_first)
    held = split_documents(dec.names, cfg.heldout, cfg.heldout_fraction, cfg.seed)
    train_docs, held_docs = np.flatnonzero(~held), np.flatnonzero(held)
    if not len(train_docs):
        raise ValueError(f"data.heldout: every document of {cfg.train} is held out; nothing left to train on")
    decode = tokenizer.decode
    codec = TextCodec(tokenizer, encoder_tokenizer if encoder_tokenizer is not None else tokenizer)
    bos_id = decoder_bos(cfg, tokenizer)
    train_corpus = Corpus(dec, enc, train_docs)
    mask_id = None
    if encoder_tokenizer is not None or tokenizer is not None:
        t = encoder_tokenizer if encoder_tokenizer is not None else tokenizer
        mask_id = t.mask_token_id if t.mask_token_id is not None else t.unk_token_id
    try:
        wants_pool = any(cfg.mixture.get(kind, 0) > 0 for kind in ("retrieval", "passage_qa"))
        pool = PassagePool(train_corpus, cfg, decode) if wants_pool else None
        train_builders = _builders(train_corpus, cfg, codec, teacher_tokens, pool)
    except TooShort as e:
        raise ValueError(f"data.train {cfg.train}: {e}") from None
    report = dict(info)
    report["train_documents"] = int(len(train_docs))
    report["heldout_documents"] = int(len(held_docs))
    report["skipped_short"] = {k: b.skipped_short for k, b in train_builders.items()}
    if pool is not None:
        report["retrieval_passages"] = len(pool)
    heldout = None
    if len(held_docs):
        try:
            held_builders = _builders(Corpus(dec, enc, held_docs), cfg, codec, teacher_tokens, pool)
            heldout = SampleStream(held_builders, cfg.mixture, cfg.seed, HELDOUT_SPLIT, windows=cfg.decoder_windows,
                                   window_block=cfg.window_block, bos_id=bos_id,
                                   context_block=cfg.context_draw == "block")
            report["heldout_skipped_short"] = {k: b.skipped_short for k, b in held_builders.items()}
        except TooShort as e:
            report["heldout_unusable"] = str(e)
    split = {
        "seed": cfg.seed,
        "patterns": list(cfg.heldout),
        "fraction": cfg.heldout_fraction,
        "train_documents": int(len(train_docs)),
        "heldout": [dec.names[i] for i in held_docs],
    }
    report["decoder_bos"] = bos_id
    train = SampleStream(train_builders, cfg.mixture, cfg.seed, TRAIN_SPLIT, cfg.encoder_mask_prob, mask_id,
                         windows=cfg.decoder_windows, window_block=cfg.window_block, bos_id=bos_id,
                         context_block=cfg.context_draw == "block")
    return DataBundle(train=train, heldout=heldout, report=report, split=split)
