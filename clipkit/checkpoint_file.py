"""Reading a clipkit checkpoint file without unpickling code: below the model and the trainer, so that
both (a tower initialised from a checkpoint, a resumed run) read checkpoints the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: a training checkpoint of an FSDP run (train.parallel fsdp), which "
                         "resumes that run; evaluate, export and serve its checkpoints/final.pt or best.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable clipkit checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not a clipkit checkpoint (expected 'model' and 'config' entries)")
    return payload
