"""Which parts of an embeddings folder are done, across the ranks of a ``clipkit embed`` job.

A single process records each finished part in ``manifest.json`` itself. Each rank of a job of
several writes its own ``manifest.rank-RRRRR.json`` instead (the same format), so ranks never write
one file; when every rank is done, rank 0 merges them into ``manifest.json`` and removes them. A job
killed before that leaves its rank files: the next run, with any number of ranks, counts their
parts as done and merges them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retrieval.embeddings import MANIFEST_FILE, EmbeddingsManifest, read_manifest_file, write_manifest

RANK_FILE_GLOB = "manifest.rank-*.json"


def rank_file(rank: int) -> str:
    return f"manifest.rank-{rank:05d}.json"


@dataclass(frozen=True)
class FolderIdentity:
    """What every manifest of the folder must agree on: the model and the modality."""

    model: str
    modality: str
    fingerprint: str
    spec: dict[str, str | None] | None


@dataclass(frozen=True)
class _Entry:
    stem: str
    count: int | None
    source: str | None


def _entries(manifest: EmbeddingsManifest) -> list[_Entry]:
    counts = manifest.counts or (None,) * len(manifest.shards)
    sources = manifest.sources or (None,) * len(manifest.shards)
    return [_Entry(*row) for row in zip(manifest.shards, counts, sources)]


def _manifests(out: Path) -> list[tuple[Path, EmbeddingsManifest]]:
    """The folder's ``manifest.json`` first, then its rank files, each read and checked."""
    paths = [out / MANIFEST_FILE] if (out / MANIFEST_FILE).is_file() else []
    return [(path, read_manifest_file(path)) for path in [*paths, *sorted(out.glob(RANK_FILE_GLOB))]]


class PartLedger:
    """The done parts of ``out``, and this rank's record of the parts it finishes."""

    def __init__(self, out: Path, identity: FolderIdentity, rank: int = 0, world_size: int = 1) -> None:
        self.out = out
        self.identity = identity
        self.file_name = MANIFEST_FILE if world_size == 1 else rank_file(rank)
        found = _manifests(out)
        self.existing = [manifest for _, manifest in found]
        self.dim = next((m.dim for m in self.existing), None)
        self.done = {entry.stem for manifest in self.existing for entry in _entries(manifest)}
        # An index built from the folder numbers vectors in this order, so these parts keep it.
        self.listed = [entry.stem for path, manifest in found if path.name == MANIFEST_FILE
                       for entry in _entries(manifest)]
        # This process's file starts from what it held (a rank file of a killed run keeps its parts);
        # the other files' parts join manifest.json at the merge.
        self.entries = [entry for path, manifest in found if path.name == self.file_name
                        for entry in _entries(manifest)]

    def add(self, stem: str, count: int, source: str, dim: int) -> None:
        """Record a part whose files are written."""
        self.dim = self.dim or dim
        self.entries.append(_Entry(stem, count, source))
        self.done.add(stem)
        _write(self.out, self.file_name, self.identity, self.dim, self.entries)

    def merge(self, order: Sequence[str]) -> int:
        """Rank 0, once every rank is done: fold every manifest of the folder into ``manifest.json``
        (the parts it listed when the job started first, as they were, then the others in ``order``,
        the job's part order) and remove the rank files. Returns the number of parts listed."""
        found = _manifests(self.out)
        entries = _unique(entry for _, manifest in found for entry in _entries(manifest))
        position = {stem: i for i, stem in enumerate(dict.fromkeys([*self.listed, *order]))}
        entries.sort(key=lambda entry: position.get(entry.stem, len(position)))
        if entries:
            _write(self.out, MANIFEST_FILE, self.identity, found[0][1].dim, entries)
        for path, _ in found:
            if path.name != MANIFEST_FILE:
                path.unlink()
        return len(entries)


def _unique(entries) -> list[_Entry]:
    seen: dict[str, _Entry] = {}
    for entry in entries:
        seen.setdefault(entry.stem, entry)
    return list(seen.values())


def _write(out: Path, file_name: str, identity: FolderIdentity, dim: int, entries: Sequence[_Entry]) -> None:
    counts = [e.count for e in entries]
    sources = [e.source for e in entries]
    write_manifest(out, identity.model, identity.modality, dim, [e.stem for e in entries], file_name=file_name,
                   counts=counts if None not in counts else None, sources=sources if None not in sources else None,
                   model_fingerprint=identity.fingerprint, model_spec=identity.spec)
