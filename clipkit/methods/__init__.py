"""Training methods (``model.method``): what a model learns from a batch, as heads on its towers and a
loss over their outputs (:mod:`clipkit.methods.base`).

- ``clip``: two modalities aligned by InfoNCE or SigLIP (``model.loss``);
- ``slip``: CLIP plus SimCLR on views of the image;
- ``simclr``, ``moco`` (v3), ``byol``, ``simsiam``: an image tower from views of the image alone.
"""

from __future__ import annotations

from torch import nn

from clipkit.config import ModelConfig
from clipkit.methods.base import Heads, MethodLoss, method_inputs
from clipkit.methods.byol import BYOLHeads, BYOLLoss
from clipkit.methods.clip import PairHeads, PairLoss
from clipkit.methods.moco import MoCoHeads, MoCoLoss
from clipkit.methods.simclr import SimCLRHeads, ViewsNTXentLoss
from clipkit.methods.simsiam import SimSiamHeads, SimSiamLoss
from clipkit.methods.slip import SLIPHeads, SLIPLoss


def build_heads(config: ModelConfig, towers: nn.ModuleDict) -> Heads:
    """The heads of ``config.method`` on ``towers`` (a momentum target copies the image tower as it is
    now, so build the heads after the towers' initial weights are loaded)."""
    builders = {
        "clip": lambda: PairHeads(config),
        "slip": lambda: SLIPHeads(config),
        "simclr": lambda: SimCLRHeads(config),
        "moco": lambda: MoCoHeads(config, towers["image"]),
        "byol": lambda: BYOLHeads(config, towers["image"]),
        "simsiam": lambda: SimSiamHeads(config),
    }
    return builders[config.method]()


def build_method_loss(config: ModelConfig, pair_loss: nn.Module) -> MethodLoss:
    """The loss of ``config.method``; ``pair_loss`` is ``model.loss`` (InfoNCE or SigLIP) for the
    methods that align two modalities."""
    builders = {
        "clip": lambda: PairLoss(config.modalities[:2], pair_loss),
        "slip": lambda: SLIPLoss(config, pair_loss),
        "simclr": lambda: ViewsNTXentLoss(config),
        "moco": lambda: MoCoLoss(config),
        "byol": lambda: BYOLLoss(config),
        "simsiam": lambda: SimSiamLoss(config),
    }
    return builders[config.method]()


__all__ = ["Heads", "MethodLoss", "build_heads", "build_method_loss", "method_inputs"]
