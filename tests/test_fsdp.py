"""``train.parallel: fsdp``: FSDP2 on real torchrun processes with gloo on the CPU.

Two FSDP ranks must step exactly as two DDP ranks do (loss and every gradient, gathered whole, within
1e-5; parameters and optimizer state after training), the sharding must cut what each rank holds,
and a checkpoint folder of two ranks must resume on one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.config import ConfigError, ExperimentConfig, TrainConfig
from clipkit.train.fsdp import shard_units
from clipkit.train.sharded_checkpoint import TRAINER_STATE, CheckpointReader
from tests.test_distributed import assert_same_step, exact_config, fixed_batch, four_steps, torchrun, two_rank_step


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "infonce"},
        {"loss": "siglip", "accum_freq": 2},
        {"loss": "infonce", "grad_clip_norm": 0.05},
        {"method": "simclr"},
        {"method": "byol"},
        {"loss": "infonce", "grad_checkpointing": True, "layer_decay": 0.7},
    ],
    ids=["infonce", "siglip-accum2", "infonce-clipped", "simclr", "byol", "checkpointed-layer-decay"],
)
def test_fsdp_step_equals_ddp(toy_shards, tmp_path, options):
    """Loss, every gradient and every parameter after the step (BYOL's momentum target too); the
    clipped case compares the clipped gradients."""
    batch = fixed_batch(exact_config(toy_shards, tmp_path))
    ddp = two_rank_step(exact_config(toy_shards, tmp_path, **options), batch, tmp_path)
    fsdp = two_rank_step(exact_config(toy_shards, tmp_path, parallel="fsdp", **options), batch, tmp_path)
    assert_same_step(fsdp, ddp["loss"], ddp["grads"])
    assert set(fsdp["params"]) == set(ddp["params"])
    for name, param in ddp["params"].items():
        torch.testing.assert_close(fsdp["params"][name], param, atol=1e-5, rtol=1e-4, msg=name)
    if options.get("method") == "byol":
        assert any(name.startswith("heads.target.") for name in fsdp["params"])
    if "grad_clip_norm" in options:
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in fsdp["grads"].values()]))
        assert norm == pytest.approx(options["grad_clip_norm"], rel=1e-4)


def test_fsdp_bf16_gathers_bf16_weights_and_keeps_fp32_gradients(toy_shards, tmp_path):
    """The GPU policy, run on the CPU: the step computes in bf16 (its loss is not fp32's to the last
    bit, yet close) while gradients and weights stay fp32 and point where fp32's do."""
    batch = fixed_batch(exact_config(toy_shards, tmp_path))
    fp32 = two_rank_step(exact_config(toy_shards, tmp_path, parallel="fsdp"), batch, tmp_path)
    bf16 = two_rank_step(exact_config(toy_shards, tmp_path, parallel="fsdp", precision="bf16"), batch, tmp_path)
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=2e-2)
    assert {grad.dtype for grad in bf16["grads"].values()} == {torch.float32}
    assert {param.dtype for param in bf16["params"].values()} == {torch.float32}
    flat = [torch.cat([run["grads"][name].flatten() for name in sorted(fp32["grads"])]) for run in (fp32, bf16)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


def test_shard_units_are_each_towers_blocks():
    """A ViT's blocks and the text transformer's residual blocks; not a stem's or an MLP's layers."""
    from clipkit.model import model_for_weights
    from tests.conftest import tiny_model_config

    config = tiny_model_config()
    config.image.timm_name = "test_vit"
    config.image.timm_kwargs = {"img_size": 32, "patch_size": 8}
    model = model_for_weights(config)
    units = shard_units(model)
    assert [type(unit).__name__ for unit in units].count("Block") == len(model.towers["image"].trunk.blocks)
    text_blocks = model.towers["text"].transformer.resblocks
    assert all(any(unit is block for unit in units) for block in text_blocks)
    assert not any(isinstance(unit, (torch.nn.Linear, torch.nn.Conv2d)) for unit in units)


def test_fsdp_refuses_fp16():
    with pytest.raises(ConfigError, match="bf16"):
        TrainConfig(parallel="fsdp", precision="fp16")


def train_two_ranks(toy, tmp_path: Path, parallel: str) -> tuple[ExperimentConfig, Path]:
    """Four steps on two torchrun ranks (checkpoints every 2, zero-shot evaluation every 2) → the
    config and its run folder."""
    tmp_path.mkdir()
    config, path = four_steps(toy, tmp_path)
    config.train.parallel = parallel
    config.data.eval_shards = toy.shard_pattern("eval")
    config.train.eval_every = 2
    path.write_text(yaml.safe_dump(config.to_dict()))
    done = torchrun(2, "-m", "clipkit.train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return config, Path(config.train.output_dir)


def records(run: Path, key: str) -> list[dict]:
    """The run's metrics records that hold ``key``."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


@pytest.mark.slow
def test_fsdp_training_equals_ddp_and_resumes_on_another_number_of_ranks(toy_shards, tmp_path):
    """Two FSDP ranks train, evaluate and checkpoint as two DDP ranks do; their checkpoint folder of
    step 4 then resumes in one process (the same global batch of 16 in one rank) with DDP's state."""
    from clipkit.train.checkpoint import load_model
    from clipkit.train.trainer import Trainer

    _, ddp_run = train_two_ranks(toy_shards, tmp_path / "ddp", "ddp")
    config, fsdp_run = train_two_ranks(toy_shards, tmp_path / "fsdp", "fsdp")
    checkpoints = fsdp_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "best.pt", "final.pt", "latest.json", "step-00000002", "step-00000004"]
    assert sorted(p.name for p in (checkpoints / "step-00000004").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", TRAINER_STATE]
    for ddp_record, fsdp_record in zip(records(ddp_run, "eval/acc1"), records(fsdp_run, "eval/acc1"), strict=True):
        assert fsdp_record["eval/acc1"] == ddp_record["eval/acc1"]
    memory, ddp_memory = records(fsdp_run, "params_mib")[-1], records(ddp_run, "params_mib")[-1]
    for key in ("params_mib", "grads_mib", "optimizer_mib"):  # a rank holds about half under FSDP
        assert memory[key] < 0.6 * ddp_memory[key]
    with pytest.raises(ValueError, match="final.pt or best.pt"):  # a training folder is not a model file
        load_model(checkpoints / "step-00000004")
    ddp_final = torch.load(ddp_run / "checkpoints" / "final.pt", weights_only=True)
    fsdp_final = torch.load(checkpoints / "final.pt", weights_only=True)
    torch.testing.assert_close(fsdp_final["model"], ddp_final["model"], atol=1e-5, rtol=1e-4)

    config.data.batch_size *= 2
    config.train.resume = "latest"
    config.train.max_steps = 6
    trainer = Trainer(config, progress=False)
    ddp_step = torch.load(ddp_run / "checkpoints" / "step-00000004.pt", weights_only=True)
    assert (trainer.step, trainer.samples_seen) == (4, 64)
    torch.testing.assert_close(trainer.model.state_dict(), ddp_step["model"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.optimizer.state_dict()["state"], ddp_step["optimizer"]["state"],
                               atol=1e-5, rtol=1e-4)
    assert trainer.scheduler.state_dict() == ddp_step["scheduler"]
    result = trainer.fit()
    assert result.steps == 2 and (checkpoints / "step-00000006").is_dir()
    assert json.loads((checkpoints / "latest.json").read_text())["path"] == "step-00000006"


def test_checkpoint_index_refuses_code(tmp_path):
    """A .metadata that would run code on unpickling (DCP's own reader would) is refused."""
    import os
    import pickle

    class Exploit:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "owned"),)

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="not part of a checkpoint's metadata"):
        CheckpointReader(tmp_path).read_metadata()
    assert not (tmp_path / "owned").exists()


def test_resume_checks_the_global_batch(toy_shards, tmp_path):
    """Another number of ranks resumes when batch × accumulation × ranks is unchanged, not otherwise."""
    from clipkit.train.resume import check_resume

    config = exact_config(toy_shards, tmp_path, parallel="fsdp")
    saved = config.to_dict()
    config.data.batch_size *= 2
    assert check_resume(tmp_path, saved, config, 2, 1) == {"data.batch_size": (4, 8)}
    with pytest.raises(ConfigError, match="global batch"):
        check_resume(tmp_path, saved, config, 2, 2)
    config.data.batch_size //= 2
    with pytest.raises(ConfigError, match="global batch"):
        check_resume(tmp_path, saved, config, 2, 1)
