"""A disk cache of zero-shot classifiers: the same model × class names × templates is encoded once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of a model's weights: cheap (one reduction per tensor), and it changes with
    any training step, so a cached classifier is never used for other weights."""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1).double()
            summary = [float(flat.sum()), float(flat.abs().sum()), *flat[:4].tolist()] if flat.numel() else []
            digest.update(json.dumps([name, list(tensor.shape), summary]).encode())
    return digest.hexdigest()


def classifier_key(model: nn.Module, classnames: Sequence[str], templates: Sequence[str]) -> str:
    payload = json.dumps([model_fingerprint(model), list(classnames), list(templates)])
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
