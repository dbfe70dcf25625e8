"""The embeddings directory that ``clipkit embed`` writes and ``clipkit index build`` reads.

Layout::

    EMBEDDINGS_DIR/
      manifest.json        {"model": str, "modality": str, "dim": int, "shards": [stem, ...]}
      <stem>.npy           float32 (N, dim) unit-norm vectors of one shard
      <stem>.jsonl         N lines, one JSON object of metadata per vector, in the same order

Row i of the concatenation of the shards, in manifest order, is vector id i of an index built from
the directory. A shard's ``.npy`` is written last (both files by temporary file and rename), so
a shard whose ``.npy`` exists is complete; the manifest is written once every shard is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

from retrieval.files import atomic_write, atomic_write_text
from retrieval.store import encode_record
from retrieval.vectors import as_float32_matrix, check_finite

MANIFEST_FILE = "manifest.json"


class EmbeddingsFormatError(ValueError):
    """An embeddings directory with missing, mismatched or unreadable files."""


@dataclass(frozen=True)
class EmbeddingsManifest:
    """Which model embedded which modality into ``dim``-d vectors, and the shard stems in order."""

    model: str
    modality: str
    dim: int
    shards: tuple[str, ...]


class ShardedVectors:
    """The shards' vectors as one (N, D) ``VectorSource``, memory-mapped rather than loaded."""

    def __init__(self, arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
        self._arrays = list(arrays)
        self._names = list(names)
        self._starts = np.cumsum([0] + [len(array) for array in arrays])
        self._dim = arrays[0].shape[1] if arrays else 0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self._starts[-1]), self._dim

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        for array, name in zip(self._arrays, self._names):
            for start in range(0, len(array), rows):
                chunk = np.ascontiguousarray(array[start:start + rows], dtype=np.float32)
                check_finite(chunk, name, offset=start)
                yield chunk

    def take(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self._dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            out[mask] = self._arrays[shard][indices[mask] - self._starts[shard]]
        check_finite(out, "sampled vectors")
        return out


class Embeddings(NamedTuple):
    """What ``read_embeddings_dir`` returns: vectors, an iterator over their metadata, the manifest."""

    vectors: ShardedVectors
    metadata: Iterator[dict[str, Any]]
    manifest: EmbeddingsManifest


def _read_manifest(directory: Path) -> EmbeddingsManifest:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise EmbeddingsFormatError(f"{directory} has no {MANIFEST_FILE}: not an embeddings directory, "
                                    "or `clipkit embed` did not finish")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EmbeddingsFormatError(f"{path} is not valid JSON: {err}") from err
    types = {"model": str, "modality": str, "dim": int, "shards": list}
    for key, expected in types.items():
        if not isinstance(data, dict) or not isinstance(data.get(key), expected):
            raise EmbeddingsFormatError(f"{path}: {key!r} must be a {expected.__name__}")
    if data["dim"] < 1 or not all(isinstance(stem, str) and stem for stem in data["shards"]):
        raise EmbeddingsFormatError(f"{path}: dim must be positive and shards a list of file stems")
    return EmbeddingsManifest(data["model"], data["modality"], data["dim"], tuple(data["shards"]))


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _open_shard(directory: Path, stem: str, dim: int) -> np.ndarray:
    vectors_path, metadata_path = directory / f"{stem}.npy", directory / f"{stem}.jsonl"
    if not vectors_path.is_file():
        raise EmbeddingsFormatError(f"shard {stem!r} has no {vectors_path.name} in {directory} "
                                    "(an interrupted `clipkit embed`?)")
    if not metadata_path.is_file():
        raise EmbeddingsFormatError(f"shard {stem!r} has no {metadata_path.name} in {directory}")
    try:
        array = np.load(vectors_path, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise EmbeddingsFormatError(f"{vectors_path} is not a readable .npy array: {err}") from err
    if array.ndim != 2 or array.shape[1] != dim or not np.issubdtype(array.dtype, np.floating):
        raise EmbeddingsFormatError(f"{vectors_path} holds {array.dtype} {array.shape}; "
                                    f"the manifest says float (N, {dim})")
    lines = _count_lines(metadata_path)
    if lines != len(array):
        raise EmbeddingsFormatError(f"shard {stem!r}: {len(array)} vectors but {lines} metadata lines")
    return array


def _metadata(directory: Path, stems: Sequence[str]) -> Iterator[dict[str, Any]]:
    for stem in stems:
        path = directory / f"{stem}.jsonl"
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise EmbeddingsFormatError(f"{path}:{number}: not JSON: {err}") from err
                if not isinstance(record, dict):
                    raise EmbeddingsFormatError(f"{path}:{number}: metadata must be a JSON object")
                yield record


def read_embeddings_dir(path: str | Path) -> Embeddings:
    """Open an embeddings directory: check that every shard is there with matching vector and
    metadata counts, memory-map the vectors, and stream the metadata (``EmbeddingsFormatError``
    otherwise)."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no embeddings directory at {directory}")
    manifest = _read_manifest(directory)
    arrays = [_open_shard(directory, stem, manifest.dim) for stem in manifest.shards]
    if not arrays or sum(len(array) for array in arrays) == 0:
        raise EmbeddingsFormatError(f"{directory} holds no vectors")
    return Embeddings(ShardedVectors(arrays, manifest.shards), _metadata(directory, manifest.shards), manifest)


def write_embedding_shard(
    directory: str | Path,
    stem: str,
    vectors: np.ndarray | torch.Tensor,
    metadata: Sequence[Mapping[str, Any]],
) -> None:
    """Write one shard: (N, D) vectors as ``<stem>.npy`` and N metadata dicts as ``<stem>.jsonl``.

    The ``.jsonl`` goes first and the ``.npy`` last, each by temporary file and rename, so a shard
    with a ``.npy`` is complete even if the writer was killed.
    """
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ValueError(f"a shard stem must be a plain file name, got {stem!r}")
    array = as_float32_matrix(vectors)
    if len(metadata) != len(array):
        raise ValueError(f"{len(array)} vectors but {len(metadata)} metadata entries")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(encode_record(record, position) + "\n" for position, record in enumerate(metadata))
    atomic_write_text(directory / f"{stem}.jsonl", lines)
    atomic_write(directory / f"{stem}.npy", lambda file: np.save(file, array))


def write_manifest(directory: str | Path, model: str, modality: str, dim: int, shards: Sequence[str]) -> None:
    """Write ``manifest.json`` (atomically) once all ``shards`` are written."""
    text = json.dumps({"model": model, "modality": modality, "dim": dim, "shards": list(shards)}, indent=2)
    atomic_write_text(Path(directory) / MANIFEST_FILE, text + "\n")
