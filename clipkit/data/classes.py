"""Class names of labelled data: class-name files, class folders as names, and class folders matched
to given names.

Used where labelled data is written (``make-shards --class-folders``) and read (``clipkit eval
zeroshot`` on a class folder); plain Python.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file, with an error naming the file and what it should hold."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no {what}")
    return lines


def read_classnames(path: Path) -> list[str] | dict[str, str]:
    """A ``--classnames`` file: one class name per line in class-index order, or a JSON file with a
    list of names or an object mapping class-folder names to class names (``{"n01440764": "tench"}``)."""
    if path.suffix.lower() != ".json":
        return read_lines(path, "class names")
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    value = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and value and all(isinstance(v, str) for v in value.values()):
        return {str(k): v for k, v in value.items()}
    raise ValueError(f"{path} must hold a JSON list of class names or an object of folder name → class name")


def folder_classname(folder: str) -> str:
    """A class folder's name as a class name: ``golden_retriever`` → ``golden retriever``."""
    return folder.replace("_", " ")


def _name_key(name: str) -> str:
    """What matching a folder to a class name compares: case and ``_`` / space differences ignored."""
    return " ".join(folder_classname(name).lower().split())


def match_class_folders(folders: Sequence[str], classnames: list[str] | dict[str, str]) -> tuple[list[int], list[str]]:
    """Each class folder's index into the class names, and the class names in index order.

    ``classnames`` is a list (folders matched to names by name, ignoring case and ``_`` for spaces;
    names without a folder stay classes of the classifier) or a mapping folder → class name (the
    classes are then the folders in sorted order). A folder that matches no name, or two, is an error
    naming it: matching by position would silently score the wrong classes.
    """
    if isinstance(classnames, dict):
        unmapped = [folder for folder in folders if folder not in classnames]
        if unmapped:
            raise ValueError(f"{len(unmapped)} class folders are not in the class-name mapping: "
                             f"{', '.join(unmapped[:5])}{' ...' if len(unmapped) > 5 else ''}")
        return list(range(len(folders))), [classnames[folder] for folder in folders]
    by_key: dict[str, list[int]] = {}
    for i, name in enumerate(classnames):
        by_key.setdefault(_name_key(name), []).append(i)
    unmatched = [folder for folder in folders if folder not in by_key and _name_key(folder) not in by_key]
    ambiguous = [folder for folder in folders if len(by_key.get(_name_key(folder), [])) > 1]
    if unmatched or ambiguous:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} of the {len(folders)} class folders match no class name "
                            f"({', '.join(unmatched[:5])}{' ...' if len(unmatched) > 5 else ''})")
        if ambiguous:
            problems.append(f"the folders {', '.join(ambiguous[:5])} match several class names")
        raise ValueError(
            f"{'; '.join(problems)}. Class folders are matched to --classnames by name (any case, _ for a "
            f"space); to name folders such as WordNet ids, give a JSON file mapping each folder to its class name")
    return [by_key[_name_key(folder)][0] for folder in folders], list(classnames)


def class_folders(root: Path, classnames: list[str] | dict[str, str] | None = None
                  ) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet's (torchvision ImageFolder's) layout, ``ROOT/CLASS/...``: the class sub-folders in
    sorted order, each one's class index, and the class names in index order. Without
    ``classnames`` the classes are the folders, named by :func:`folder_classname`; with them, see
    :func:`match_class_folders`. Raises ValueError for a folder without sub-folders."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class sub-folders")
    if classnames is None:
        return folders, list(range(len(folders))), [folder_classname(folder.name) for folder in folders]
    labels, names = match_class_folders([folder.name for folder in folders], classnames)
    return folders, labels, names
