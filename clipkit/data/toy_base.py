"""What every toy dataset shares: its on-disk layout, its cache check and its description.

A toy dataset is a folder with ``train-NNNNNN.tar`` (captioned samples) and ``eval-NNNNNN.tar``
(captioned samples with a ``cls`` class index), ``classnames.txt``,
``zeroshot_classification_templates.txt`` and ``toy.json``, the parameters it was written with,
written last so that its presence means the shards are complete.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from clipkit.data.writer import shard_name, shard_pattern


@dataclass(frozen=True)
class ToyDataset:
    root: Path
    train_shards: list[Path]
    eval_shards: list[Path]
    classnames: list[str]
    templates: list[str]

    def shard_pattern(self, split: str) -> str:
        """A brace pattern naming every shard of ``split``, e.g. ``/x/train-{000000..000009}.tar``."""
        shards = {"train": self.train_shards, "eval": self.eval_shards}[split]
        return shard_pattern(self.root, split, len(shards))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: the same sample whatever the sharding or the process."""
    # crc32, not hash(): Python salts string hashes per process.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


# write_split(out_dir, split, num_samples, with_labels) → the shard paths it wrote.
SplitWriter = Callable[[Path, str, int, bool], list[Path]]


def build_toy_dataset(
    out_dir: Path,
    params: dict[str, Any],
    *,
    num_train: int,
    num_eval: int,
    samples_per_shard: int,
    classnames: Sequence[str],
    templates: Sequence[str],
    write_split: SplitWriter,
) -> ToyDataset:
    """Reuse the dataset in ``out_dir`` when it was written with ``params``, else write it afresh."""
    out_dir = Path(out_dir).resolve()

    def shards(split: str, count: int) -> list[Path]:
        return [out_dir / shard_name(split, i) for i in range(math.ceil(count / samples_per_shard))]

    dataset = ToyDataset(out_dir, shards("train", num_train), shards("eval", num_eval),
                         list(classnames), list(templates))
    manifest = out_dir / "toy.json"
    cached = manifest.is_file() and json.loads(manifest.read_text()) == params
    if cached and all(p.is_file() for p in dataset.train_shards + dataset.eval_shards):
        return dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    for stale in [*out_dir.glob("train-*.tar"), *out_dir.glob("eval-*.tar"), out_dir / "sizes.json"]:
        stale.unlink(missing_ok=True)
    write_split(out_dir, "train", num_train, False)
    write_split(out_dir, "eval", num_eval, True)
    (out_dir / "classnames.txt").write_text("\n".join(dataset.classnames) + "\n")
    (out_dir / "zeroshot_classification_templates.txt").write_text("\n".join(dataset.templates) + "\n")
    manifest.write_text(json.dumps(params, indent=1))
    return dataset
