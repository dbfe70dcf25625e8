"""Query embeddings from a model: text through its tokenizer, files through its evaluation decoder.

The model is anything with clipkit's encoder interface (``clipkit.eval.encoders.Encoder``):
``tokenize(texts)``, ``encode(modality, inputs)`` returning unit-norm (B, D) features, and
``eval_decoder(modality).decode(bytes, rng)`` turning one file's bytes into one input tensor.
torch is imported inside the functions, where a model has loaded it already, so that ``import
retrieval`` stays light for building and searching with vectors alone.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


def model_device(model: Any) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    import torch

    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


def encode_texts(model: Any, texts: Sequence[str]) -> np.ndarray:
    """N strings → (N, D) float32 embeddings."""
    if isinstance(texts, str) or not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
    import torch

    with torch.no_grad():
        features = model.encode("text", model.tokenize(list(texts)))
    return features.detach().float().cpu().numpy()


def read_input(data: bytes | str | Path) -> bytes:
    """A query file's bytes: ``data`` itself, or the contents of the file it names."""
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no query file at {path}")
        return path.read_bytes()
    raise TypeError(f"a query must be bytes or a file path, got {type(data).__name__}")


def file_modality(model: Any, file: bytes | str | Path) -> str:
    """The modality of ``model`` whose evaluation decoder takes the file's extension (e.g. ``.flac`` →
    audio); bytes carry no extension, so they need the modality named."""
    if isinstance(file, bytes):
        raise ValueError("a query given as bytes has no file extension: name its modality")
    extension = Path(file).suffix.lower().lstrip(".")
    matches = [name for name in model.modalities if extension in model.eval_decoder(name).extensions]
    if not matches:
        raise ValueError(f"{file}: no tower of the model ({', '.join(model.modalities)}) decodes .{extension} "
                         f"files: name the query's modality")
    return matches[0]


def encode_file(model: Any, modality: str, data: bytes | str | Path) -> np.ndarray:
    """One file (bytes or path) of ``modality`` → (1, D) float32 embedding."""
    import torch

    raw = read_input(data)
    # Evaluation decoders draw nothing at random; a fixed rng keeps any that do reproducible.
    sample = model.eval_decoder(modality).decode(raw, random.Random(0))
    batch = torch.as_tensor(sample).unsqueeze(0).to(model_device(model))
    with torch.no_grad():
        features = model.encode(modality, batch)
    return features.detach().float().cpu().numpy()
