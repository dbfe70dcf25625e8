"""manifest.json of a saved index: what was indexed, how, with which model, and the file sizes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMAT = "clipkit-retrieval-index"
VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.sqlite"
METRIC = "inner_product"


class IndexFormatError(ValueError):
    """A saved index directory that is missing, incomplete, damaged, or made for another model."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """The description of a saved index.

    ``count`` is the number of searchable vectors; ``next_id`` the id the next added vector gets.
    ``search`` is the knob setting searches use (``{"nprobe": 48}``, ``{"efSearch": 64}``, ``{}``, or
    ``{"nprobe": 48, "k_factor": 4}`` for a re-ranked index), ``tuning`` how it was chosen (target and
    measured recall@10, number of queries, and under ``tried`` the other indexes ``auto`` built when
    its first missed the target, each with its factory string, search setting and recall@10) or ``None``.
    ``index_bytes`` and ``metadata_bytes`` are the sizes the files must have, so that a truncated
    copy fails to load with a clear message instead of a FAISS read error; ``checksums`` the BLAKE2b
    digest of each file, so that a file swapped for another of the same size is caught too.
    ``model_fingerprint`` identifies the weights that embedded the vectors (a query must be embedded by
    the same), ``model_spec`` (``{"model": ..., "pretrained": ...}``) says how to load that model again;
    ``model`` is its name for people. All three are None for vectors from elsewhere.
    """

    dim: int
    kind: str
    factory: str
    model: str | None
    count: int
    next_id: int
    search: dict[str, int]
    tuning: dict[str, Any] | None
    created: str
    index_bytes: int
    metadata_bytes: int
    metric: str = METRIC
    checksums: dict[str, str] | None = None
    model_fingerprint: str | None = None
    model_spec: dict[str, str | None] | None = None
    lists_bytes: int | None = None  # the size of index.ivfdata, for an index whose IVF lists are on disk

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: Path) -> "Manifest":
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError as err:
            raise IndexFormatError(f"{source} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise IndexFormatError(f"{source} is not a retrieval index manifest")
        if data.get("version") != VERSION:
            raise IndexFormatError(f"{source} has format version {data.get('version')}; this code reads {VERSION}")
        fields = {field.name for field in dataclasses.fields(cls)}
        missing = fields - data.keys() - {"metric", "checksums", "model_fingerprint", "model_spec", "lists_bytes"}
        if missing:
            raise IndexFormatError(f"{source} lacks {', '.join(sorted(missing))}")
        manifest = cls(**{name: data[name] for name in fields if name in data})
        if manifest.metric != METRIC:
            raise IndexFormatError(f"{source}: metric {manifest.metric!r} is not supported (only {METRIC})")
        return manifest

    def check(self, expect_model: str | None, expect_dim: int | None, source: Path,
              expect_fingerprint: str | None = None) -> None:
        """Raise ``IndexFormatError`` if the index was built for another model (by name, or by the
        fingerprint of its weights) or dimension."""
        if expect_fingerprint is not None and self.model_fingerprint not in (None, expect_fingerprint):
            raise IndexFormatError(
                f"{source} holds vectors of model {self.model!r} (fingerprint {self.model_fingerprint}), not of "
                f"the model given (fingerprint {expect_fingerprint}): their vectors are not comparable; query it "
                "with the model the index was built with")
        if expect_dim is not None and expect_dim != self.dim:
            raise IndexFormatError(f"{source} holds {self.dim}-d vectors, expected {expect_dim}-d")
        if expect_model is not None and expect_model != self.model:
            raise IndexFormatError(
                f"{source} was built from embeddings of model {self.model!r}, expected {expect_model!r}: "
                "its vectors are not comparable with that model's"
            )


def file_checksum(path: Path) -> str:
    """The BLAKE2b digest of a file, read in 8 MB blocks (about 1 GB/s)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a saved index directory (``IndexFormatError`` if it has none)."""
    path = Path(directory) / MANIFEST_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no index directory at {directory}")
    if not path.is_file():
        raise IndexFormatError(f"{directory} has no {MANIFEST_FILE}: not a saved index, or its save did not finish")
    return Manifest.from_json(path.read_text(encoding="utf-8"), path)


def is_index_directory(directory: Path) -> bool:
    """Whether ``directory`` holds a readable index manifest (what may be replaced by a save)."""
    try:
        read_manifest(directory)
    except (IndexFormatError, OSError):
        return False
    return True
