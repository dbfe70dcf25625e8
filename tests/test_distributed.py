"""Exactness of data-parallel training: real torchrun processes with gloo on the CPU.

Two ranks, each holding half of a batch, must produce the same loss and the same parameter gradients
as one process holding the whole batch, for InfoNCE (global and local loss), SigLIP (ring exchange),
SimCLR's NT-Xent over both views of the global batch, SLIP, and gradient accumulation. The towers use
LayerNorm (a ViT) and SimCLR's projector is one linear layer: BatchNorm statistics depend on how a
batch is split, so no BatchNorm model can be split-invariant.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipkit.config import ExperimentConfig
from tests.conftest import tiny_model_config
from tests.distributed_step import run_step

REPO = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8


def exact_config(toy, tmp_path: Path, **train: object) -> ExperimentConfig:
    model = tiny_model_config()
    model.image.timm_name = "test_vit"
    model.image.timm_kwargs = {"img_size": 32, "patch_size": 8}
    config = ExperimentConfig(model=model)
    config.data.train_shards = toy.shard_pattern("train")
    config.data.batch_size = GLOBAL_BATCH // 2
    config.data.num_workers = 0
    config.train.device = "cpu"
    config.train.output_dir = str(tmp_path / "run")
    if train.get("method") in ("simclr", "slip"):
        config.model.ssl.projector_layers = 1
        config.model.ssl.projection_dim = 16
    if train.get("method") in ("simclr", "byol"):
        config.model.modalities = ("image",)
    for key, value in train.items():
        if hasattr(config.model, key):
            setattr(config.model, key, value)
        else:
            setattr(config.train, key, value)
    return config


def fixed_batch(config: ExperimentConfig) -> dict[str, torch.Tensor]:
    from clipkit.modalities.text import tokenize

    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
    views = torch.randint(0, 256, (2, GLOBAL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=generator)
    captions = [f"a {size} {colour} circle" for size in ("small", "large") for colour in ("red", "green", "blue", "grey")]
    return {"image": images, "text": tokenize(captions, config.model.text.context_length),
            "view1": views[0], "view2": views[1]}


def torchrun(nproc: int, *args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_nodes(*args: str, nodes: int = 2) -> list[subprocess.Popen]:
    """``nodes`` torchrun launchers of one process each, as separate machines would start them: the
    same command, a c10d rendezvous on 127.0.0.1 (the first launcher up hosts its store)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1",
               "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=clipkit-test", *args]
    return [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True) for _ in range(nodes)]


def finish(launchers: list[subprocess.Popen], timeout: int = 300) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each launcher; one still running at ``timeout`` fails the test."""
    results = []
    for launcher in launchers:
        try:
            out, err = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in launchers:
                os.killpg(other.pid, signal.SIGKILL)
            raise AssertionError(f"a torchrun launcher was still running after {timeout} s: a hang")
        results.append((launcher.returncode, out, err))
    return results


def single_process_step(config: ExperimentConfig, batch: dict[str, torch.Tensor]):
    from clipkit.train.trainer import Trainer

    return run_step(Trainer(config, progress=False), batch)


def two_rank_step(config: ExperimentConfig, batch: dict[str, torch.Tensor], tmp_path: Path,
                  two_nodes: bool = False) -> dict:
    """One trainer step of ``batch`` split over two torchrun ranks, on one launcher or on two (as two
    nodes): {"loss": float, "grads": {name: tensor}}."""
    config_path, batch_path, out_path = tmp_path / "c.yaml", tmp_path / "batch.pt", tmp_path / "out.pt"
    config_path.write_text(yaml.safe_dump(config.to_dict()))
    torch.save(batch, batch_path)
    args = ("tests/distributed_step.py", str(config_path), str(batch_path), str(out_path))
    if two_nodes:
        for code, _, err in finish(start_nodes(*args)):
            assert code == 0, err[-3000:]
    else:
        done = torchrun(2, *args)
        assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out_path, weights_only=True)


def assert_same_step(distributed: dict, loss: float, grads: dict[str, torch.Tensor]) -> None:
    """The two ranks' loss and every gradient equal one process's, to float32 reduction order."""
    assert distributed["loss"] == pytest.approx(loss, abs=1e-5)
    assert set(distributed["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize(
    "options",
    [
        {"loss": "infonce"},
        {"loss": "infonce", "local_loss": True},
        {"loss": "siglip"},
        {"loss": "infonce", "accum_freq": 2},
        {"loss": "siglip", "accum_freq": 2},
        {"method": "simclr"},
        {"method": "simclr", "accum_freq": 2},
        {"method": "slip"},
    ],
    ids=["infonce", "infonce-local", "siglip", "infonce-accum2", "siglip-accum2", "simclr", "simclr-accum2", "slip"],
)
def test_two_ranks_equal_one_process(toy_shards, tmp_path, options):
    config = exact_config(toy_shards, tmp_path, **options)
    batch = fixed_batch(config)
    distributed = two_rank_step(config, batch, tmp_path)
    # The single-process reference never accumulates: one step on the whole batch.
    reference_config = exact_config(toy_shards, tmp_path, **{**options, "accum_freq": 1, "local_loss": False})
    loss, grads = single_process_step(reference_config, batch)
    assert_same_step(distributed, loss, grads)
    if options.get("method") == "simclr":  # no temperature to learn; the projector learns
        assert "logit_scale" not in grads and grads["heads.projector.0.weight"].abs().sum() > 0
    else:
        assert grads["logit_scale"].abs() > 0


@pytest.mark.parametrize("options", [{"loss": "infonce"}, {"method": "simclr"}], ids=["infonce", "simclr"])
def test_two_nodes_equal_one_process(toy_shards, tmp_path, options):
    """Two torchrun launchers with one process each, meeting by c10d rendezvous as two machines do."""
    config = exact_config(toy_shards, tmp_path, **options)
    batch = fixed_batch(config)
    distributed = two_rank_step(config, batch, tmp_path, two_nodes=True)
    assert_same_step(distributed, *single_process_step(config, batch))


@pytest.mark.parametrize("loss_name", ["infonce", "siglip"])
def test_accumulation_equals_one_large_batch(toy_shards, tmp_path, loss_name):
    batch = fixed_batch(exact_config(toy_shards, tmp_path))
    whole_loss, whole = single_process_step(exact_config(toy_shards, tmp_path, loss=loss_name), batch)
    accum_loss, accumulated = single_process_step(
        exact_config(toy_shards, tmp_path, loss=loss_name, accum_freq=4), batch
    )
    # The returned loss is the last micro-batch pass's: the loss of the whole accumulated batch.
    assert accum_loss == pytest.approx(whole_loss, abs=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda message, name=name: f"{name}: {message}")


def four_steps(toy, tmp_path: Path) -> tuple[ExperimentConfig, Path]:
    """A 4-step training config (batch 8 per rank, logged and saved every 2 steps) and its YAML file."""
    config = exact_config(toy, tmp_path)
    config.data.batch_size = 8
    config.train.max_steps = 4
    config.train.log_every = 2
    config.train.save_every = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


def logged_once(run: Path) -> list[dict]:
    """The run's metrics records, after checking that one rank wrote them and the checkpoints, once."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "final.pt", "latest.json", "step-00000002.pt", "step-00000004.pt"]
    return records


def test_torchrun_training_end_to_end(toy_shards, tmp_path):
    """`torchrun -m clipkit.train`: both ranks train, rank 0 alone logs and checkpoints."""
    config, path = four_steps(toy_shards, tmp_path)
    done = torchrun(2, "-m", "clipkit.train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # printed by rank 0 only
    records = logged_once(Path(config.train.output_dir))
    assert records[-1]["samples_seen"] == 4 * 8 * 2
    assert records[-1]["samples_per_s"] == pytest.approx(2 * records[-1]["samples_per_s_per_device"])


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def lose_a_node(config: ExperimentConfig, tmp_path: Path, how: signal.Signals) -> tuple[int, str, float]:
    """Train ``config`` on two nodes and send ``how`` to the second node's training process once
    training runs → (the first node's exit code, its stderr, seconds from the signal to its exit)."""
    config.train.max_steps = 100_000
    config.train.log_every = 1
    config.train.save_every = 100_000
    config.train.output_dir = str(tmp_path / how.name)
    path = tmp_path / f"{how.name}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    launchers = start_nodes("-m", "clipkit.train", "--config", str(path))
    metrics = tmp_path / how.name / "metrics.jsonl"

    def training() -> bool:
        assert all(launcher.poll() is None for launcher in launchers), finish(launchers)
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 3

    try:
        wait_for(training, 120, "training to start")
        (worker,) = children(launchers[1].pid)
        os.kill(worker, how)
        sent = time.monotonic()
        code, _, err = finish(launchers[:1], timeout=120)[0]
        return code, err, time.monotonic() - sent
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                for child in children(launcher.pid):
                    os.kill(child, signal.SIGKILL)
                launcher.wait()


@pytest.mark.slow
def test_two_node_training_checkpoints_once_and_a_lost_node_stops_the_other(toy_shards, tmp_path):
    config, path = four_steps(toy_shards, tmp_path)
    results = finish(start_nodes("-m", "clipkit.train", "--config", str(path)))
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert sum(out.count("trained 4 steps") for _, out, _ in results) == 1
    logged_once(Path(config.train.output_dir))

    # A node's process killed mid-training: the other sees its connection drop at once.
    code, err, seconds = lose_a_node(config, tmp_path, signal.SIGKILL)
    assert code != 0 and seconds < 60
    assert "lost the others at step" in err and "--resume latest" in err
    # A node that stops answering (a stalled process, a dead link): the other gives up after the
    # collective timeout.
    config.train.collective_timeout_s = 10
    code, err, seconds = lose_a_node(config, tmp_path, signal.SIGSTOP)
    assert code != 0 and 10 <= seconds < 60
    assert "did not answer within train.collective_timeout_s=10" in err
