"""Self-supervised methods on the CLIP trainer: NT-Xent against lightly's, the views of real photos,
momentum targets and stop-gradients, the collapse signal, every method training and resuming exactly."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipkit.config import ConfigError, ExperimentConfig, ModelConfig, ViewsConfig
from clipkit.eval.encoders import load_encoder
from clipkit.losses import NTXentLoss
from clipkit.methods.base import embedding_spread
from clipkit.methods.heads import cosine_momentum
from clipkit.methods.simsiam import SimSiamLoss, projection_key
from clipkit.modalities import get_modality
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config


def ssl_config(tmp_path: Path, toy, method: str, **ssl: object) -> ExperimentConfig:
    """A tiny image-only (or, for slip, image-text) run on the toy shards, with small heads."""
    model = tiny_model_config()
    model.method = method
    if method != "slip":
        model.modalities = ("image",)
    model.ssl = dataclasses.replace(model.ssl, hidden_dim=32, projection_dim=16, predictor_hidden_dim=16, **ssl)
    config = ExperimentConfig(model=model)
    config.data.train_shards = toy.shard_pattern("train")
    config.data.batch_size, config.data.num_workers, config.data.shuffle_buffer = 8, 0, 50
    config.train.output_dir = str(tmp_path / method)
    config.train.warmup_steps, config.train.log_every, config.train.lr = 2, 2, 1e-3
    return config


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_equals_lightly_forward_and_gradients(temperature):
    from lightly.loss import NTXentLoss as LightlyNTXent

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(12, 20, dtype=torch.float64, generator=generator, requires_grad=True)
    ours = NTXentLoss(temperature)(F.normalize(a, dim=1), F.normalize(b, dim=1))
    theirs = LightlyNTXent(temperature=temperature)(a, b)  # lightly normalises its inputs itself
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    for mine, reference in zip(torch.autograd.grad(ours, [a, b]), torch.autograd.grad(theirs, [a, b])):
        torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)


def photo_jpeg(width: int, height: int) -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((width, height)).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.mark.parametrize("size", [(301, 173), (97, 640)])
def test_views_of_a_real_photo_are_seeded_per_sample_and_differ(size):
    views = ViewsConfig(blur_p=0.5, solarize_p=0.5)
    image = get_modality("image", tiny_model_config(image_size=48))
    data = photo_jpeg(*size)
    first, second = image.view_field("view1", views), image.view_field("view2", views)
    one = first.decode(data, random.Random("0/key/view1"))
    assert one.shape == (3, 48, 48) and one.dtype == torch.uint8
    assert torch.equal(one, first.decode(data, random.Random("0/key/view1")))  # the same draws, the same view
    other = second.decode(data, random.Random("0/key/view2"))
    assert (one.float() - other.float()).abs().mean() > 5  # another draw: another crop and colours


@pytest.mark.parametrize("augmentation", ["color_jitter_p", "grayscale_p", "blur_p", "solarize_p"])
def test_each_photometric_augmentation_changes_the_pixels(augmentation):
    off = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
    image = get_modality("image", tiny_model_config(image_size=64))
    data = photo_jpeg(200, 150)
    # The same seeds draw the same crops; a blur's sigma, scaled to 64 px, may round away on one draw.
    plain = [image.view_field("v", ViewsConfig(**off)).decode(data, random.Random(seed)) for seed in range(4)]
    changed = [image.view_field("v", ViewsConfig(**{**off, augmentation: 1.0})).decode(data, random.Random(seed))
               for seed in range(4)]
    assert sum(not torch.equal(a, b) for a, b in zip(plain, changed)) >= 3
    if augmentation == "grayscale_p":
        assert all(torch.equal(view[0], view[1]) and torch.equal(view[1], view[2]) for view in changed)
    if augmentation == "blur_p":  # smoother: less difference between neighbouring pixels
        def roughness(view: torch.Tensor) -> float:
            return view.float().diff(dim=-1).abs().mean().item()

        assert all(roughness(b) <= roughness(a) for a, b in zip(plain, changed))


def test_embedding_spread_tells_collapse_from_spread():
    spread = embedding_spread(torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)))
    assert spread.item() == pytest.approx(1.0, abs=0.02)
    collapsed = torch.ones(512, 64) + 1e-4 * torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    assert embedding_spread(collapsed).item() < 0.01


def test_simsiam_loss_stops_the_gradient_at_the_projection():
    views = {name: F.normalize(torch.randn(6, 8), dim=1).requires_grad_() for name in ("view1", "view2")}
    projections = {projection_key(name): F.normalize(torch.randn(6, 8), dim=1).requires_grad_()
                   for name in ("view1", "view2")}
    loss = SimSiamLoss(ModelConfig(method="simsiam", modalities=("image",)))({**views, **projections}, None, None)
    loss.backward()
    assert all(tensor.grad is None for tensor in projections.values())
    assert all(tensor.grad.abs().sum() > 0 for tensor in views.values())
    # −mean cos(p1, z2) / 2 − mean cos(p2, z1) / 2, by hand
    p1, p2, z1, z2 = views["view1"], views["view2"], projections["view1.projection"], projections["view2.projection"]
    expected = -((p1 * z2).sum(1).mean() + (p2 * z1).sum(1).mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("method", ["byol", "moco"])
def test_momentum_target_gets_no_gradient_and_follows_the_ema(tmp_path, toy_shards, method):
    config = ssl_config(tmp_path, toy_shards, method)
    config.train.max_steps = 10
    trainer = Trainer(config, progress=False)
    target, heads = trainer.model.heads.target, trainer.model.heads
    assert all(not p.requires_grad for p in target.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in target.parameters()}
    before = [p.detach().clone() for p in target.parameters()]
    batch = next(iter(trainer.loader))
    trainer.train_step([batch])
    assert all(p.grad is None for p in target.parameters())
    online = [*trainer.model.towers["image"].parameters(), *heads.projector.parameters()]
    momentum = cosine_momentum(heads.momentum, 0, 10)
    assert momentum == heads.momentum == {"byol": 0.996, "moco": 0.99}[method]
    for old, new, source in zip(before, target.parameters(), online):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * source.detach(), atol=1e-7, rtol=1e-6)
    assert cosine_momentum(0.99, 10, 10) == 1.0 and 0.99 < cosine_momentum(0.99, 5, 10) < 1.0


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam", "slip"])
def test_every_method_trains_logs_its_spread_and_embeds(tmp_path, toy_shards, method):
    config = ssl_config(tmp_path, toy_shards, method)
    config.train.max_steps = 4
    result = Trainer(config, progress=False).fit()
    assert torch.isfinite(torch.tensor(result.final_loss))
    logged = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < record["embedding_spread"] < 2 for record in logged)
    encoder = load_encoder(str(result.checkpoint))
    decoder = encoder.eval_decoder("image")
    image = decoder.decode(photo_jpeg(120, 90), random.Random(0))
    assert encoder.encode("image", image[None]).shape == (1, 32)


def test_resume_with_momentum_state_is_bit_identical(tmp_path, toy_shards):
    config = ssl_config(tmp_path, toy_shards, "byol")
    config.train.max_steps, config.train.save_every = 8, 4
    straight = Trainer(config, progress=False)
    straight.fit()
    checkpoint = Path(config.train.output_dir) / "checkpoints" / "step-00000004.pt"
    resumed_config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)))
    torch.manual_seed(123)
    resumed = Trainer(resumed_config, progress=False)
    resumed.fit()
    state, again = straight.model.state_dict(), resumed.model.state_dict()
    assert any(name.startswith("heads.target.") for name in state)
    for name, tensor in state.items():
        assert torch.equal(tensor, again[name]), name


@pytest.mark.parametrize("changes, message", [
    ({"method": "simclr"}, "must be \\[image\\] with method simclr"),
    ({"method": "byol", "modalities": ("image",), "loss": "siglip"}, "method byol has its own"),
    ({"method": "slip", "modalities": ("text", "image")}, "must start with image with method slip"),
])
def test_config_refuses_what_a_method_cannot_use(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_a_collapsed_run_is_warned_about_once(tmp_path, toy_shards, caplog):
    from clipkit.train.trainer import _Window

    trainer = Trainer(ssl_config(tmp_path, toy_shards, "simsiam"), progress=False)
    for spread, warns in ((0.5, False), (0.01, True), (0.0, False)):  # the second collapsed window: no repeat
        window = _Window(0.0)
        window.add(torch.tensor(1.0), torch.tensor(spread), 8)
        with caplog.at_level("WARNING", logger="clipkit.train.trainer"):
            caplog.clear()
            record = trainer._training_record(window)
        assert record["embedding_spread"] == pytest.approx(spread)
        assert ("collapsed" in caplog.text) == warns, spread


def test_zero_shot_and_retrieval_refuse_an_image_only_tower(tmp_path, toy_shards, capsys):
    from clipkit.cli import main

    config = ssl_config(tmp_path, toy_shards, "simclr")
    config.train.max_steps = 1
    checkpoint = str(Trainer(config, progress=False).fit().checkpoint)
    for task in ("zeroshot", "retrieval"):
        assert main(["eval", task, "--model", checkpoint, "--dataset", toy_shards.shard_pattern("eval"),
                     "--device", "cpu", "--no-progress"]) == 2
        assert "has no text tower (its towers: image)" in capsys.readouterr().err
