"""An indexed item's media (its image, audio or video file) read back from where ``clipkit embed`` found
it: a member of the webdataset shard named by the item's ``source``, or the file itself.

The paths come from the index's own metadata, never from a client. A shard's members are listed once
(their data offsets and sizes) and kept for the last :data:`SHARDS_KEPT` shards, so serving an item
after that is one seek and one read.
"""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

MEDIA_TYPES = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
    "bmp": "image/bmp", "flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg",
    "mp4": "video/mp4", "webm": "video/webm",
}
SHARDS_KEPT = 64


class MediaNotFound(LookupError):
    """The item's media cannot be read back (moved, remote, or it has none)."""


class MediaReader:
    """Reads items' media; not thread-safe (the service calls it from its one worker thread)."""

    def __init__(self) -> None:
        self._members: OrderedDict[Path, dict[str, tuple[str, int, int]]] = OrderedDict()

    def read(self, metadata: dict[str, Any]) -> tuple[bytes, str]:
        """(bytes, media type) of the item whose metadata is ``metadata``."""
        source, key = metadata.get("source"), metadata.get("key")
        if not isinstance(source, str) or not isinstance(key, str):
            raise MediaNotFound("the item's metadata names no source and key to read its media from")
        path = Path(source)
        if not path.is_file():
            raise MediaNotFound(f"the item's source {source} is not a file on this machine")
        if path.suffix.lower() != ".tar":
            kind = path.suffix[1:].lower()
            if kind not in MEDIA_TYPES:
                raise MediaNotFound(f"{path.name} is not a media file this service serves")
            return path.read_bytes(), MEDIA_TYPES[kind]
        found = self._shard_members(path).get(key)
        if found is None:
            raise MediaNotFound(f"{path.name} holds no media member for key {key!r}")
        kind, offset, size = found
        with path.open("rb") as shard:
            shard.seek(offset)
            return shard.read(size), MEDIA_TYPES[kind]

    def _shard_members(self, path: Path) -> dict[str, tuple[str, int, int]]:
        """key → (extension, data offset, size) of the first media member of each sample in ``path``."""
        if path in self._members:
            self._members.move_to_end(path)
            return self._members[path]
        members: dict[str, tuple[str, int, int]] = {}
        try:
            with tarfile.open(path, "r:") as tar:  # offsets are file offsets only in an uncompressed tar
                for member in tar:
                    key, _, kind = member.name.rpartition(".")
                    if member.isfile() and kind.lower() in MEDIA_TYPES and key not in members:
                        members[key] = (kind.lower(), member.offset_data, member.size)
        except (tarfile.TarError, OSError) as err:
            raise MediaNotFound(f"{path.name} cannot be read as a tar ({err})") from None
        self._members[path] = members
        if len(self._members) > SHARDS_KEPT:
            self._members.popitem(last=False)
        return members
