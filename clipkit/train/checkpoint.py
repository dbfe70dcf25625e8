"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain builtins only."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from clipkit import __version__
from clipkit.config import ExperimentConfig, from_dict
from clipkit.model import ContrastiveModel


def save_checkpoint(path: str | Path, model: ContrastiveModel, config: ExperimentConfig, **state: Any) -> Path:
    """Write model weights, the config (as a plain dict) and extra ``state`` atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "clipkit_version": __version__,
        "config": config.to_dict(),
        "model": model.state_dict(),
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    # A crash mid-write leaves only the .tmp file; the previous checkpoint at `path` stays intact.
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable clipkit checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not a clipkit checkpoint (expected 'model' and 'config' entries)")
    return payload


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ContrastiveModel, ExperimentConfig]:
    """Rebuild the model a checkpoint was trained with and load its weights; returns it in eval mode."""
    payload = load_checkpoint(path, map_location)
    config = from_dict(ExperimentConfig, payload["config"], source=f"checkpoint {path}")
    # The weights come from the checkpoint: never fetch the image tower's pretrained weights again.
    image = dataclasses.replace(config.model.image, pretrained=False, pretrained_file=None)
    model = ContrastiveModel(dataclasses.replace(config.model, image=image))
    model.load_state_dict(payload["model"])
    return model.to(map_location).eval(), config
