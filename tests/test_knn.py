"""`clipkit eval knn`: DINO's weighted k-NN vote against a direct NumPy reading of its formula, the
few-shot draws, and the command on real toy shards equal to the library calls."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clipkit.cli import main
from clipkit.config import ExperimentConfig
from clipkit.data.pipeline import CLASS_LABEL_FIELD
from clipkit.eval import knn
from clipkit.eval.datasets import classification_data
from clipkit.eval.embed import embed_batches, embed_shards
from clipkit.eval.encoders import load_encoder
from clipkit.eval.knn import knn_scores
from clipkit.eval.labelled import sample_shots
from clipkit.eval.metrics import classification_metrics
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    features = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    return features / features.norm(dim=1, keepdim=True)


def reference_votes(train: np.ndarray, labels: np.ndarray, test: np.ndarray, classes: int, k: int, t: float) -> np.ndarray:
    """Each test row: the k most similar training rows, each adding exp(cosine / t) to its class."""
    votes = np.zeros((len(test), classes))
    for row, query in enumerate(test):
        similarity = train @ query
        for neighbour in np.argsort(-similarity)[:k]:
            votes[row, labels[neighbour]] += np.exp(similarity[neighbour] / t)
    return votes


@pytest.mark.parametrize("k", [1, 20, 500])  # 500: more than the 200 training rows
def test_knn_votes_are_dinos_weighted_vote(monkeypatch, k):
    monkeypatch.setattr(knn, "CHUNK", 7)  # several similarity blocks
    train, test = unit(200, 16, 0), unit(30, 16, 1)
    labels = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(2))
    votes = knn_scores(train, labels, test, 5, k=k, temperature=0.07)
    expected = reference_votes(train.double().numpy(), labels.numpy(), test.double().numpy(), 5, min(k, 200), 0.07)
    np.testing.assert_allclose(votes.numpy(), expected, rtol=1e-4)
    with pytest.raises(ValueError, match="temperature > 0"):
        knn_scores(train, labels, test, 5, k=k, temperature=0)


def test_shot_draws_keep_n_of_each_class_and_name_the_short_classes():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 3)
    generator = torch.Generator().manual_seed(0)
    draws = [sample_shots(labels, 3, 3, generator) for _ in range(4)]
    for drawn in draws:
        assert torch.equal(torch.bincount(labels[drawn], minlength=3), torch.tensor([3, 3, 3]))
        assert torch.equal(drawn, drawn.sort().values) and len(set(drawn.tolist())) == 9
    assert len({tuple(drawn.tolist()) for drawn in draws}) > 1  # the draws differ
    with pytest.raises(ValueError, match=r"need 4 training samples of every class.*: 2 \(3\)"):
        sample_shots(labels, 4, 3, generator)


@pytest.fixture(scope="module")
def train_csv(toy_shards, tmp_path_factory) -> Path:
    """The toy training split (captioned shards, no class index) as JPEG files and a CSV of path,label,
    the label the sample's colour and shape name."""
    root = tmp_path_factory.mktemp("train-csv")
    rows = ["path,label"]
    for shard in toy_shards.train_shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    key = member.name.removesuffix(".json")
                    fields = json.loads(tar.extractfile(member).read())
                    (root / f"{key}.jpg").write_bytes(tar.extractfile(f"{key}.jpg").read())
                    rows.append(f"{key}.jpg,{fields['colour']} {fields['shape']}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root / "train.csv"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = ExperimentConfig(model=tiny_model_config())
    with torch.random.fork_rng():  # leave the global generator as the other test modules expect to find it
        torch.manual_seed(0)
        model = create_model(config.model).eval()
    return save_checkpoint(tmp_path_factory.mktemp("knn") / "model.pt", model, config)


def test_eval_knn_on_toy_shards_equals_the_library_calls(toy_shards, train_csv, checkpoint, tmp_path, capsys):
    output = tmp_path / "knn.json"
    code = main(["eval", "knn", "--model", str(checkpoint), "--device", "cpu", "--no-progress",
                 "--train-dataset", str(train_csv), "--dataset", toy_shards.shard_pattern("eval"),
                 "--classnames", str(toy_shards.root / "classnames.txt"),
                 "--shots", "1", "4", "--draws", "3", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("knn_classification of 96 image samples (classes 24, train_samples 320, k 20, draws 3")
    assert "1_shot_acc1_mean" in printed and "temperature: 0.07" in printed
    report = json.loads(output.read_text())

    encoder = load_encoder(str(checkpoint), device="cpu")
    train = classification_data(str(train_csv), encoder.eval_decoder("image"), classnames=toy_shards.classnames)
    embedded_train = embed_batches(encoder, "image", train.batches, keep=["label"])
    test, test_fields = embed_shards(encoder, "image", toy_shards.eval_shards, extra_fields=[CLASS_LABEL_FIELD])
    votes = knn_scores(embedded_train.features, embedded_train.fields["label"].long(), test, 24)
    expected = classification_metrics(votes, test_fields["label"].long(), ks=(1, 5))
    assert report["metrics"]["acc1"] == pytest.approx(expected.topk[1])
    assert report["metrics"]["acc5"] == pytest.approx(expected.topk[5])
    for n in (1, 4):
        draws = report["metrics"][f"{n}_shot_acc1_draws"]
        assert len(draws) == 3
        assert report["metrics"][f"{n}_shot_acc1_mean"] == pytest.approx(np.mean(draws))
        assert report["metrics"][f"{n}_shot_acc1_std"] == pytest.approx(np.std(draws))


def test_eval_knn_refuses_what_it_cannot_do(toy_shards, train_csv, checkpoint, capsys):
    base = ["eval", "knn", "--model", str(checkpoint), "--device", "cpu", "--no-progress",
            "--train-dataset", str(train_csv), "--dataset", toy_shards.shard_pattern("eval"),
            "--classnames", str(toy_shards.root / "classnames.txt")]
    assert main([*base, "--shots", "40"]) == 2  # 320 training samples over 24 classes: none has 40
    assert "40-shot draws need 40 training samples of every class" in capsys.readouterr().err
    assert main([*base, "--shots", "0"]) == 2
    assert "--shots takes counts ≥ 1" in capsys.readouterr().err
    captioned = [*base[:8], toy_shards.shard_pattern("train"), *base[9:]]  # shards without class indexes
    assert main(captioned) == 2
    assert "have no cls member" in capsys.readouterr().err
