"""Sample builders beyond the plain text windows of `cepe.data.samples`: retrieved passages,
copying and lookup through the encoder, random facts to look up, questions over retrieved passages,
labelled demonstrations."""

from .copying import CopyingBuilder
from .demonstrations import DemonstrationsBuilder
from .facts import FactsBuilder
from .passage_qa import PassageQABuilder
from .retrieval import PassagePool, RetrievalBuilder
from .text import TextCodec, category_of, source_of

__all__ = ["CopyingBuilder", "DemonstrationsBuilder", "FactsBuilder", "PassagePool", "PassageQABuilder",
           "RetrievalBuilder", "TextCodec", "category_of", "source_of"]
