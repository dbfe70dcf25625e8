"""Where an evaluation dataset's files are: which kind it is, its shards, and its side files.

Kinds: webdataset shards (a brace pattern, a folder of ``.tar``, or a CLIP_benchmark dataset folder
``ROOT/SPLIT/0.tar ...``), a class folder (one sub-folder per class) or a CSV/TSV. Side files
(``classnames.txt``, ``zeroshot_classification_templates.txt``, ``dataset_type.txt``) are read
beside the shards or one folder up, where CLIP_benchmark's builder writes them. Plain Python, no
torch: the command line reads the constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from clipkit.data.remote import cached_side_file, parent_url
from clipkit.data.shards import expand_shards, is_local, missing_local_shards, natural_key
from clipkit.errors import DataError

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
# CLIP_benchmark's markers: the split's shard count, and "retrieval" / "multilabel" (else classification).
NSHARDS_FILE = "nshards.txt"
DATASET_TYPE_FILE = "dataset_type.txt"


@dataclass(frozen=True)
class DatasetLayout:
    """An evaluation dataset located on disk.

    ``kind`` is ``shards``, ``folder`` or ``csv``; ``shards`` the shard URLs (shards only);
    ``folder`` where the data is (the shards' folder, the class folder, or the CSV's folder).
    """

    spec: str
    kind: str
    folder: Path
    shards: tuple[str, ...] = ()

    def side_file(self, name: str) -> Path | None:
        """A side file beside the data or one folder up (CLIP_benchmark's ``ROOT/classnames.txt``
        beside ``ROOT/test/``), or None. Beside remote shards it is fetched into a local cache; a
        ``pipe:`` command has no folder, so no side files."""
        if self.shards and not is_local(self.shards[0]):
            if self.shards[0].startswith("pipe:"):
                return None
            folder = parent_url(self.shards[0])
            above = [f"{parent_url(folder)}/{name}"] if urlsplit(folder).path.strip("/") else []
            for url in (f"{folder}/{name}", *above):
                found = cached_side_file(url)
                if found is not None:
                    return found
            return None
        for folder in (self.folder, self.folder.parent):
            if (folder / name).is_file():
                return folder / name
        return None

    @property
    def dataset_type(self) -> str | None:
        """CLIP_benchmark's ``dataset_type.txt`` (``retrieval``, ``multilabel``), if the dataset has one."""
        path = self.side_file(DATASET_TYPE_FILE)
        return path.read_text(encoding="utf-8").strip().lower() if path else None


def _folder_shards(folder: Path) -> list[str] | None:
    """The shards of a folder in index order (``nshards.txt`` if present), or None if it has none."""
    nshards = folder / NSHARDS_FILE
    if nshards.is_file():
        count = int(nshards.read_text().strip())
        return [str(folder / f"{i}.tar") for i in range(count)]
    tars = sorted(folder.glob("*.tar"), key=lambda p: natural_key(p.name))
    return [str(p) for p in tars] if tars else None


def resolve_dataset(spec: str, split: str = "test") -> DatasetLayout:
    """Locate the dataset ``spec`` names; ``split`` picks ``ROOT/SPLIT`` of a CLIP_benchmark folder.

    Missing shards are an error naming them, so a mistyped pattern never evaluates a subset.
    """
    path = Path(spec)
    if spec.endswith((".csv", ".tsv")):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation dataset not found: {spec}")
        return DatasetLayout(spec, "csv", path.parent)
    if ".tar" in spec:
        return _shards(spec, expand_shards(spec))
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation dataset not found: {spec} (a shard pattern, a folder or a .csv)")
    shards = _folder_shards(path)
    if shards is not None:
        return _shards(spec, shards)
    split_shards = _folder_shards(path / split) if (path / split).is_dir() else None
    if split_shards is not None:  # a CLIP_benchmark dataset folder: ROOT/test/0.tar, ROOT/classnames.txt
        return _shards(spec, split_shards)
    with_tars = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.tar")))
    if with_tars:
        raise DataError(f"{spec} holds shards in the sub-folders {', '.join(with_tars)} but none in '{split}': "
                        f"pass --split with one of them, or the shards themselves")
    return DatasetLayout(spec, "folder", path)


def _shards(spec: str, urls: list[str]) -> DatasetLayout:
    missing = missing_local_shards(urls)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{len(missing)} of the {len(urls)} shards of {spec} do not exist: "
                                f"{', '.join(missing[:3])}{more}")
    return DatasetLayout(spec, "shards", Path(urls[0]).parent, tuple(urls))
