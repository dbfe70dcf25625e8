"""Layer-wise learning-rate decay (``train.layer_decay``): each parameter's rate by its depth in its tower.

The expected depths are written out from parameter names, independently of the code under test:
the last block of a tower is depth 0, the stem is one below the first block, and whatever follows the
last block (final norms, pooling heads, projections) or belongs to no tower learns at the full rate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import open_clip
import pytest
import torch

from clipkit.config import ConfigError, ModelConfig, OpenClipConfig, TrainConfig
from clipkit.modalities.video import VideoTowerConfig
from clipkit.model import create_model
from clipkit.train.optim import _no_weight_decay, build_optimizer, build_scheduler
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config

LR, DECAY = 1e-3, 0.5
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
ARCHITECTURES = {
    # open_clip's VisionTransformer, 2 blocks; CLIP's text modules, 2 blocks.
    "ck-ld-vit": {"embed_dim": 32, "text_cfg": TEXT,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}},
    # open_clip's timm tower: timm's test_vit (6 blocks) with an attention-pool head.
    "ck-ld-timm": {"embed_dim": 64, "text_cfg": TEXT,
                   "vision_cfg": {"image_size": 32, "timm_model_name": "test_vit", "timm_model_pretrained": False,
                                  "timm_pool": "map", "timm_proj": "none"}},
}
TEXT_DEPTHS = (  # (pattern, depth: an int or a function of the pattern's match), first match wins
    (r"towers\.text\.(token_embedding|positional_embedding)", 2),
    (r"towers\.text\.transformer\.resblocks\.(\d)\.", lambda m: 1 - int(m[1])),
)
EXPECTED_DEPTHS = {
    "tiny": (
        (r"towers\.image\.trunk\.stem\.", 4),  # test_byobnet: stem, then 4 stages of one block each
        (r"towers\.image\.trunk\.stages\.(\d)\.", lambda m: 3 - int(m[1])),
        *TEXT_DEPTHS,
    ),
    "ck-ld-vit": (
        (r"towers\.image\.visual\.(conv1|class_embedding|positional_embedding|ln_pre)", 2),
        (r"towers\.image\.visual\.transformer\.resblocks\.(\d)\.", lambda m: 1 - int(m[1])),
        *TEXT_DEPTHS,
    ),
    "ck-ld-timm": (
        (r"towers\.image\.visual\.trunk\.(cls_token|pos_embed|patch_embed)", 6),
        (r"towers\.image\.visual\.trunk\.blocks\.(\d)\.", lambda m: 5 - int(m[1])),
        *TEXT_DEPTHS,
    ),
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("open-clip-archs")
    for name, cfg in ARCHITECTURES.items():
        (root / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(root)


def model_config(kind: str) -> ModelConfig:
    if kind == "tiny":  # a second text block, so the text tower has a block below its last
        config = tiny_model_config()
        return dataclasses.replace(config, text=dataclasses.replace(config.text, layers=2))
    return ModelConfig(open_clip=OpenClipConfig(name=kind))


def expected_depth(kind: str, name: str) -> int:
    for pattern, depth in EXPECTED_DEPTHS[kind]:
        match = re.match(pattern, name)
        if match:
            return depth(match) if callable(depth) else depth
    return 0


def lr_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize("kind", ["tiny", "ck-ld-vit", "ck-ld-timm"])
def test_each_parameter_learns_at_lr_times_decay_to_its_depth(registered, kind):
    model = create_model(model_config(kind))
    optimizer = build_optimizer(model, TrainConfig(lr=LR, layer_decay=DECAY))
    lrs = lr_by_name(model, optimizer)
    assert set(lrs) == {n for n, _ in model.named_parameters()}
    for name, lr in lrs.items():
        assert lr == pytest.approx(LR * DECAY ** expected_depth(kind, name)), name
    assert lrs["logit_scale"] == LR
    assert max(expected_depth(kind, name) for name in lrs) > 1  # the patterns did match
    # Full-rate groups first: the trainer logs get_last_lr()[0] as train.lr's rate.
    assert [g["lr"] for g in optimizer.param_groups] == sorted((g["lr"] for g in optimizer.param_groups), reverse=True)
    assert optimizer.param_groups[0]["lr"] == LR and optimizer.param_groups[0]["weight_decay"] > 0
    named = {id(p): (n, p) for n, p in model.named_parameters()}
    for group in optimizer.param_groups:  # weight decay as without layer decay
        decays = {not _no_weight_decay(*named[id(p)]) for p in group["params"]}
        assert decays == {group["weight_decay"] > 0}


def test_the_schedule_keeps_the_ratios(registered):
    model = create_model(model_config("ck-ld-vit"))
    train = TrainConfig(lr=LR, layer_decay=DECAY, warmup_steps=2)
    optimizer = build_optimizer(model, train)
    scales = [group["lr"] / LR for group in optimizer.param_groups]
    assert sorted(set(scales)) == [DECAY**2, DECAY, 1.0]
    scheduler = build_scheduler(optimizer, train, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates = scheduler.get_last_lr()
        assert [rate / rates[0] for rate in rates] == pytest.approx(scales)
    assert rates[0] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 2 / 8)))


@pytest.mark.parametrize("layer_decay", [None, 1.0])
def test_without_decay_two_groups_at_the_full_rate(layer_decay):
    model = create_model(tiny_model_config())
    optimizer = build_optimizer(model, TrainConfig(lr=LR, layer_decay=layer_decay))
    decayed, undecayed = optimizer.param_groups
    trainable = [(n, p) for n, p in model.named_parameters()]
    assert [id(p) for p in decayed["params"]] == [id(p) for n, p in trainable if not _no_weight_decay(n, p)]
    assert [id(p) for p in undecayed["params"]] == [id(p) for n, p in trainable if _no_weight_decay(n, p)]
    assert (decayed["lr"], undecayed["lr"]) == (LR, LR)
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (TrainConfig.weight_decay, 0.0)


def test_locked_parameters_are_left_out(registered):
    config = model_config("ck-ld-vit")
    config.image.lock = True
    model = create_model(config)
    lrs = lr_by_name(model, build_optimizer(model, TrainConfig(lr=LR, layer_decay=DECAY)))
    assert lrs and not any(name.startswith("towers.image.") for name in lrs)
    assert lrs["towers.text.token_embedding.weight"] == pytest.approx(LR * DECAY**2)


def test_video_towers(registered):
    """A video tower's temporal transformer sits above its frame encoder; over the shared image tower,
    whose blocks would need two depths at once, layer decay is refused."""
    image = tiny_model_config().image
    video = VideoTowerConfig(num_frames=2, pooling="transformer", temporal_layers=2, temporal_heads=2)
    model = create_model(ModelConfig(embed_dim=32, modalities=("video", "text"), image=image, video=video,
                                     text=tiny_model_config().text))
    lrs = lr_by_name(model, build_optimizer(model, TrainConfig(lr=LR, layer_decay=DECAY)))
    assert lrs["towers.video.temporal.encoder.layers.1.linear1.weight"] == LR
    assert lrs["towers.video.temporal.positions"] == pytest.approx(LR * DECAY)
    assert lrs["towers.video.frames.trunk.stages.3.0.conv1_1x1.conv.weight"] == pytest.approx(LR * DECAY**2)
    assert lrs["towers.video.frames.trunk.stem.conv.weight"] == pytest.approx(LR * DECAY**6)
    shared = create_model(ModelConfig(embed_dim=32, modalities=("image", "text", "video"), image=image, video=video,
                                      text=tiny_model_config().text))
    with pytest.raises(ConfigError, match="image and video towers share parameters at different depths"):
        build_optimizer(shared, TrainConfig(layer_decay=DECAY))


def test_two_training_steps_with_layer_decay(tiny_config, toy_shards):
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(
        tiny_config.data, train_shards=toy_shards.shard_pattern("train")))
    config.train.max_steps, config.train.layer_decay, config.train.log_every = 2, DECAY, 1
    trainer = Trainer(config, progress=False)
    stem = trainer.model.towers["image"].trunk.stem.conv.weight
    before = stem.detach().clone()
    result = trainer.fit()
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert not torch.equal(stem.detach(), before)  # the lowest layer learns too, if slowly
    rates = trainer.scheduler.get_last_lr()
    assert rates[0] == max(rates) and min(rates) == pytest.approx(rates[0] * DECAY**4)
