"""A user's mistake gets one clear line and a non-zero exit code, never a traceback: each case runs the
real command (``clipkit.cli.main``, in-process: an exception escaping it fails the test)."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml

from clipkit.cli import main


@pytest.fixture
def config_file(tiny_config, toy_shards, tmp_path):
    tiny_config.data.train_shards = toy_shards.shard_pattern("train")
    tiny_config.train.max_steps = 2
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config.to_dict()))
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("setting, message", [
    ("train.device=cuda", "train.device=cuda, but this machine has no CUDA device"),
    ("train.device=gpu", "train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("model.text.heads=3", "model.text.heads must divide width (32)"),
    ("train.lr=[1, 2", "the value is not valid YAML"),
])
def test_bad_settings(config_file, capsys, setting, message):
    if setting == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run(capsys, "train", "--config", str(config_file), "--no-progress", "--set", setting)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_bad_config_files(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  embed_dim: [1, 2\ntrain: {}\n")
    code, err = run(capsys, "train", "--config", str(broken))
    assert code == 2 and f"{broken} is not valid YAML" in err and "line" in err
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "ran"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = run(capsys, "train", "--config", str(evil))
    assert code == 2 and "is not valid YAML" in err and "python/object/apply" in err
    assert not marker.exists()


def test_output_folder_that_is_a_file(config_file, tmp_path, capsys):
    (tmp_path / "taken").write_text("not a folder")
    code, err = run(capsys, "train", "--config", str(config_file), "--no-progress",
                    "--set", f"train.output_dir={tmp_path / 'taken'}")
    assert code == 2 and "is a file, not a folder" in err


def test_open_clip_weights_that_are_a_pickle_of_code(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"visual.proj": Payload()}, tmp_path / "evil.pt")
    code, err = run(capsys, "eval", "zeroshot", "--model", "open_clip:RN50", "--pretrained", str(tmp_path / "evil.pt"),
                    "--dataset", str(tmp_path))
    assert code == 1 and "is not a plain weights file: unpickling it would run code" in err
    assert not marker.exists()


def test_resuming_with_a_changed_config_is_refused_or_logged(config_file, tmp_path, capsys, caplog):
    output = tmp_path / "run"
    assert run(capsys, "train", "--config", str(config_file), "--no-progress",
               "--set", f"train.output_dir={output}", "--set", "train.save_every=1")[0] == 0
    base = ["train", "--config", str(config_file), "--no-progress", "--set", f"train.output_dir={output}",
            "--resume", "latest"]
    code, err = run(capsys, *base, "--set", "data.batch_size=32", "--set", "train.lr=0.1")
    assert code == 2
    assert "data.batch_size 16 → 32" in err and "train.lr 0.003 → 0.1" in err and "start a new run" in err
    code, err = run(capsys, *base, "--set", "model.embed_dim=16")
    assert code == 2 and "model.embed_dim 32 → 16" in err
    # Running longer is what resuming is for: allowed, and said.
    caplog.set_level(logging.INFO, logger="clipkit")
    code, _ = run(capsys, *base, "--set", "train.max_steps=4")
    assert code == 0 and "resuming with changed settings: train.max_steps 2 → 4" in caplog.text


def test_a_file_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    code, err = run(capsys, "eval", "zeroshot", "--model", str(tmp_path / "garbage.pt"), "--dataset", str(tmp_path))
    assert code == 2 and "is not a readable clipkit checkpoint" in err
