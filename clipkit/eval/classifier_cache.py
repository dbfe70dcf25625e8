"""A disk cache of zero-shot classifiers: the same model × class names × templates is encoded once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch


def classifier_key(model: Any, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """The cache key of a classifier: the model's fingerprint (weights, architecture, tokenizer), the
    class names and the templates."""
    payload = json.dumps([model.fingerprint(), list(classnames), list(templates)])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class ClassifierCache:
    """Classifier weights (D, C) in ``folder/KEY.pt``, written atomically, read with ``weights_only``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged entry is rebuilt, not fatal
            return None

    def put(self, key: str, classifier: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path(key).with_suffix(f".tmp{os.getpid()}")
        torch.save(classifier.detach().cpu(), tmp)
        tmp.replace(self.path(key))
