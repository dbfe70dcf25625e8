"""The indexes a service answers from, each swapped whole for its directory's new version.

A version is what one ``manifest.json`` describes: ``RetrievalIndex.save`` writes a whole new
directory and renames it into place, so a new manifest (a new file: new inode) means a complete new
version. The new version is opened on a loader thread while the old one keeps answering, then one
assignment on the event loop swaps it in: a request looks its index up once and keeps that version
until it is answered (an old memory-mapped file stays readable after the rebuild deletes it), so no
request fails or mixes two versions during a swap. A version that does not open (half copied,
damaged, another model) is refused and the one served stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.index import RetrievalIndex
from retrieval.manifest import MANIFEST_FILE

log = logging.getLogger("clipkit.serve")
Stamp = tuple[int, int, int, int]  # the manifest file's device, inode, mtime (ns) and size


@dataclass
class ServedIndex:
    """One index as the service answers from it: its model embeds text and image queries (None: the
    index records no model, so it takes vector and item queries only)."""

    index: RetrievalIndex
    model: Any | None


@dataclass(frozen=True)
class IndexSource:
    """Where one served index comes from: ``open(served)`` opens its current version (``served``,
    the version served now or None, lets it keep a model that still fits); ``directory`` is watched
    for new versions (None: an index in memory, served as opened)."""

    open: Callable[[ServedIndex | None], ServedIndex]
    directory: Path | None = None


class ReloadFailed(RuntimeError):
    """A new version did not open; the version served before stays."""


def _stamp(directory: Path | None) -> Stamp | None:
    if directory is None:
        return None
    try:
        info = os.stat(directory / MANIFEST_FILE)
    except OSError:  # between the two renames of a rebuild, or removed
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size


class ServedIndexes(Mapping[str, ServedIndex]):
    """name → the :class:`ServedIndex` served now. Read and swap it on the event loop only."""

    def __init__(self, sources: Mapping[str, IndexSource], on_reload: Callable[[str, str], None]) -> None:
        if not sources:
            raise ValueError("no index to serve")
        self._sources = dict(sources)
        self._stamps = {name: _stamp(source.directory) for name, source in self._sources.items()}
        self._served = {name: source.open(None) for name, source in self._sources.items()}
        self._refused: dict[str, Stamp | None] = {}  # the watcher does not retry a version that failed
        self._on_reload = on_reload  # (name, "reloaded" | "failed")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipkit-load")
        self._lock = asyncio.Lock()

    def __getitem__(self, name: str) -> ServedIndex:
        return self._served[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def reloadable(self, name: str) -> bool:
        return self._sources[name].directory is not None

    async def reload(self, name: str) -> None:
        """Open ``name``'s current version and swap it in; raises :class:`ReloadFailed` (serving the
        old version still) when it does not open."""
        async with self._lock:
            source = self._sources[name]
            stamp = _stamp(source.directory)
            try:
                opened = await asyncio.get_running_loop().run_in_executor(self._loader, source.open, self._served[name])
            except Exception as err:  # whatever the files hold, the service keeps the version it has
                self._refused[name] = stamp
                self._on_reload(name, "failed")
                raise ReloadFailed(f"index {name!r} kept the version it served: {type(err).__name__}: {err}") from err
            self._served[name], self._stamps[name] = opened, stamp
            self._refused.pop(name, None)
            self._on_reload(name, "reloaded")

    async def watch(self, seconds: float) -> None:
        """Every ``seconds``, reload each index whose directory holds a new version (runs until cancelled)."""
        while True:
            await asyncio.sleep(seconds)
            for name, source in self._sources.items():
                stamp = _stamp(source.directory)
                if stamp is None or stamp == self._stamps[name] or stamp == self._refused.get(name, ()):
                    continue
                try:
                    await self.reload(name)  # the source's opener says what it opened
                except ReloadFailed as err:
                    log.warning("%s", err)

    def close(self) -> None:
        self._loader.shutdown(wait=True)
