"""Writing webdataset tar shards in the img2dataset layout, deterministically and atomically."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

_EXTENSION = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def shard_name(prefix: str, index: int) -> str:
    """The file name of shard ``index``: ``PREFIX-NNNNNN.tar``."""
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(out_dir: Path, prefix: str, count: int) -> str:
    """A brace pattern naming shards 0 .. count-1 of ``prefix``, e.g. ``out/train-{000000..000009}.tar``."""
    if count < 1:
        raise ValueError(f"no {prefix} shards in {out_dir}")
    if count == 1:
        return str(out_dir / shard_name(prefix, 0))
    return str(out_dir / f"{prefix}-{{{0:06d}..{count - 1:06d}}}.tar")


class ShardWriter:
    """Writes samples (``KEY.EXT`` members) into ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ...

    Tar headers carry fixed metadata (mtime 0, uid/gid 0), so the same samples always give the same
    bytes. Each shard is written to ``NAME.tar.tmp`` and renamed when complete: a crash never leaves a
    truncated ``.tar`` behind, and an error inside ``with ShardWriter(...)`` discards the open shard. On close, ``sizes.json`` in ``out_dir`` records every shard's sample count.

    Numbering starts at ``first_shard``. Several processes writing shards into one folder pass
    ``write_sizes=False`` (they would race on ``sizes.json``) and let one process record the counts
    with :func:`update_sizes_index`.
    """

    def __init__(
        self, out_dir: str | Path, prefix: str, samples_per_shard: int, *, first_shard: int = 0,
        write_sizes: bool = True,
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.first_shard = first_shard
        self.write_sizes = write_sizes
        self.shard_paths: list[Path] = []
        self.num_samples = 0
        self._sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps extension ("jpg", "txt", "json", ...) to the member's bytes."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key must be non-empty without '.' or '/', got {key!r}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        for ext in files:
            if not _EXTENSION.match(ext):
                raise ValueError(f"bad extension {ext!r} for sample {key!r}")
        if self._tar is None or self._in_shard == self.samples_per_shard:
            self._open_next_shard()
        assert self._tar is not None
        for ext in sorted(files):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.num_samples += 1

    def _open_next_shard(self) -> None:
        self._close_shard()
        path = self.out_dir / shard_name(self.prefix, self.first_shard + len(self.shard_paths))
        self.shard_paths.append(path)
        self._tar = tarfile.open(path.with_name(path.name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self.shard_paths[-1]
        os.replace(path.with_name(path.name + ".tmp"), path)
        self._sizes[path.name] = self._in_shard
        self._tar = None

    def close(self) -> None:
        self._close_shard()
        if self.write_sizes:
            update_sizes_index(self.out_dir, self._sizes)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._abort_shard()
        self.close()

    def _abort_shard(self) -> None:
        """Drop the shard being written: after an error it is incomplete and must not look finished."""
        if self._tar is None:
            return
        self._tar.close()
        path = self.shard_paths.pop()
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        self._tar = None


def update_sizes_index(out_dir: Path, sizes: Mapping[str, int], *, remove: Iterable[str] = ()) -> None:
    """Merge shard sample counts into ``out_dir/sizes.json``, dropping the shard names in ``remove``.

    The file is replaced atomically, so a reader never sees it half written.
    """
    index = Path(out_dir) / "sizes.json"
    merged = json.loads(index.read_text()) if index.is_file() else {}
    for name in remove:
        merged.pop(name, None)
    merged.update(sizes)
    tmp = index.with_name("sizes.json.tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1))
    os.replace(tmp, index)
