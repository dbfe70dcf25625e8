"""`clipkit eval linear-probe`: equal to CLIP_benchmark's linear probe on the same features (its own
code, run on the CPU), few-shot draws, and the command on real toy shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from clipkit.cli import main
from clipkit.config import ExperimentConfig
from clipkit.eval import linear_probe as lp
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

CLASSES = 5
# CLIP_benchmark reorders its training features by a permutation from torch's global generator (for
# its few-shot pick, even with all shots); seeded, the same order is given to clipkit.
PERMUTATION_SEED = 123


class CudaNamed(str):
    """CLIP_benchmark's linear probe asserts ``device == 'cuda'``; this device string passes that check
    and still names the CPU for every tensor it moves."""

    def __eq__(self, other: object) -> bool:
        return other == "cuda" or str.__eq__(self, other)

    __hash__ = str.__hash__


def clustered(count: int, seed: int, spread: float = 1.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm (count, 16) features of CLASSES overlapping clusters, and their labels: hard enough that
    the weight decay matters."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 16, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(count) % CLASSES
    features = centres[labels] + spread * torch.randn(count, 16, generator=generator)
    return torch.nn.functional.normalize(features, dim=1), labels


def clip_benchmark_probe(tmp_path: Path, monkeypatch, train, val, test) -> dict:
    """CLIP_benchmark's ``linear_probe.evaluate`` on these features, read from its own feature cache."""
    from clip_benchmark.metrics import linear_probe as reference

    def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
        # CLIP_benchmark 1.6.2's own accuracy, with float(x.item()) for float(x.numpy()) on a
        # one-element array, which NumPy 2.x no longer converts.
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum(0).item()) / len(target) for k in topk]

    monkeypatch.setattr(reference, "accuracy", accuracy)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    folder = tmp_path / "features" / "model"
    folder.mkdir(parents=True)
    for split, (features, labels) in (("train", train), ("val", val), ("test", test)):
        torch.save(features, folder / f"features_{split}.pt")
        torch.save(labels, folder / f"targets_{split}.pt")
    torch.manual_seed(PERMUTATION_SEED)
    return reference.evaluate(None, None, None, fewshot_k=-1, batch_size=lp.BATCH_SIZE, num_workers=0, lr=lp.LR,
                              epochs=lp.EPOCHS, model_id="model", seed=0, feature_root=str(tmp_path / "features"),
                              device=CudaNamed("cpu"), val_dataloader=object(), normalize=True, amp=False)


def test_equals_clip_benchmark_on_fixed_features(tmp_path, monkeypatch):
    train, val, test = clustered(320, 1), clustered(80, 2), clustered(200, 3)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(PERMUTATION_SEED))
    ours = lp.linear_probe((train[0][order], train[1][order]), val, test[0], CLASSES)
    theirs = clip_benchmark_probe(tmp_path, monkeypatch, train, val, test)
    assert ours.weight_decay == theirs["weight_decay"]
    assert lp.WEIGHT_DECAYS[0] < ours.weight_decay < lp.WEIGHT_DECAYS[-1]  # the sweep chose: neither edge
    acc1 = (ours.logits.argmax(1) == test[1]).sum().item() / len(test[1])
    assert acc1 == pytest.approx(theirs["lp_acc1"], abs=1e-9)
    assert 1 / CLASSES + 0.1 < acc1 < 0.99


def test_sweep_trains_each_decay_once_and_restores_the_global_generator(monkeypatch):
    train, val = clustered(100, 1), clustered(40, 2)
    trained: list[float] = []
    real = lp.train_probe
    monkeypatch.setattr(lp, "train_probe", lambda *args: trained.append(args[3]) or real(*args))
    state = torch.random.get_rng_state()
    lp.sweep_weight_decay(train, val, CLASSES, lp.ProbeSettings(epochs=1))
    assert torch.equal(torch.random.get_rng_state(), state)
    # 7 coarse decays, then at most 2 new ones per refinement (span 8, 4, 2, 1).
    assert len(trained) == len(set(trained)) and 7 < len(trained) <= 7 + 2 * 4


def test_no_validation_means_no_decay():
    train, test = clustered(100, 1), clustered(50, 3)
    assert lp.linear_probe(train, None, test[0], CLASSES, lp.ProbeSettings(epochs=2)).weight_decay == 0.0


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory, toy_shards) -> Path:
    config = ExperimentConfig(model=tiny_model_config())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(config.model).eval()
    return save_checkpoint(tmp_path_factory.mktemp("probe") / "model.pt", model, config)


def test_command_reports_full_and_few_shot(toy_checkpoint, toy_shards, tmp_path, capsys):
    shards, out = toy_shards.shard_pattern("eval"), tmp_path / "probe.json"
    assert main(["eval", "linear-probe", "--model", str(toy_checkpoint), "--device", "cpu", "--train-dataset", shards,
                 "--dataset", shards, "--epochs", "2", "--shots", "1", "--draws", "2", "--output", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "linear_probe" in printed and "1_shot_acc1_mean" in printed
    report = json.loads(out.read_text())
    metrics, details = report["metrics"], report["details"]
    assert details["classes"] == 24 and details["train_samples"] + details["val_samples"] == 96
    assert details["val_samples"] == round(96 * lp.VAL_PROPORTION)
    assert 0 <= metrics["acc1"] <= 1 and len(metrics["1_shot_acc1_draws"]) == 2
    assert not math.isnan(metrics["1_shot_acc1_std"])


@pytest.mark.parametrize("options, message", [
    (["--val-proportion", "1.5"], "--val-proportion"),
    (["--shots", "4"], "4-shot draws need 4 training samples of every class"),
])
def test_command_refuses_what_it_cannot_do(toy_checkpoint, toy_shards, capsys, options, message):
    shards = toy_shards.shard_pattern("eval")
    assert main(["eval", "linear-probe", "--model", str(toy_checkpoint), "--device", "cpu", "--train-dataset", shards,
                 "--dataset", shards, "--epochs", "1", *options, "--no-progress"]) == 2
    assert message in capsys.readouterr().err
