"""Resumable checkpoints of a sharded (FSDP) run through torch.distributed.checkpoint (DCP).

A checkpoint is a folder: the model and optimizer state as DCP writes them (every rank writes its
own shards, ``__R_0.distcp``, and rank 0 the ``.metadata`` index), and ``trainer.pt``, the rest of
the run's state (config, step, data position, scheduler, RNG) that every rank shares. DCP reshards on
load, so a checkpoint of N ranks resumes on M. The folder is written under a temporary name and
renamed once complete, so a crash mid-save never leaves a half-written checkpoint under a step's name.
Every rank must see the same folder (one file system, or storage shared by the nodes).

DCP reads its ``.metadata`` index with ``pickle``; :class:`CheckpointReader` reads it with an
unpickler that builds only DCP's own metadata classes, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from clipkit import __version__
from clipkit.config import ExperimentConfig
from clipkit.distributed import rank_and_world

TRAINER_STATE = "trainer.pt"
METADATA = ".metadata"

# What a DCP metadata index is made of: its dataclasses, and the torch and stdlib types inside them.
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("torch.serialization", "_get_layout"), ("torch", "Size"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name)
        if module in _METADATA_MODULES and isinstance(found, type):
            return found
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(found, torch.dtype)):
            return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class CheckpointReader(dcp.FileSystemReader):
    """DCP's file-system reader, reading the metadata index without unpickling code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as err:
            raise ValueError(f"{path} is not a readable checkpoint index ({type(err).__name__}: {err})") from err
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not a checkpoint index (it holds a {type(metadata).__name__})")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns on every save and load without a process group, which a one-process run means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: ExperimentConfig,
                 **state: Any) -> Path:
    """Write a checkpoint folder (every rank calls this): model and optimizer through DCP, ``state``
    (builtins and tensors) with the config into ``trainer.pt``. An existing folder of that name is
    replaced."""
    tmp = directory.with_name(directory.name + ".tmp")
    if rank_and_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_is_meant():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, storage_writer=dcp.FileSystemWriter(tmp))
    if rank_and_world()[0] == 0:
        torch.save({"clipkit_version": __version__, "config": config.to_dict(), **state}, tmp / TRAINER_STATE)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    _barrier()
    return directory


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The shared state of a checkpoint folder (``weights_only``: no code is unpickled)."""
    path = directory / TRAINER_STATE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable clipkit checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or "config" not in payload or "step" not in payload:
        raise ValueError(f"{path} is not a clipkit training state (expected 'config' and 'step' entries)")
    return payload


def load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a checkpoint folder's model and optimizer state into this run's (sharded or whole) model
    and optimizer, on however many ranks it now runs (every rank calls this)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_is_meant():
        dcp.load(state, storage_reader=CheckpointReader(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
