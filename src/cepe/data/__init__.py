"""Training data: corpora, token stores (one per tokenizer), sample builders, a synthetic task."""

from .config import DataConfig, RetrievalConfig
from .corpus import Document, iter_documents
from .pipeline import DataBundle, build_data, split_documents
from .samples import Collator, SampleStream
from .synthetic import SyntheticConfig
from .token_store import TokenStore, build_token_stores
from .tokenizer import byte_tokenizer

__all__ = [
    "Collator", "DataBundle", "DataConfig", "Document", "RetrievalConfig", "SampleStream", "SyntheticConfig",
    "TokenStore", "build_data", "build_token_stores", "byte_tokenizer", "iter_documents", "split_documents",
]
