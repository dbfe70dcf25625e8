"""FAISS retrieval over clipkit embeddings: build, save, load and query an index with metadata."""

from retrieval.index import Hit, RetrievalIndex

__all__ = ["Hit", "RetrievalIndex"]
