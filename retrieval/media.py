"""An indexed item's media (its image, audio or video file) read back from where ``clipkit embed`` found
it: a member of the webdataset shard named by the item's ``source``, or the file itself.

``clipkit embed`` records where each item's media member lies in its (uncompressed) tar
(:func:`media_members`: ``{"media": {"type", "offset", "size"}}`` in the item's metadata), so reading
it back is one seek and one read. The member's tar header, just before its bytes, is read with them
and must still name the item's key and size: a shard rewritten since is not trusted blindly but
listed again (the listing kept for the last :data:`SHARDS_KEPT` shards, keyed by their size and
modification time). The paths come from the index's own metadata, never from a client.

A video item's media may also be asked for as one frame (a JPEG), which is what a page of results
shows.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import av

MEDIA_TYPES = {
    "jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
    "bmp": "image/bmp", "flac": "audio/flac", "wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg",
    "mp4": "video/mp4", "webm": "video/webm",
}
VIDEO_TYPES = ("mp4", "webm")
SHARDS_KEPT = 64
FRAME_JPEG_QUALITY = 90
Member = tuple[str, int, int]  # extension, data offset, size


class MediaNotFound(LookupError):
    """The item's media cannot be read back (moved, remote, or it has none)."""


class NotAVideo(ValueError):
    """A frame was asked of an item whose media is not a video."""


def media_members(path: str | Path) -> dict[str, Member]:
    """key → (extension, data offset, size) of the first media member of each sample in the tar ``path``.

    Raises ``tarfile.TarError`` or ``OSError`` for a file that is not a readable tar.
    """
    members: dict[str, Member] = {}
    with tarfile.open(path, "r:") as tar:  # offsets are file offsets only in an uncompressed tar
        for member in tar:
            key, _, kind = member.name.rpartition(".")
            if member.isfile() and kind.lower() in MEDIA_TYPES and key not in members:
                members[key] = (kind.lower(), member.offset_data, member.size)
    return members


def _recorded(metadata: dict[str, Any]) -> Member | None:
    media = metadata.get("media")
    if not isinstance(media, dict):
        return None
    kind, offset, size = media.get("type"), media.get("offset"), media.get("size")
    if kind in MEDIA_TYPES and isinstance(offset, int) and isinstance(size, int) and offset >= tarfile.BLOCKSIZE:
        return kind, offset, size
    return None


def _header_matches(header: bytes, key: str, kind: str, size: int) -> bool:
    """Whether the tar header block ``header`` is that of member ``key.kind`` of ``size`` bytes (a name
    longer than the header's field is stored elsewhere and only its start is compared)."""
    try:
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        return False
    return info.size == size and bool(info.name) and f"{key}.{kind}".startswith(info.name)


class MediaReader:
    """Reads items' media; not thread-safe (the service calls it from its one worker thread)."""

    def __init__(self) -> None:
        self._members: OrderedDict[tuple[Path, int, int], dict[str, Member]] = OrderedDict()

    def read(self, metadata: dict[str, Any]) -> tuple[bytes, str]:
        """(bytes, media type) of the item whose metadata is ``metadata``."""
        data, kind = self._read(metadata)
        return data, MEDIA_TYPES[kind]

    def frame(self, metadata: dict[str, Any], at: float) -> bytes:
        """A JPEG of the frame ``at`` (0 the first, 1 the last) of the item's video."""
        data, kind = self._read(metadata)
        if kind not in VIDEO_TYPES:
            raise NotAVideo(f"the item's media is {MEDIA_TYPES[kind]}, not a video")
        try:
            with av.open(io.BytesIO(data)) as container:
                stream = container.streams.video[0]
                wanted = round(at * max((stream.frames or 1) - 1, 0))
                picture = None
                for number, frame in enumerate(container.decode(stream)):
                    picture = frame
                    if number >= wanted:
                        break
        except (av.FFmpegError, IndexError) as err:
            raise MediaNotFound(f"the item's video does not decode ({err})") from None
        if picture is None:
            raise MediaNotFound("the item's video holds no frame")
        out = io.BytesIO()
        picture.to_image().save(out, format="JPEG", quality=FRAME_JPEG_QUALITY)
        return out.getvalue()

    def _read(self, metadata: dict[str, Any]) -> tuple[bytes, str]:
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
            return path.read_bytes(), kind
        recorded = _recorded(metadata)
        if recorded is not None:
            kind, offset, size = recorded
            with path.open("rb") as shard:
                shard.seek(offset - tarfile.BLOCKSIZE)
                block = shard.read(tarfile.BLOCKSIZE + size)
            if len(block) == tarfile.BLOCKSIZE + size and _header_matches(block[: tarfile.BLOCKSIZE], key, kind, size):
                return block[tarfile.BLOCKSIZE :], kind
        found = self._shard_members(path).get(key)  # not recorded, or the shard changed since
        if found is None:
            raise MediaNotFound(f"{path.name} holds no media member for key {key!r}")
        kind, offset, size = found
        with path.open("rb") as shard:
            shard.seek(offset)
            return shard.read(size), kind

    def _shard_members(self, path: Path) -> dict[str, Member]:
        info = os.stat(path)
        cache_key = (path, info.st_size, info.st_mtime_ns)
        if cache_key in self._members:
            self._members.move_to_end(cache_key)
            return self._members[cache_key]
        try:
            members = media_members(path)
        except (tarfile.TarError, OSError) as err:
            raise MediaNotFound(f"{path.name} cannot be read as a tar ({err})") from None
        self._members[cache_key] = members
        if len(self._members) > SHARDS_KEPT:
            self._members.popitem(last=False)
        return members
