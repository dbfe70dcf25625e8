"""Self-supervised pretraining on the toy images, judged with few labels.

SimCLR and BYOL (configs/toy-simclr.yaml, configs/toy-byol.yaml) pretrain the quickstart's image tower
on the 24,000 toy training images without their captions. Each tower is then judged by a linear probe
(`clipkit eval linear-probe`: CLIP_benchmark's protocol) that sees 1% of the training labels (10 per
class) or 10% (100 per class), several random draws each, against the same tower at random
initialisation under the same probe and against the same architecture trained with cross-entropy on
only those labelled images (the same draws). Every figure is top-1 on 2,000 held-out images.

    python benchmarks/ssl_toy.py            # the README's table (about 25 min on 2 CPU cores)
    python benchmarks/ssl_toy.py --small    # the same steps, small: about a minute, what the test runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import CACHE  # noqa: E402
from clipkit.config import ExperimentConfig, load_config  # noqa: E402
from clipkit.data.toy import class_names, make_toy_image_text, write_split  # noqa: E402
from clipkit.eval.datasets import classification_data  # noqa: E402
from clipkit.eval.encoders import load_encoder  # noqa: E402
from clipkit.eval.labelled import sample_shots  # noqa: E402
from clipkit.eval.linear_probe import (  # noqa: E402
    VAL_PROPORTION, ProbeSettings, evaluate_linear_probe, split_validation)
from clipkit.modalities import get_modality  # noqa: E402
from clipkit.model import create_model  # noqa: E402
from clipkit.train.checkpoint import save_checkpoint  # noqa: E402
from clipkit.train.parts import seed_everything  # noqa: E402
from clipkit.train.trainer import Trainer  # noqa: E402

METHODS = ("simclr", "byol")
NUM_TRAIN = 24_000


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big a run is: the full table's, or a small one for the test."""

    num_train: int = NUM_TRAIN
    num_eval: int = 2000
    pool: int = 4800  # the first training images, labelled: 10% labels = 100 per class fit in 80% of them
    steps: int | None = None  # the configs' own (1000)
    supervised_steps: int = 300
    draws: int = 3
    image_size: int = 64

    @property
    def shots(self) -> tuple[int, int]:
        """Labelled images per class at 1% and 10% of the training labels."""
        per_class = self.num_train / len(class_names())
        return max(1, round(per_class / 100)), round(per_class / 10)


SMALL = Scale(num_train=4800, num_eval=480, pool=2400, steps=60, supervised_steps=60, draws=2, image_size=32)


def datasets(scale: Scale, root: Path) -> tuple[Path, Path, Path]:
    """(training shards, labelled pool of the first training images, held-out eval shards)."""
    toy = make_toy_image_text(root / "toy", num_train=scale.num_train, num_eval=scale.num_eval,
                              image_size=scale.image_size)
    pool = root / f"pool-{scale.pool}"
    if not (pool / "classnames.txt").is_file():
        # The same generator seed and split name draw the same images as the training shards; these
        # shards hold their labels too.
        write_split(pool, "train", scale.pool, image_size=scale.image_size, seed=0, samples_per_shard=1000,
                    with_labels=True)
        (pool / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    last = (scale.pool - 1) // 1000
    return Path(toy.shard_pattern("train")), pool / f"train-{{000000..{last:06d}}}.tar", Path(toy.shard_pattern("eval"))


def method_config(method: str, scale: Scale, train_shards: Path, output: Path) -> ExperimentConfig:
    config = load_config(REPO / "configs" / f"toy-{method}.yaml")
    config.model.image.image_size = scale.image_size
    config.data.train_shards = str(train_shards)
    if scale.steps is not None:
        config.train.max_steps = scale.steps
        config.train.warmup_steps = min(config.train.warmup_steps, scale.steps // 10)
    config.train.output_dir = str(output / method)
    return config


def pretrain(config: ExperimentConfig) -> tuple[Path, float]:
    """Train ``config`` → (its final checkpoint, the training's seconds)."""
    result = Trainer(config, progress=True).fit()
    print(f"  {config.model.method}: {result.steps} steps in {result.seconds:.0f} s, "
          f"final loss {result.final_loss:.3f}", flush=True)
    return result.checkpoint, result.seconds


def random_tower(config: ExperimentConfig, output: Path) -> Path:
    seed_everything(config.train.seed)
    return save_checkpoint(output / "random.pt", create_model(config.model).eval(), config)


def probe(checkpoint: Path, pool: Path, test: Path, scale: Scale) -> dict[str, list[float]]:
    encoder = load_encoder(str(checkpoint))
    report = evaluate_linear_probe(encoder, str(pool), str(test), shots=scale.shots, draws=scale.draws,
                                   settings=ProbeSettings(), batch_size=256)
    return {f"{n}": report.metrics[f"{n}_shot_acc1_draws"] for n in scale.shots}


def decoded(config: ExperimentConfig, spec: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``spec`` by the evaluation transform, (N, 3, S, S) uint8, and its labels (N,)."""
    data = classification_data(str(spec), get_modality("image", config.model).field(train=False), batch_size=512)
    batches = list(data.batches)
    return torch.cat([b["image"] for b in batches]), torch.cat([b["label"] for b in batches])


def supervised(config: ExperimentConfig, images: torch.Tensor, labels: torch.Tensor,
               test: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int) -> float:
    """The tower and a linear head trained from random weights with cross-entropy on ``images``
    (random flips; AdamW at the SSL config's rate with a cosine decay) → top-1 on ``test``."""
    seed_everything(seed)
    tower = create_model(config.model).towers["image"]
    head = nn.Linear(config.model.embed_dim, len(class_names()))
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for _ in range(steps):
        rows = torch.randint(len(images), (min(64, len(images)),), generator=generator)
        batch = images[rows]
        flip = torch.rand(len(rows), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = F.cross_entropy(head(tower(batch)), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    tower.eval()
    with torch.no_grad():
        predicted = torch.cat([head(tower(chunk)).argmax(1) for chunk in test[0].split(512)])
    return (predicted == test[1]).float().mean().item()


def supervised_draws(config: ExperimentConfig, pool: Path, test: Path, scale: Scale) -> dict[str, list[float]]:
    """Supervised top-1 for each shot count on the linear probe's own draws (its validation split
    held out, then the same generator): the same labelled images."""
    images, labels = decoded(config, pool)
    test_data = decoded(config, test)
    kept, _ = split_validation(len(labels), VAL_PROPORTION, ProbeSettings().seed)
    generator = torch.Generator().manual_seed(ProbeSettings().seed)
    results: dict[str, list[float]] = {}
    for n in scale.shots:
        results[f"{n}"] = []
        for draw in range(scale.draws):
            rows = kept[sample_shots(labels[kept], n, len(class_names()), generator)]
            results[f"{n}"].append(supervised(config, images[rows], labels[rows], test_data,
                                              scale.supervised_steps, draw))
    return results


def summary(values: list[float]) -> str:
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return f"{mean:.1%} ± {spread:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small run (32-px images, 60 steps): minutes")
    parser.add_argument("--root", type=Path, help="where data and runs go (default: the benchmark cache)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    scale = SMALL if args.small else Scale()
    root = args.root or CACHE / ("ssl-toy-small" if args.small else "ssl-toy")
    train_shards, pool, test = datasets(scale, root)
    runs = root / "runs"
    rows: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    base = method_config(METHODS[0], scale, train_shards, runs)
    print("linear probe of the randomly initialised tower", flush=True)
    rows["random init + linear probe"] = probe(random_tower(base, runs), pool, test, scale)
    print("supervised from scratch on the labelled images only", flush=True)
    rows["supervised on the labels only"] = supervised_draws(base, pool, test, scale)
    for method in METHODS:
        print(f"pretraining {method} on {scale.num_train} unlabelled images", flush=True)
        checkpoint, seconds[method] = pretrain(method_config(method, scale, train_shards, runs))
        rows[f"{method} + linear probe"] = probe(checkpoint, pool, test, scale)
    low, high = scale.shots
    print(f"\ntop-1 on {scale.num_eval} held-out toy images, {len(class_names())} classes (chance "
          f"{1 / len(class_names()):.1%}); mean ± std over {scale.draws} draws of the labelled images\n")
    print(f"| tower | 1% labels ({low}/class) | 10% labels ({high}/class) |")
    print("| --- | --- | --- |")
    for name, figures in rows.items():
        print(f"| {name} | {summary(figures[str(low)])} | {summary(figures[str(high)])} |")
    if args.json:
        args.json.write_text(json.dumps({"scale": dataclasses.asdict(scale), "shots": list(scale.shots),
                                         "rows": rows, "pretrain_seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
