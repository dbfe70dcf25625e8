"""Per-vector metadata in SQLite: one JSON object per id, fetched with hits and filtered by field.

A store opened from a saved index directory is read-only; the first change copies it into a private
temporary database, so the directory on disk only ever changes through ``RetrievalIndex.save``.
"""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, metadata TEXT NOT NULL);
-- Ids removed from an index that cannot delete vectors (HNSW): searches skip them.
CREATE TABLE IF NOT EXISTS deleted (id INTEGER PRIMARY KEY);
"""
_BATCH = 10_000
FilterValue = str | int | float | bool


class MetadataError(ValueError):
    """Metadata that cannot be stored: not a JSON object, not JSON-serialisable, or the wrong count."""


def _json_default(value: Any) -> Any:
    """Let numpy scalars (what array code tends to hand over) serialise as the Python numbers they are."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def encode_record(record: Any, position: int) -> str:
    """One metadata dict → its JSON text; ``MetadataError`` naming ``position`` if it cannot be stored."""
    if not isinstance(record, Mapping):
        raise MetadataError(f"metadata[{position}] must be a dict, got {type(record).__name__}")
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise MetadataError(f"metadata[{position}] cannot be stored as JSON: {err}") from err


def _json_path(field: str) -> str:
    if not isinstance(field, str) or not field or '"' in field:
        raise ValueError(f"a filter field must be a non-empty name without '\"', got {field!r}")
    return f'$."{field}"'


def _sql_value(field: str, value: FilterValue) -> str | int | float:
    # SQLite's json_extract gives JSON true/false as 1/0.
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (str, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise ValueError(f"filter {field}= must be a string, number or bool, got {value!r}")


def _connect(database: str, uri: bool = False) -> sqlite3.Connection:
    # A store may be opened on one thread and used on another, one at a time (``clipkit serve`` opens
    # a new index version on its loader thread and answers from its worker thread).
    return sqlite3.connect(database, uri=uri, check_same_thread=False)


class MetadataStore:
    """Metadata dicts keyed by int64 vector id, plus the ids of deleted-but-still-indexed vectors."""

    def __init__(self, connection: sqlite3.Connection, read_only: bool) -> None:
        self._db = connection
        self._read_only = read_only
        if not read_only:
            self._db.executescript(_SCHEMA)

    @classmethod
    def temporary(cls) -> "MetadataStore":
        """An empty store in a private temporary database (SQLite keeps it on disk once it grows)."""
        return cls(_connect(""), read_only=False)

    @classmethod
    def open(cls, path: str | Path) -> "MetadataStore":
        """The store saved at ``path``, opened read-only (copied on the first change)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no metadata store at {path}")
        connection = _connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            connection.execute("SELECT id, metadata FROM items LIMIT 1").fetchall()
            connection.execute("SELECT id FROM deleted LIMIT 1").fetchall()
        except sqlite3.DatabaseError as err:
            connection.close()
            raise MetadataError(f"{path} is not a retrieval metadata store: {err}") from err
        return cls(connection, read_only=True)

    def _writable(self) -> sqlite3.Connection:
        if self._read_only:
            private = _connect("")
            self._db.backup(private)
            self._db.close()
            self._db, self._read_only = private, False
        return self._db

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def insert(self, first_id: int, records: Iterable[Mapping[str, Any]], expected: int) -> None:
        """Store ``records`` under ids ``first_id, first_id + 1, ...``; there must be ``expected`` of them.

        Raises ``MetadataError`` (and stores nothing) for a bad record or a different count.
        """
        db = self._writable()
        count = 0

        def rows() -> Iterator[tuple[int, str]]:
            nonlocal count
            for position, record in enumerate(records):
                if position == expected:
                    raise MetadataError(f"more metadata entries than the {expected} vectors")
                count = position + 1
                yield first_id + position, encode_record(record, position)

        try:
            with db:  # one transaction: all or nothing
                iterator = rows()
                while batch := list(itertools.islice(iterator, _BATCH)):
                    db.executemany("INSERT INTO items (id, metadata) VALUES (?, ?)", batch)
                if count != expected:
                    raise MetadataError(f"{expected} vectors but {count} metadata entries")
        except sqlite3.IntegrityError as err:
            raise MetadataError(f"metadata ids from {first_id} are already taken: {err}") from err

    def get(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The metadata of each stored id among ``ids`` (missing ids are left out)."""
        wanted = json.dumps([int(i) for i in ids])
        rows = self._db.execute(
            "SELECT id, metadata FROM items WHERE id IN (SELECT value FROM json_each(?))", (wanted,)
        )
        return {row_id: json.loads(text) for row_id, text in rows}

    def missing(self, ids: np.ndarray) -> np.ndarray:
        """Those of ``ids`` that have no stored metadata."""
        rows = self._db.execute(
            "SELECT id FROM items WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids.tolist()),)
        )
        present = {row[0] for row in rows}
        return np.array([i for i in ids.tolist() if i not in present], dtype=np.int64)

    def delete(self, ids: np.ndarray, keep_as_deleted: bool) -> None:
        """Forget the metadata of ``ids``; with ``keep_as_deleted`` also record them as deleted vectors."""
        db = self._writable()
        rows = [(int(i),) for i in ids]
        with db:
            db.executemany("DELETE FROM items WHERE id = ?", rows)
            if keep_as_deleted:
                db.executemany("INSERT OR IGNORE INTO deleted (id) VALUES (?)", rows)

    def deleted_ids(self) -> np.ndarray:
        """Ids recorded by ``delete(..., keep_as_deleted=True)``, ascending."""
        return np.array([row[0] for row in self._db.execute("SELECT id FROM deleted ORDER BY id")], dtype=np.int64)

    def matching(self, where: Mapping[str, FilterValue]) -> np.ndarray:
        """Ascending ids whose metadata has every ``field: value`` of ``where`` (a scan of the store)."""
        if not where:
            raise ValueError("a filter needs at least one field=value")
        clauses, values = [], []
        for field, value in where.items():
            clauses.append("json_extract(metadata, ?) = ?")
            values += [_json_path(field), _sql_value(field, value)]
        query = f"SELECT id FROM items WHERE {' AND '.join(clauses)} ORDER BY id"
        return np.array([row[0] for row in self._db.execute(query, values)], dtype=np.int64)

    def save(self, path: Path) -> None:
        """Write a consistent copy of the store to a new file at ``path``."""
        target = sqlite3.connect(path)
        try:
            self._db.backup(target)
        finally:
            target.close()
