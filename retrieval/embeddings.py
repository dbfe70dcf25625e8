"""The embeddings directory that ``clipkit embed`` writes and ``clipkit index build`` reads.

Layout::

    EMBEDDINGS_DIR/
      manifest.json        {"model": str, "modality": str, "dim": int, "shards": [stem, ...],
                            "counts": [N, ...], "sources": [path, ...], "model_fingerprint": str,
                            "model_spec": {"model": str, "pretrained": str | null}}
      <stem>.npy           float32 (N, dim) unit-norm vectors of one shard (or part)
      <stem>.jsonl         N lines, one JSON object of metadata per vector, in the same order

Row i of the concatenation of the shards, in manifest order, is vector id i of an index built from
the directory. A shard's ``.npy`` is written last (both files by temporary file and rename), so
a shard whose ``.npy`` exists is complete; the manifest lists only complete shards and is rewritten
as each is added. ``counts`` (each shard's vector count), ``sources`` (where its samples came from),
``model_fingerprint`` (the identity of the model's weights) and ``model_spec`` (how to load the
model again) are written by ``clipkit embed``; a directory without them still reads.
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
    """Which model embedded which modality into ``dim``-d vectors, and the shard stems in order, with
    (optionally) each shard's vector count and source, the model's fingerprint and how to load it."""

    model: str
    modality: str
    dim: int
    shards: tuple[str, ...]
    counts: tuple[int, ...] | None = None
    sources: tuple[str, ...] | None = None
    model_fingerprint: str | None = None
    model_spec: dict[str, str | None] | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"model": self.model, "modality": self.modality, "dim": self.dim,
                                "shards": list(self.shards)}
        optional = {"counts": self.counts, "sources": self.sources, "model_fingerprint": self.model_fingerprint,
                    "model_spec": self.model_spec}
        data.update({key: list(value) if isinstance(value, tuple) else value
                     for key, value in optional.items() if value is not None})
        return json.dumps(data, indent=2) + "\n"


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
    if not (directory / MANIFEST_FILE).is_file():
        raise EmbeddingsFormatError(f"{directory} has no {MANIFEST_FILE}: not an embeddings directory, "
                                    "or `clipkit embed` did not finish")
    return read_manifest_file(directory / MANIFEST_FILE)


def read_manifest_file(path: Path) -> EmbeddingsManifest:
    """One manifest file: ``manifest.json``, or the progress file of one rank of a ``clipkit embed`` job."""
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
    if len(set(data["shards"])) != len(data["shards"]):
        raise EmbeddingsFormatError(f"{path} lists a shard twice")
    per_shard = {}
    for key, kind in (("counts", int), ("sources", str)):
        value = data.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != len(data["shards"])
                                  or not all(isinstance(v, kind) for v in value)):
            raise EmbeddingsFormatError(f"{path}: {key!r} must be a list of one {kind.__name__} per shard")
        per_shard[key] = tuple(value) if value is not None else None
    fingerprint, spec = data.get("model_fingerprint"), data.get("model_spec")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise EmbeddingsFormatError(f"{path}: 'model_fingerprint' must be a string")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("model"), str)):
        raise EmbeddingsFormatError(f"{path}: 'model_spec' must be an object with a 'model' string")
    return EmbeddingsManifest(data["model"], data["modality"], data["dim"], tuple(data["shards"]),
                              per_shard["counts"], per_shard["sources"], fingerprint, spec)


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _open_shard(directory: Path, stem: str, dim: int, count: int | None) -> np.ndarray:
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
    if count is not None and count != len(array):
        raise EmbeddingsFormatError(f"shard {stem!r}: {vectors_path.name} holds {len(array)} vectors, but the "
                                    f"manifest recorded {count} when it was written: replaced or truncated")
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
    unlisted = sorted({path.stem for path in directory.glob("*.npy")} - set(manifest.shards))
    if unlisted:
        raise EmbeddingsFormatError(
            f"{directory} holds vectors that its manifest does not list ({', '.join(unlisted[:5])}"
            f"{' ...' if len(unlisted) > 5 else ''}): an interrupted `clipkit embed` (run it again to finish) "
            "or files copied in by hand; indexing only the listed ones would silently drop them")
    counts = manifest.counts or (None,) * len(manifest.shards)
    arrays = [_open_shard(directory, stem, manifest.dim, count) for stem, count in zip(manifest.shards, counts)]
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


def write_manifest(directory: str | Path, model: str, modality: str, dim: int, shards: Sequence[str],
                   file_name: str = MANIFEST_FILE, **details: Any) -> None:
    """Write ``manifest.json`` (or another ``file_name``) atomically, listing ``shards``, which must all be
    written; ``details`` are the optional fields of :class:`EmbeddingsManifest`."""
    details = {key: tuple(value) if isinstance(value, list) else value for key, value in details.items()}
    manifest = EmbeddingsManifest(model, modality, dim, tuple(shards), **details)
    atomic_write_text(Path(directory) / file_name, manifest.to_json())


def read_manifest(path: str | Path) -> EmbeddingsManifest:
    """The manifest of an embeddings directory (``EmbeddingsFormatError`` if it has none or it is bad)."""
    return _read_manifest(Path(path))
