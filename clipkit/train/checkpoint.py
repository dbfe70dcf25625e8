"""Checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain builtins only.

A training checkpoint holds everything needed to continue a run exactly: model, optimizer,
scheduler and grad-scaler states, the step, the data position, the RNG states and the config.
Files are written to a temporary name and renamed, and the ``latest.json`` pointer is replaced only
after its checkpoint is complete, so a crash mid-save never leaves a broken "latest".
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit import __version__
from clipkit.checkpoint_file import load_checkpoint
from clipkit.config import ExperimentConfig, from_dict
from clipkit.model import ContrastiveModel, model_for_weights

LATEST_POINTER = "latest.json"
_STEP_FILE = re.compile(r"^step-(\d+)(\.pt)?$")


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


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[ContrastiveModel, ExperimentConfig]:
    """Rebuild the model a checkpoint was trained with and load its weights; returns it in eval mode."""
    payload = load_checkpoint(path, map_location)
    config = from_dict(ExperimentConfig, payload["config"], source=f"checkpoint {path}")
    model = model_for_weights(config.model)
    model.load_state_dict(payload["model"])
    model.name = str(path)
    return model.to(map_location).eval(), config


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and builtins (``weights_only``-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Numbered checkpoints ``step-00000100.pt`` in one folder (``step-00000100/`` folders when
    ``sharded``: see :mod:`clipkit.train.sharded_checkpoint`), a ``latest.json`` pointer to the newest
    complete one, and retention of the newest ``keep_last``."""

    def __init__(self, directory: str | Path, keep_last: int = 2, *, sharded: bool = False) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.sharded = sharded

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is written."""
        return self.directory / (f"step-{step:08d}" if self.sharded else f"step-{step:08d}.pt")

    def save(self, model: ContrastiveModel, config: ExperimentConfig, *, step: int, **state: Any) -> Path:
        path = save_checkpoint(self.path(step), model, config, step=step, **state)
        self.commit(step)
        return path

    def commit(self, step: int) -> None:
        """Point ``latest.json`` at the complete checkpoint of ``step`` and drop the oldest beyond ``keep_last``."""
        pointer = self.directory / LATEST_POINTER
        tmp = pointer.with_name(pointer.name + ".tmp")
        tmp.write_text(json.dumps({"path": self.path(step).name, "step": step}))
        os.replace(tmp, pointer)
        self._prune()

    def latest(self) -> Path | None:
        """The checkpoint ``latest.json`` names, or None when this folder has none."""
        pointer = self.directory / LATEST_POINTER
        if not pointer.is_file():
            return None
        path = self.directory / json.loads(pointer.read_text())["path"]
        if not path.exists():
            raise FileNotFoundError(f"{pointer} names {path.name}, which does not exist")
        return path

    def resolve(self, resume: str) -> Path:
        """``latest`` or a path → the checkpoint file to resume from, with a clear error if there is none."""
        if resume == "latest":
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"train.resume=latest but {self.directory} holds no checkpoint yet")
            return path
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"train.resume: checkpoint not found: {path}")
        return path

    def _prune(self) -> None:
        numbered = sorted(p for p in self.directory.iterdir() if _STEP_FILE.match(p.name))
        for old in numbered[: -self.keep_last]:
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
