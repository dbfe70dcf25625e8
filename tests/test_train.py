import dataclasses
import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clipkit.config import ExperimentConfig
from clipkit.errors import DataError
from clipkit.train.checkpoint import load_model
from clipkit.train.optim import build_optimizer, lr_multiplier
from clipkit.train.trainer import Trainer
from tests.conftest import tiny_model_config, train_until_sigterm

REPO = Path(__file__).resolve().parent.parent


def with_toy(config: ExperimentConfig, toy) -> ExperimentConfig:
    data = dataclasses.replace(config.data, train_shards=toy.shard_pattern("train"))
    return dataclasses.replace(config, data=data)


def test_short_training_run_loss_falls(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.train.epochs = 3
    trainer = Trainer(config, progress=False)
    assert trainer.total_steps == 3 * (320 // 16)
    result = trainer.fit()
    assert result.steps == 60 and result.samples == 60 * 16 and result.skipped == 0
    records = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    for key in ("loss", "lr", "temperature", "samples_per_s", "data_wait_fraction", "skipped_samples", "epoch"):
        assert key in records[0]
    assert records[-1]["epoch"] == 2
    first, last = records[0]["loss"], records[-1]["loss"]
    assert first > 2.0  # ~ln(16) for an untrained model
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert list((Path(config.train.output_dir) / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((Path(config.train.output_dir) / "config.yaml").read_text())["train"]["epochs"] == 3

    loaded, loaded_config = load_model(result.checkpoint)
    assert loaded_config == config
    tokens = loaded.tokenize(["a red circle"])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), trainer.model.encode_text(tokens))


def test_training_is_deterministic_on_cpu(tiny_config, toy_shards):
    weights = []
    for run in range(2):
        config = with_toy(tiny_config, toy_shards)
        config.train.max_steps = 4
        config.train.output_dir = f"{tiny_config.train.output_dir}-{run}"
        trainer = Trainer(config, progress=False)
        trainer.fit()
        weights.append(trainer.model.state_dict())
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_no_weight_decay_on_gains_biases_and_temperature():
    model_config = tiny_model_config()
    from clipkit.model import create_model

    model = create_model(model_config)
    optimizer = build_optimizer(model, ExperimentConfig().train)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.logit_scale) not in decayed
    assert all(p.ndim >= 2 for p in optimizer.param_groups[0]["params"])
    assert any("token_embedding" in names[i] for i in map(id, optimizer.param_groups[1]["params"]))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    schedule = lr_multiplier("cosine", warmup_steps=10, total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.5)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    values = [schedule(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_cooldown_schedules():
    constant = lr_multiplier("constant", warmup_steps=4, total_steps=100)
    assert constant(1) == pytest.approx(0.5) and constant(4) == constant(99) == 1.0
    cooldown = lr_multiplier("const-cooldown", warmup_steps=4, total_steps=100, cooldown_steps=20)
    assert cooldown(79) == 1.0
    assert cooldown(80) == pytest.approx(1.0) and cooldown(90) == pytest.approx(0.5)
    assert cooldown(100) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", warmup_steps=0, total_steps=10)


def test_missing_sizes_needs_an_explicit_length(tiny_config, toy_shards, tmp_path):
    shard = tmp_path / "only.tar"
    shard.write_bytes(Path(toy_shards.train_shards[0]).read_bytes())
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, train_shards=str(shard)))
    with pytest.raises(DataError, match=r"only.tar has no entry in a sizes.json .*data.train_num_samples .*train.max_steps"):
        Trainer(config, progress=False)
    config.data.train_num_samples = 64
    assert Trainer(config, progress=False).total_steps == 64 // 16
    # train.max_steps alone is enough: the epochs are as long as the data.
    config.data.train_num_samples = None
    config.train.max_steps = 6
    result = Trainer(config, progress=False).fit()
    assert result.steps == 6 and result.samples == 6 * 16


def test_missing_shards_are_named_once_and_counted(tiny_config, toy_shards, tmp_path, caplog):
    copy = tmp_path / "shards"
    copy.mkdir()
    for shard in toy_shards.train_shards:
        (copy / Path(shard).name).write_bytes(Path(shard).read_bytes())
    (copy / "sizes.json").write_text((Path(toy_shards.train_shards[0]).parent / "sizes.json").read_text())
    (copy / Path(toy_shards.train_shards[1]).name).unlink()  # listed in sizes.json, but gone
    pattern = str(copy / "train-{000000..000004}.tar")
    for resampled in (False, True):
        config = dataclasses.replace(tiny_config, data=dataclasses.replace(
            tiny_config.data, train_shards=pattern, resampled=resampled,
            train_num_samples=320 if resampled else None))
        config.train.output_dir = str(tmp_path / f"run-{resampled}")
        caplog.clear()
        trainer = Trainer(config, progress=False)
        assert trainer.total_steps == (320 // 16 if resampled else 256 // 16)
        result = trainer.fit()
        warnings = [r.getMessage() for r in caplog.records if "train-000001.tar" in r.getMessage()]
        assert len(warnings) == 1 and "1 of the 5 training shards do not exist (64 samples)" in warnings[0]
        assert result.skipped == 64
        last = json.loads((tmp_path / f"run-{resampled}" / "metrics.jsonl").read_text().splitlines()[-1])
        assert (last["skipped_samples"], last["missing_shards"]) == (64, 1)


def test_bad_training_data_stops_with_one_line(tiny_config, toy_shards, tmp_path):
    config = with_toy(tiny_config, toy_shards)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    command = [sys.executable, "-m", "clipkit", "train", "--config", str(path), "--no-progress",
               "--set", f"train.output_dir={tmp_path / 'run'}"]
    nowhere = subprocess.run([*command, "--set", f"data.train_shards={tmp_path}/gone-{{0..3}}.tar"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert nowhere.returncode == 2 and "Traceback" not in nowhere.stderr
    assert "none of the training shards exist: 4 of the 4 training shards do not exist" in nowhere.stderr
    junk = tmp_path / "junk.tar"
    junk.write_bytes(bytes(range(256)) * 40)
    broken = subprocess.run([*command, "--set", f"data.train_shards={junk}", "--set", "data.train_num_samples=64"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr
    assert "yielded no full batch of 16" in broken.stderr


def test_python_m_clipkit_train_cli(tiny_config, toy_shards, tmp_path):
    config = with_toy(tiny_config, toy_shards)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    out = tmp_path / "cli-run"
    command = [sys.executable, "-m", "clipkit.train", "--config", str(path),
               "--set", "train.max_steps=3", "--set", f"train.output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "trained 3 steps" in done.stdout
    assert (out / "checkpoints" / "final.pt").is_file()

    bad = subprocess.run([*command[:-4], "--set", "train.lrr=1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2
    assert "unknown key 'train.lrr'" in bad.stderr and "did you mean 'train.lr'" in bad.stderr

    missing = subprocess.run([*command, "--resume", str(tmp_path / "nope.pt")], capture_output=True, text=True,
                             timeout=120, cwd=REPO)
    assert missing.returncode == 1
    assert missing.stderr.strip().endswith(f"train.resume: checkpoint not found: {tmp_path / 'nope.pt'}")


def test_resume_continues_exactly(tiny_config, toy_shards, tmp_path):
    """2·n steps straight == n steps, a checkpoint, a new process state, n more steps (mid-epoch)."""
    config = with_toy(tiny_config, toy_shards)
    config.train.max_steps = 26  # 20 steps per epoch: the resume point (13) is mid-epoch, the end is not
    config.train.save_every = 13
    straight = Trainer(config, progress=False)
    straight.fit()
    checkpoints = Path(config.train.output_dir) / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 26

    resumed_config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, output_dir=str(tmp_path / "resumed"),
                                          resume=str(checkpoints / "step-00000013.pt")))
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process holds
    resumed = Trainer(resumed_config, progress=False)
    assert (resumed.step, resumed.epoch, resumed.batches_in_epoch) == (13, 0, 13)
    result = resumed.fit()
    assert result.steps == 13 and resumed.step == 26
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert resumed.samples_seen == straight.samples_seen == 26 * 16


def test_resume_latest_needs_a_checkpoint(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.train.resume = "latest"
    with pytest.raises(FileNotFoundError, match="holds no checkpoint yet"):
        Trainer(config, progress=False)


def test_keep_last_prunes_old_checkpoints(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.train.max_steps, config.train.save_every, config.train.keep_last = 8, 2, 2
    Trainer(config, progress=False).fit()
    names = sorted(p.name for p in (Path(config.train.output_dir) / "checkpoints").iterdir())
    assert names == ["final.pt", "latest.json", "step-00000006.pt", "step-00000008.pt"]
    payload = torch.load(Path(config.train.output_dir) / "checkpoints" / "step-00000008.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config", "step", "epoch"} <= set(payload)


def test_sigterm_saves_and_exits_cleanly_then_resumes(tiny_config, toy_shards, tmp_path):
    config = with_toy(tiny_config, toy_shards)
    config.train.max_steps = 100_000
    config.train.log_every = 1
    path = tmp_path / "long.yaml"
    returncode, stdout, stderr, step = train_until_sigterm(config, path)
    assert returncode == 0, stderr
    assert "stopped by signal after" in stdout and "--resume latest" in stderr
    checkpoints = Path(config.train.output_dir) / "checkpoints"
    assert 2 <= step < 100_000 and not (checkpoints / "final.pt").exists()

    command = [sys.executable, "-m", "clipkit.train", "--config", str(path), "--resume", "latest",
               "--set", f"train.max_steps={step + 2}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "trained 2 steps" in done.stdout and (checkpoints / "final.pt").is_file()
    metrics = Path(config.train.output_dir) / "metrics.jsonl"
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged[-2:] == [step + 1, step + 2]  # the resumed run appends to the same log


def test_sigterm_to_every_process_of_the_job_saves_and_exits_cleanly(tiny_config, toy_shards, tmp_path):
    config = with_toy(tiny_config, toy_shards)
    config.train.max_steps = 100_000
    config.train.log_every = 1
    config.data.num_workers = 2
    returncode, stdout, stderr, step = train_until_sigterm(config, tmp_path / "long.yaml", whole_group=True)
    assert returncode == 0, stderr
    assert "stopped by signal after" in stdout and "killed by signal" not in stderr
    assert step >= 2


def test_locked_image_tower_does_not_change(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.model.image.lock = True
    config.train.max_steps = 3
    trainer = Trainer(config, progress=False)
    image_before = {k: v.clone() for k, v in trainer.model.towers["image"].state_dict().items()}
    text_before = {k: v.clone() for k, v in trainer.model.towers["text"].state_dict().items()}
    trainer.fit()
    image_after = trainer.model.towers["image"].state_dict()
    assert all(torch.equal(v, image_after[k]) for k, v in image_before.items())  # weights and BN statistics
    assert not trainer.model.towers["image"].training
    text_after = trainer.model.towers["text"].state_dict()
    assert any(not torch.equal(v, text_after[k]) for k, v in text_before.items())


def test_fp16_with_scaler_clipping_and_checkpointing(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    config.model.image.timm_name = "test_vit"
    config.model.image.timm_kwargs = {"img_size": 32, "patch_size": 8}
    config.train.precision = "fp16"
    config.train.grad_clip_norm = 0.05
    config.train.grad_checkpointing = True
    config.train.max_steps = 3
    trainer = Trainer(config, progress=False)
    assert trainer.scaler.is_enabled()
    assert trainer.model.towers["text"].transformer.grad_checkpointing
    assert trainer.model.towers["image"].trunk.grad_checkpointing
    result = trainer.fit()
    assert math.isfinite(result.final_loss)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 0.05 + 1e-4


def test_too_many_bad_samples_stop_the_run(tiny_config, toy_shards, tmp_path):
    from clipkit.data.pipeline import DataQualityError

    good = Path(toy_shards.train_shards[0]).read_bytes()
    with tarfile.open(tmp_path / "broken.tar", "w") as tar:
        for i in range(1200):
            info = tarfile.TarInfo(f"bad{i:05d}.jpg")
            info.size = 4
            tar.addfile(info, io.BytesIO(b"junk"))
    shards = tmp_path / "mix"
    shards.mkdir()
    (shards / "a.tar").write_bytes(good)
    (tmp_path / "broken.tar").replace(shards / "b.tar")
    config = tiny_config
    config.data.train_shards = str(shards / "{a,b}.tar")
    config.data.train_num_samples = 1264
    config.data.max_skip_fraction = 0.2
    with pytest.raises(DataQualityError, match="data.max_skip_fraction"):
        Trainer(config, progress=False).fit()


@pytest.mark.parametrize("damage", ["half-random", "all-truncated"])
def test_broken_shards_count_toward_the_skip_guard(tiny_config, toy_shards, tmp_path, damage):
    originals = [Path(p).read_bytes() for p in toy_shards.train_shards]
    folder = tmp_path / "shards"
    folder.mkdir()
    sizes = {}
    for i in range(20):  # 20 shards of 64: 1280 samples, enough for the guard to judge
        data = originals[i % len(originals)]
        if damage == "all-truncated":
            data = data[: len(data) // 2]
        elif i % 2:
            data = np.random.default_rng(i).integers(0, 256, len(data), dtype=np.uint8).tobytes()
        (folder / f"s-{i:02d}.tar").write_bytes(data)
        sizes[f"s-{i:02d}.tar"] = 64
    (folder / "sizes.json").write_text(json.dumps(sizes))
    config = tiny_config
    config.data.train_shards = str(folder / "s-{00..19}.tar")
    config.data.shuffle_buffer = 0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = subprocess.run([sys.executable, "-m", "clipkit", "train", "--config", str(path), "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "data.max_skip_fraction" in done.stderr and "were skipped" in done.stderr


def short_run(config: ExperimentConfig, name: str, **train_options) -> Trainer:
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, max_steps=3, output_dir=f"{config.train.output_dir}-{name}", **train_options))
    trainer = Trainer(config, progress=False)
    trainer.fit()
    return trainer


def assert_same_embeddings(first: Trainer, second: Trainer) -> None:
    """Both trained models embed the same batch alike. (Weights are not compared: Adam turns float
    rounding in gradients that are zero in exact arithmetic, e.g. attention key biases', into updates.)"""
    batch = next(iter(first.loader))
    for trainer in (first, second):
        trainer.model.eval()
    with torch.no_grad():
        ours, theirs = first.model(batch), second.model(batch)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-3), name


def test_channels_last_trains_like_the_default_layout(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    plain = short_run(config, "plain", channels_last=False)
    trainer = Trainer(dataclasses.replace(config, train=dataclasses.replace(
        config.train, max_steps=3, channels_last=True)), progress=False)
    convolutions = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    images = []
    trainer.model.towers["image"].register_forward_pre_hook(lambda module, args: images.append(args[0]))
    result = trainer.fit()
    assert images and all(x.is_contiguous(memory_format=torch.channels_last) for x in images)
    assert_same_embeddings(plain, trainer)  # the same arithmetic in another memory order
    loaded, _ = load_model(result.checkpoint)
    assert torch.equal(loaded.logit_scale, trainer.model.logit_scale)


@pytest.mark.slow
def test_compiled_model_trains_like_eager_and_saves_plain_names(tiny_config, toy_shards):
    config = with_toy(tiny_config, toy_shards)
    eager = short_run(config, "eager")
    compiled = short_run(config, "compiled", compile=True)
    assert compiled.ddp_model is not compiled.model  # the step ran through the compiled module
    state = torch.load(compiled.checkpointer.path(3), weights_only=True)["model"]
    assert state.keys() == eager.model.state_dict().keys()  # no "_orig_mod." prefixes
    assert_same_embeddings(eager, compiled)


def test_speed_options_are_typed_config_keys(tmp_path):
    from clipkit.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  channels_last: false\n  compile: true\n")
    assert not load_config(path).train.channels_last and load_config(path).train.compile
    with pytest.raises(ConfigError, match="compile"):
        load_config(path, ["train.compile=fast"])
