"""Modality plug-ins: how a modality's shard bytes become tensors and which tower embeds them.

A modality is one module: its config section and a :class:`~clipkit.modalities.base.Modality` subclass
decorated with :func:`~clipkit.modalities.base.register_modality`. Importing this package imports
every module in it and every plug-in installed under the ``clipkit.modalities`` entry-point group, so
a new modality is a new file here or an installed package, with no line to add anywhere else. The
trainer, the losses and the data pipeline only talk to the interface.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from clipkit.config import AugmentConfig, ModelConfig
from clipkit.modalities.base import FieldDecoder, Modality, register_modality, registered_modalities
from clipkit.modalities.openclip import OPEN_CLIP_MODALITIES

ENTRY_POINT_GROUP = "clipkit.modalities"


def _import_plugins() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:  # say which installed package broke every clipkit command
            raise ImportError(f"the modality plug-in {entry.name!r} ({entry.value}, entry point group "
                              f"{ENTRY_POINT_GROUP}) failed to load: {err}") from err


_import_plugins()


def available_modalities() -> list[str]:
    return sorted(registered_modalities())


def get_modality(name: str, model_config: ModelConfig, augment: AugmentConfig | None = None) -> Modality:
    """Instantiate the plug-in for ``name`` from the model config (and training augmentation)."""
    registry = registered_modalities()
    if name not in registry:
        raise ValueError(f"unknown modality {name!r}; available: {', '.join(available_modalities())}")
    # An open_clip model brings its own image preprocessing and tokenizer.
    if model_config.open_clip is not None:
        registry = OPEN_CLIP_MODALITIES
    return registry[name].from_config(model_config, augment or AugmentConfig())


__all__ = ["FieldDecoder", "Modality", "available_modalities", "get_modality", "register_modality"]
