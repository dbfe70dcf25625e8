"""FAISS retrieval over clipkit embeddings: build, save, load and query an index with metadata.

>>> index = RetrievalIndex.build(vectors, metadata, kind="auto", memory_budget="4GB")
>>> index.save("my_index/"); index = RetrievalIndex.load("my_index/", mmap=True)
>>> hits = index.search_text("a red circle", model=model, k=10)
>>> hits = index.search_item(1275, k=10)  # more like item 1275
>>> hits = Client("http://127.0.0.1:8000").search(text="a red circle", k=10)  # from `clipkit serve`
"""

from retrieval.client import Client, ServiceError
from retrieval.embeddings import EmbeddingsFormatError, read_embeddings_dir, write_embedding_shard, write_manifest
from retrieval.index import Hit, RetrievalIndex
from retrieval.kinds import KINDS, MemoryBudgetError
from retrieval.manifest import IndexFormatError
from retrieval.memory import parse_memory
from retrieval.store import MetadataError
from retrieval.stored_vectors import VectorsNotStored

__all__ = [
    "KINDS", "Client", "EmbeddingsFormatError", "Hit", "IndexFormatError", "MemoryBudgetError", "MetadataError",
    "RetrievalIndex", "ServiceError", "VectorsNotStored", "parse_memory", "read_embeddings_dir", "write_embedding_shard", "write_manifest",
]
