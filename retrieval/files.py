"""Atomic writes: a file or a whole directory appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def write_directory_atomically(path: Path, fill: Callable[[Path], None], replaceable: Callable[[Path], bool]) -> None:
    """Create the directory ``path`` by calling ``fill(temporary_directory)`` and renaming the result.

    An existing ``path`` is replaced only if ``replaceable(path)`` says it holds what we write (or it
    is empty), so a wrong path never deletes someone's data. The old directory is moved aside before
    the new one is renamed in and deleted after, so ``path`` is always either the old or the new
    version (between the two renames, the old one is at ``.NAME.old-*``).
    """
    path = Path(path)
    if path.exists() and not (path.is_dir() and (replaceable(path) or not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists and is not an index directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    temporary = path.with_name(f".{path.name}.tmp-{token}")
    temporary.mkdir()
    try:
        fill(temporary)
        for child in temporary.iterdir():
            _fsync_path(child)
        old = path.with_name(f".{path.name}.old-{token}")
        if path.exists():
            os.rename(path, old)
        os.rename(temporary, path)
        _fsync_path(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
