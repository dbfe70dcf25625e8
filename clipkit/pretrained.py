"""Pretrained weights from local files, with a clear error when the network is not there or the file
does not fit the model."""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path
from typing import Any, Iterator

import timm
from torch import nn

from clipkit.errors import PretrainedWeightsError

# Keys a weights file may lack without changing the model: BatchNorm's step counter (older files
# have none) only matters for BatchNorm without momentum.
HARMLESS_MISSING_SUFFIXES = ("num_batches_tracked",)


@contextlib.contextmanager
def _recorded_loads(results: list[Any]) -> Iterator[None]:
    """Record what every ``load_state_dict`` call returns while timm loads a weights file.

    timm loads a local file leniently when the classifier is dropped (``num_classes=0``), so a file
    whose keys do not fit the trunk at all (an open_clip file, another architecture's) would leave it
    randomly initialised with only a log line. timm's own loading is kept, for the conversions it
    applies to known formats (open_clip / OpenAI ViT layouts, resized position embeddings); the
    result it does not return is read here instead.
    """
    original = nn.Module.load_state_dict

    def load(module: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = original(module, state_dict, strict=False, assign=assign)
        results.append(result)
        return result

    nn.Module.load_state_dict = load  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.load_state_dict = original  # type: ignore[method-assign]


def _load_local_file(name: str, path: Path, **kwargs: Any) -> nn.Module:
    """A timm trunk with weights from ``path``; every key must fit (see :func:`_recorded_loads`)."""
    results: list[Any] = []
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # its list of unexpected keys is in the error raised below
    try:
        with _recorded_loads(results):
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                      num_classes=0, **kwargs)
    except (RuntimeError, pickle.UnpicklingError, OSError, ValueError) as err:
        if "weights_only" in str(err):
            raise PretrainedWeightsError(
                f"model.image.pretrained_file {path} is not a plain weights file: unpickling it would run code, "
                f"and clipkit loads weights with weights_only=True ({err})") from err
        raise PretrainedWeightsError(f"model.image.pretrained_file {path} does not fit timm model {name!r}: "
                                     f"{err}") from err
    finally:
        builder_log.setLevel(level)
    if not results:
        raise PretrainedWeightsError(f"timm loaded nothing from model.image.pretrained_file {path} for {name!r}")
    missing = [key for key in results[-1].missing_keys if not key.endswith(HARMLESS_MISSING_SUFFIXES)]
    unexpected = results[-1].unexpected_keys
    if missing or unexpected:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = ([f"{len(missing)} weights of the model are not in the file ({some(missing)})"] if missing else [])
        parts += [f"{len(unexpected)} keys of the file are not in the model ({some(unexpected)})"] if unexpected else []
        raise PretrainedWeightsError(
            f"model.image.pretrained_file {path} does not fit timm model {name!r}: {'; '.join(parts)}. "
            f"Give a timm checkpoint of {name!r} (e.g. model.safetensors from the hub page timm/{name})")
    return model


def create_timm_trunk(
    name: str, *, pretrained: bool, pretrained_file: str | None, **kwargs: Any
) -> nn.Module:
    """A timm model without its classifier, returning pooled features of shape (B, num_features).

    ``pretrained_file`` loads weights from a local ``.safetensors`` / ``.pth`` / ``.bin`` file and
    never touches the network; a file whose keys do not all fit the trunk raises
    :class:`PretrainedWeightsError` naming them. ``pretrained=True`` without a file asks the Hugging
    Face hub.
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
        return _load_local_file(name, path, **kwargs)
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
