"""The interface of a training method: the heads it adds to the model and the loss over their outputs.

A method's :class:`Heads` live inside :class:`~clipkit.model.ContrastiveModel` (as ``model.heads``), so
DDP synchronises their gradients, the optimizer trains them and checkpoints hold them, momentum targets
included, with no code of their own. Its :class:`MethodLoss` is built by the trainer. Both see a batch
only as named inputs, each embedded by a tower: CLIP's ``image`` and ``text`` are two modalities; the
self-supervised methods' ``view1`` and ``view2`` are two views of one image, embedded by the same tower.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.config import ModelConfig

# encode(tower, inputs (B, ...)) → the tower's unnormalised features (B, embed_dim).
Encode = Callable[[str, torch.Tensor], torch.Tensor]


class Heads(nn.Module, ABC):
    """What a method computes from a batch: per-sample outputs, each (B, ...), keyed by name.

    ``inputs`` maps each batch key the method reads to the tower that embeds it. ``monitored`` names
    the output (unit-norm, (B, D)) whose spread is logged as the collapse signal.
    """

    inputs: dict[str, str]
    monitored: str

    @abstractmethod
    def forward(self, encode: Encode, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs the loss needs, from ``batch[key]`` for every key of ``inputs``."""

    def after_step(self, towers: nn.ModuleDict, step: int, total_steps: int) -> None:
        """Called after optimizer step ``step`` (0-based) of ``total_steps``: momentum targets follow
        the online network here. Methods without a target do nothing."""


class MethodLoss(nn.Module, ABC):
    """The loss over a batch's outputs; exact across ranks (N ranks with DDP equal one process)."""

    @abstractmethod
    def forward(self, outputs: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
        """outputs as :meth:`Heads.forward` gives them; logit_scale the multiplier (not its log) and
        logit_bias the SigLIP bias, for the methods that learn a temperature → scalar loss."""


def view_names(config: ModelConfig) -> tuple[str, ...]:
    """The batch keys of the ``ssl.views`` views of one image: view1, view2, …"""
    return tuple(f"view{index}" for index in range(1, config.ssl.views + 1))


def view_inputs(config: ModelConfig) -> dict[str, str]:
    """The views as inputs: each batch key embedded by the image tower."""
    return dict.fromkeys(view_names(config), "image")


def method_inputs(config: ModelConfig) -> dict[str, str]:
    """The batch keys ``config.method`` trains on, each with the tower that embeds it: the first two
    modalities (clip), the views of the image (the image-only methods), or both (slip)."""
    pair = {name: name for name in config.modalities[:2]}
    views = view_inputs(config)
    return {"clip": pair, "slip": {**pair, **views}}.get(config.method, views)


def symmetrised(views: Sequence[str], pair_loss: Callable[[str, str], torch.Tensor]) -> torch.Tensor:
    """Σ over ordered pairs of views (a, b) of ``pair_loss(a, b)``, divided by (views − 1): with two
    views, the loss of each direction summed, as BYOL and MoCo v3 symmetrise theirs."""
    return sum(pair_loss(a, b) for a, b in itertools.permutations(views, 2)) / (len(views) - 1)


def embedding_spread(features: torch.Tensor) -> torch.Tensor:
    """The collapse signal (SimSiam, §4.1): the standard deviation over the batch of each dimension of
    the unit-norm features (B, D), averaged over dimensions and scaled by √D, so that features spread
    over the sphere give about 1 and features collapsed to one point give 0. → scalar tensor."""
    unit = F.normalize(features.float(), dim=-1)
    return unit.std(dim=0).mean() * unit.shape[1] ** 0.5
