"""retrieval.media: an item's media read back from real tar shards by its recorded offset (one seek),
found again when the shard was rewritten since, and a video's frame as a JPEG."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipkit.data.toy_video import encode_mp4
from retrieval.media import MediaNotFound, MediaReader, NotAVideo, media_members

LONG_KEY = "folder/" + "a-very-long-sample-name-" * 6  # over the 100 characters of a tar header's name field


def jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:  # PAX, Python's default: long names get an extended header
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def recorded(path: Path, key: str) -> dict:
    """The metadata ``clipkit embed`` records for ``key`` of shard ``path``."""
    kind, offset, size = media_members(path)[key]
    return {"key": key, "source": str(path), "media": {"type": kind, "offset": offset, "size": size}}


def test_recorded_offsets_read_the_member_and_a_rewritten_shard_is_listed_again(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    red, blue = jpeg((255, 0, 0), (40, 30)), jpeg((0, 0, 255), (30, 40))
    write_tar(shard, [("000.txt", b"a red box"), ("000.jpg", red), (f"{LONG_KEY}.jpg", blue)])
    first, long = recorded(shard, "000"), recorded(shard, LONG_KEY)
    reader = MediaReader()
    assert reader.read(first) == (red, "image/jpeg")
    assert reader.read(long) == (blue, "image/jpeg")
    assert not reader._members  # both read by their offsets: the shard was never listed

    # Rewritten in another order: the old offsets now point at other bytes, which are not trusted.
    write_tar(shard, [(f"{LONG_KEY}.jpg", blue), ("000.jpg", red), ("000.txt", b"a red box")])
    assert reader.read(first) == (red, "image/jpeg")
    assert reader.read(long) == (blue, "image/jpeg")
    assert len(reader._members) == 1  # listed once, for both
    without_offsets = {"key": "000", "source": str(shard)}  # an index built before offsets were recorded
    assert reader.read(without_offsets) == (red, "image/jpeg")


def test_what_cannot_be_read_back_says_why(tmp_path):
    shard = tmp_path / "shard.tar"
    write_tar(shard, [("000.jpg", jpeg((0, 255, 0), (8, 8)))])
    reader = MediaReader()
    with pytest.raises(MediaNotFound, match="names no source and key"):
        reader.read({"n": 3})
    with pytest.raises(MediaNotFound, match="not a file on this machine"):
        reader.read({"key": "000", "source": str(tmp_path / "gone.tar")})
    with pytest.raises(MediaNotFound, match="no media member for key '001'"):
        reader.read({"key": "001", "source": str(shard)})
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x01" * 2048)
    with pytest.raises(MediaNotFound, match="cannot be read as a tar"):
        reader.read({"key": "000", "source": str(broken)})
    with pytest.raises(NotAVideo, match="image/jpeg, not a video"):
        reader.frame(recorded(shard, "000"), 0.5)


def test_a_video_item_gives_its_frames_as_jpegs(tmp_path):
    # 9 frames of 32 × 48 px whose brightness rises from 0 to 240: a frame's mean says which it is.
    frames = np.stack([np.full((32, 48, 3), 30 * i, dtype=np.uint8) for i in range(9)])
    shard = tmp_path / "clips.tar"
    write_tar(shard, [("clip.mp4", encode_mp4(frames, fps=8)), ("clip.txt", b"brighter and brighter")])
    item = recorded(shard, "clip")
    reader = MediaReader()
    assert reader.read(item)[1] == "video/mp4"
    means = []
    for at in (0.0, 0.5, 1.0):
        picture = Image.open(io.BytesIO(reader.frame(item, at)))
        assert picture.format == "JPEG" and picture.size == (48, 32)
        means.append(np.asarray(picture).mean())
    assert means == pytest.approx([0, 120, 240], abs=12)
    broken = dict(item, media=None, key="clip")
    write_tar(shard, [("clip.mp4", b"\x00\x00\x00 not a video")])
    with pytest.raises(MediaNotFound, match="does not decode"):
        reader.frame(broken, 0.5)
