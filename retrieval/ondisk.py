"""IVF inverted lists built on disk, for indexes larger than memory.

The vectors are added in chunks, each into its own copy of the trained, empty index, which is written
to disk; FAISS's ``merge_ondisk`` then merges the chunks' lists into one ``index.ivfdata`` file of
``OnDiskInvertedLists``. Memory holds one chunk's codes at a time (the input vectors stay memory-mapped),
and a saved index maps the lists file instead of reading it.

Lists on disk are never added to afterwards: FAISS's ``OnDiskInvertedLists.add_entries`` after a merge
returned wrong ids for some queries when tried (FAISS 1.15), so the index is read-only from the merge on,
and ``RetrievalIndex`` keeps its tuning queries out of results with a selector instead of adding them late.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from retrieval.vectors import VectorSource

LISTS_FILE = "index.ivfdata"
# Vectors per chunk: a chunk's float32 rows and its rotated copy take 2 × 262,144 × 4 × d bytes (512 MB
# at 512-d) beside its codes.
CHUNK_VECTORS = 262_144
# FAISS reads an on-disk index's lists file from the index file's folder (not from the path it
# recorded), so the file keeps its name wherever the index goes.
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY


def fill_on_disk(index: faiss.Index, source: VectorSource, folder: Path, chunk_vectors: int = CHUNK_VECTORS) -> None:
    """Add every vector of ``source`` (its row number as id) to the trained, empty IVF ``index``, with
    the inverted lists in ``folder / LISTS_FILE``."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".chunks-") as chunks:
        paths = []
        start = 0
        for number, rows in enumerate(source.chunks(chunk_vectors)):
            part = faiss.clone_index(index)
            part.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
            paths.append(str(Path(chunks) / f"{number:06d}.faiss"))
            faiss.write_index(part, paths[-1])
            start += len(rows)
            del part
        merge_ondisk(index, paths, str(folder / LISTS_FILE))


def lists_file(index: faiss.Index) -> Path | None:
    """The file of ``index``'s on-disk inverted lists, or None if they are in memory (or it has none)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename) if isinstance(lists, faiss.OnDiskInvertedLists) else None


def place_lists(index: faiss.Index, directory: Path, scratch: Path | None) -> None:
    """Put ``index``'s lists file into ``directory`` (where its saved index file goes): moved when it is
    in the build's ``scratch`` folder (a rename on one file system), copied from a saved index."""
    current = lists_file(index)
    if current is None:
        return
    target = directory / LISTS_FILE
    if scratch is not None and current.parent == scratch:
        shutil.move(current, target)
    else:
        shutil.copyfile(current, target)
