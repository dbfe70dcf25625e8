"""Layer-wise learning-rate decay (``train.layer_decay``): each tower's parameters by depth.

A tower's layers run bottom → top: its stem (patch / token embeddings, a convolutional stem) first,
then its blocks in the order the input passes them. The last block learns at ``train.lr``, each layer
below it at ``layer_decay`` times the layer above. What comes after the last block (final norms,
pooling heads, projections) and what belongs to no tower (the temperature, SigLIP's bias) learns at
``train.lr``.

The layers are those open_clip's and timm's own code defines: open_clip's ``lock`` groups (the stem,
then each of ``transformer.resblocks``; the final norm goes with the last block) and timm's
``group_matcher`` (the stem, then each block; the final norm with the last block, pooling heads
unmatched).
"""

from __future__ import annotations

from typing import Iterable

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from timm.models._manipulate import group_with_matcher  # in its __all__; timm.models exports group_parameters only
from torch import nn

from clipkit.config import ConfigError
from clipkit.openclip.towers import ClipTextTower, CustomTextTower, OpenClipImageTower
from clipkit.modalities.audio import AudioTower
from clipkit.modalities.image import ImageTower
from clipkit.modalities.video import VideoTower

Layers = list[list[nn.Parameter]]  # a tower's parameters by depth, bottom → top

# open_clip's lock groups: what sits below the first transformer block.
VISION_STEM = ("conv1", "class_embedding", "positional_embedding", "ln_pre")
TEXT_STEM = ("token_embedding", "positional_embedding", "cls_emb")
MODIFIED_RESNET_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
# A parameter name no timm group pattern matches: it lands in the group of the trunk's unmatched
# (pooling head) parameters, which timm orders last.
_UNMATCHED = "<unmatched>"


def _parameters(items: Iterable[nn.Module | nn.Parameter | None]) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for item in items:
        if isinstance(item, nn.Parameter):
            params.append(item)
        elif item is not None:
            params.extend(item.parameters())
    return params


def _stem_and_blocks(module: nn.Module, stem: tuple[str, ...], blocks: Iterable[nn.Module]) -> Layers:
    return [_parameters(getattr(module, name, None) for name in stem), *(list(b.parameters()) for b in blocks)]


def timm_layers(trunk: nn.Module) -> Layers:
    """A timm model's groups from its own ``group_matcher`` (stem, then each block; the final norm
    with the last block), without the unmatched pooling-head parameters above them."""
    if not hasattr(trunk, "group_matcher"):
        raise ConfigError(f"train.layer_decay: timm model {type(trunk).__name__} has no group_matcher to "
                          "order its layers by; leave train.layer_decay unset")
    named = list(trunk.named_parameters())
    ids = group_with_matcher([(name, None) for name, _ in named] + [(_UNMATCHED, None)],
                             trunk.group_matcher(coarse=False), reverse=True)
    head = ids.pop(_UNMATCHED)
    layers: Layers = [[] for _ in range(head)]
    for name, param in named:
        if ids[name] < head:
            layers[ids[name]].append(param)
    return layers


def _open_clip_visual_layers(visual: nn.Module) -> Layers:
    if isinstance(visual, VisionTransformer):
        return _stem_and_blocks(visual, VISION_STEM, visual.transformer.resblocks)
    if isinstance(visual, TimmModel):
        return timm_layers(visual.trunk)
    if isinstance(visual, ModifiedResNet):  # each bottleneck a block; the attention pool is its head
        stages = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
        return _stem_and_blocks(visual, MODIFIED_RESNET_STEM, (block for stage in stages for block in stage))
    raise ConfigError(f"train.layer_decay: no layer order is known for open_clip's {type(visual).__name__} "
                      "image tower; leave train.layer_decay unset")


def tower_layers(name: str, tower: nn.Module) -> Layers:
    """The parameters of tower ``name`` by depth, bottom → top. Parameters left out (final norms after
    the blocks, pooling heads, projections) learn at the full rate."""
    if isinstance(tower, (ImageTower, AudioTower)):
        return timm_layers(tower.trunk)
    if isinstance(tower, OpenClipImageTower):
        return _open_clip_visual_layers(tower.visual)
    if isinstance(tower, (TextTransformer, ClipTextTower)):
        return _stem_and_blocks(tower, TEXT_STEM, tower.transformer.resblocks)
    if isinstance(tower, CustomTextTower) and isinstance(tower.text, TextTransformer):
        return _stem_and_blocks(tower.text, TEXT_STEM, tower.text.transformer.resblocks)
    if isinstance(tower, VideoTower):
        frames = tower_layers(name, tower.frames)
        if tower.temporal is None:
            return frames
        # The temporal transformer runs on the frame features: its layers sit above the frame encoder's
        # blocks, its position embeddings with its first layer.
        temporal = [list(layer.parameters()) for layer in tower.temporal.encoder.layers]
        temporal[0].insert(0, tower.temporal.positions)
        return frames + temporal
    inner = tower.text if isinstance(tower, CustomTextTower) else tower
    raise ConfigError(f"train.layer_decay: no layer order is known for the {name} tower "
                      f"({type(inner).__name__}); leave train.layer_decay unset")


def layer_lr_scales(towers: nn.ModuleDict, decay: float) -> dict[int, float]:
    """``id(parameter)`` → learning-rate scale, ``decay ** d`` at ``d`` layers below its tower's last
    block, for the parameters of every tower's layers (the rest learn at scale 1)."""
    scales: dict[int, float] = {}
    owners: dict[int, str] = {}
    for name, tower in towers.items():
        for depth, params in enumerate(reversed(tower_layers(name, tower))):
            for param in params:
                scale = decay**depth
                if scales.setdefault(id(param), scale) != scale:
                    # A video tower with a temporal transformer over the (shared) image tower.
                    raise ConfigError(f"train.layer_decay: the {owners[id(param)]} and {name} towers share "
                                      "parameters at different depths, which one learning rate cannot "
                                      "follow; leave train.layer_decay unset or pool video frames by mean")
                owners.setdefault(id(param), name)
    return scales
