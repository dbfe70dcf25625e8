"""ImageBind-style binding: an audio tower trained against a frozen image tower initialised from an
image–text checkpoint, with that checkpoint's text tower carried along for zero-shot evaluation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clipkit.config import ExperimentConfig
from clipkit.modalities.audio import AudioTowerConfig
from clipkit.data.toy_image_audio import class_names, make_toy_image_audio
from clipkit.eval.benchmark import evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.model import create_model
from clipkit.train.checkpoint import load_model, save_checkpoint
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config


@pytest.fixture
def image_text_checkpoint(tmp_path):
    config = ExperimentConfig(model=tiny_model_config())
    torch.manual_seed(3)
    return save_checkpoint(tmp_path / "image-text.pt", create_model(config.model).eval(), config)


def binding_config(checkpoint, **model) -> ExperimentConfig:
    base = tiny_model_config()
    audio = AudioTowerConfig(timm_name="test_byobnet", sample_rate=16_000, clip_seconds=0.5, n_fft=512,
                             hop_length=160, n_mels=32, f_min=50.0, f_max=8000.0)
    settings = dict(modalities=("image", "audio", "text"), audio=audio,
                    image=dataclasses.replace(base.image, lock=True), text=dataclasses.replace(base.text, lock=True),
                    init_towers={"image": str(checkpoint), "text": str(checkpoint)})
    return ExperimentConfig(model=dataclasses.replace(base, **{**settings, **model}))


def test_audio_binds_to_a_frozen_image_tower(tmp_path, image_text_checkpoint):
    toy = make_toy_image_audio(tmp_path / "toy", num_train=64, num_eval=24, image_size=32, clip_seconds=0.5,
                               samples_per_shard=32)
    assert toy.classnames == class_names() and toy.classnames[0] == "blue circle"
    config = binding_config(image_text_checkpoint)
    config.data = dataclasses.replace(config.data, train_shards=toy.shard_pattern("train"), batch_size=16,
                                      num_workers=0, shuffle_buffer=20)
    config.train = dataclasses.replace(config.train, output_dir=str(tmp_path / "run"), max_steps=4, warmup_steps=1)
    trainer = Trainer(config, progress=False)
    assert trainer.inputs == ("image", "audio")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()

    source, _ = load_model(image_text_checkpoint)
    trained, _ = load_model(result.checkpoint)
    for name in ("image", "text"):  # initialised from the image-text model, then frozen
        for key, value in source.towers[name].state_dict().items():
            assert torch.equal(trained.towers[name].state_dict()[key], value), f"{name}.{key}"
    assert any(not torch.equal(value, start[f"towers.audio.{key}"])
               for key, value in trained.towers["audio"].state_dict().items())
    # Emergent zero-shot: sounds classified by the text tower with the image world's class names.
    report = evaluate_zeroshot(load_encoder(str(result.checkpoint)), toy.shard_pattern("eval"), modality="audio")
    assert report.num_samples == 24 and report.details["classes"] == 12


def test_init_towers_errors(tmp_path, image_text_checkpoint):
    with pytest.raises(ValueError, match="'video', which is not one of model.modalities"):
        create_model(binding_config(image_text_checkpoint, init_towers={"video": str(image_text_checkpoint)}).model)
    with pytest.raises(ValueError, match="has no towers.audio"):
        create_model(binding_config(image_text_checkpoint, init_towers={"audio": str(image_text_checkpoint)}).model)
    wider = binding_config(image_text_checkpoint).model
    wider = dataclasses.replace(wider, text=dataclasses.replace(wider.text, width=64))
    with pytest.raises(ValueError, match="the text tower of .* does not fit model.text"):
        create_model(wider)
    with pytest.raises(FileNotFoundError):
        create_model(binding_config(tmp_path / "missing.pt").model)
