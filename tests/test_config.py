import dataclasses
from pathlib import Path

import pytest
import yaml

from clipkit.config import ConfigError, ExperimentConfig, apply_overrides, load_config, save_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_bundled_config_loads():
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert paths
    for path in paths:
        assert isinstance(load_config(path), ExperimentConfig)


def test_quickstart_config_values():
    config = load_config(REPO / "configs" / "toy-image-text.yaml")
    assert config.model.modalities == ("image", "text")
    assert config.model.image.image_size == 64
    assert config.data.augment.crop_scale == (1.0, 1.0)
    assert config.train.lr == pytest.approx(4e-3) and config.model.init_logit_scale == 30.0
    assert config.model.image.timm_name == "test_resnet" and config.train.max_steps == 270
    assert config.train.eval_every == 90 and config.data.eval_shards


def test_binding_config_builds_the_towers_the_quickstart_checkpoint_holds():
    """configs/toy-image-audio.yaml loads its image and text towers from the quickstart's checkpoint."""
    quickstart = load_config(REPO / "configs" / "toy-image-text.yaml").model
    binding = load_config(REPO / "configs" / "toy-image-audio.yaml").model
    assert set(binding.init_towers) == {"image", "text"}
    assert dataclasses.replace(binding.image, lock=False) == quickstart.image
    assert dataclasses.replace(binding.text, lock=False) == quickstart.text
    assert binding.embed_dim == quickstart.embed_dim


def test_defaults_fill_missing_keys(tmp_path):
    config = load_config(write(tmp_path, {"train": {"lr": 0.01}}))
    assert config.train.lr == 0.01
    assert config.train.weight_decay == ExperimentConfig().train.weight_decay
    assert config.model == ExperimentConfig().model


def test_misspelt_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, {"train": {"lrr": 0.01}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "'train.lrr'" in message and "'train.lr'" in message


def test_unknown_section_and_nested_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(write(tmp_path, {"trian": {}}))
    with pytest.raises(ConfigError, match=r"unknown key 'model\.image\.timm_nam'"):
        load_config(write(tmp_path, {"model": {"image": {"timm_nam": "x"}}}))


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"train": {"lr": "fast"}}, r"train\.lr must be a number, got str 'fast'"),
        ({"train": {"epochs": 1.5}}, r"train\.epochs must be an integer"),
        ({"train": {"epochs": True}}, r"train\.epochs must be an integer"),
        ({"data": {"batch_size": "64"}}, r"data\.batch_size must be an integer"),
        ({"model": {"text": {"causal": "yes"}}}, r"model\.text\.causal must be true or false"),
        ({"train": {"precision": "fp8"}}, r"train\.precision must be one of"),
        ({"data": {"augment": {"crop_scale": [0.5]}}}, r"data\.augment\.crop_scale must be a list of 2"),
        ({"model": {"image": "resnet"}}, r"model\.image must be a mapping"),
        ({"train": {"max_steps": "ten"}}, r"train\.max_steps must be int or null"),
    ],
)
def test_wrong_types_rejected(tmp_path, data, pattern):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"data": {"batch_size": 0}}, r"data\.batch_size must be at least 1"),
        ({"data": {"num_workers": -1}}, r"data\.num_workers must not be negative"),
        ({"data": {"max_skip_fraction": 0}}, r"data\.max_skip_fraction must be in \(0, 1\]"),
        ({"data": {"max_skip_fraction": 1.5}}, r"data\.max_skip_fraction must be in \(0, 1\]"),
        ({"data": {"resampled": True}}, r"data\.train_num_samples must be set when resampled is true"),
        ({"data": {"train_shards": "a.tar::b.tar", "train_data_weights": [1, 2]}},
         r"data\.train_data_weights needs resampled: true"),
        ({"data": {"train_shards": "a.tar::b.tar", "train_data_weights": [1, 2, 3], "resampled": True,
                   "train_num_samples": 100}},
         r"data\.train_data_weights must give one weight per '::'-separated pattern .*\(3 weights, 2 patterns\)"),
        ({"data": {"train_shards": "a.tar", "train_data_weights": [0], "resampled": True, "train_num_samples": 9}},
         r"data\.train_data_weights must all be positive"),
        ({"data": {"augment": {"crop_scale": [0.9, 0.5]}}}, r"data\.augment\.crop_scale must be \[low, high\]"),
        ({"train": {"lr": 0}}, r"train\.lr must be positive"),
        ({"train": {"max_steps": 0}}, r"train\.max_steps must be at least 1"),
        ({"train": {"betas": [0.9, 1.0]}}, r"train\.betas must both be in"),
        ({"model": {"modalities": ["image"]}}, r"model\.modalities needs at least two distinct"),
        ({"model": {"init_logit_scale": 200}}, r"model\.init_logit_scale must be positive and at most"),
    ],
)
def test_out_of_range_values_rejected(tmp_path, data, pattern):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_resampled_weighted_sources_load(tmp_path):
    data = {"train_shards": "a-{0..3}.tar::b.tar", "resampled": True, "train_num_samples": 1000,
            "train_data_weights": [3, 1], "max_skip_fraction": 0.05}
    config = load_config(write(tmp_path, {"data": data})).data
    assert config.resampled and config.train_data_weights == [3.0, 1.0] and config.max_skip_fraction == 0.05


def test_float_written_without_dot_is_accepted(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; a learning rate written that way must still work.
    assert load_config(write(tmp_path, {"train": {"lr": "3e-4"}})).train.lr == pytest.approx(3e-4)


def test_overrides(tmp_path):
    path = write(tmp_path, {})
    config = load_config(path, ["train.lr=3e-4", "model.image.timm_name=resnet18", "train.max_steps=7",
                                "data.augment.crop_scale=[0.5, 1.0]", "model.modalities=[image, text]"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.model.image.timm_name == "resnet18"
    assert config.train.max_steps == 7
    assert config.data.augment.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.lrr=1", r"--set overrides: unknown key 'train.lrr'"),
        ("train.lr", r"expected KEY=VALUE"),
        ("train.lr.x=1", r"'train.lr' is not a config section"),
        ("train.epochs=two", r"train\.epochs must be an integer"),
    ],
)
def test_bad_overrides(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        apply_overrides(ExperimentConfig(), [override])


def test_save_and_reload_round_trip(tmp_path):
    config = apply_overrides(ExperimentConfig(), ["train.lr=0.123", "model.embed_dim=64"])
    save_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == config


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_overrides_are_merged_before_validation(tmp_path):
    """A file valid only with its override loads; without the override it is rejected."""
    path = write(tmp_path, {"data": {"train_shards": "a.tar::b.tar", "train_data_weights": [3, 1],
                                     "train_num_samples": 100}})
    config = load_config(path, ["data.resampled=true", "model.image.lock=true"])
    assert config.data.resampled and config.data.train_data_weights == [3.0, 1.0] and config.model.image.lock
    with pytest.raises(ConfigError, match="train_data_weights needs resampled"):
        load_config(path)
    with pytest.raises(ConfigError, match="with --set overrides: unknown key 'train.lrr'"):
        load_config(path, ["data.resampled=true", "train.lrr=1"])
