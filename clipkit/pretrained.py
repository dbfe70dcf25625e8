"""Pretrained weights from local files, with a clear error when the network is not there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
from torch import nn


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but could not be found or fetched."""


def create_timm_trunk(
    name: str, *, pretrained: bool, pretrained_file: str | None, **kwargs: Any
) -> nn.Module:
    """A timm model without its classifier, returning pooled features of shape (B, num_features).

    ``pretrained_file`` loads weights from a local ``.safetensors`` / ``.pth`` / ``.bin`` file and
    never touches the network. ``pretrained=True`` without a file asks the Hugging Face hub.
    """
    if name not in timm.list_models() and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for the names")
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"model.image.pretrained_file {str(path)!r} does not exist; download the timm weights "
                f"for {name!r} (e.g. model.safetensors from the hub page timm/{name}) to that path"
            )
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, **kwargs
        )
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # the hub raises many types (OSError, HTTP, offline-mode errors)
        raise PretrainedWeightsError(
            f"could not fetch pretrained weights for timm model {name!r} ({type(err).__name__}: {err}). "
            f"Offline? Download model.safetensors for timm/{name} on a machine with a network, copy it "
            f"here and set model.image.pretrained_file=/path/to/model.safetensors"
        ) from err
