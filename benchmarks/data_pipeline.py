"""Training data loader throughput, clipkit against open_clip, from the same 512-px JPEG shards.

    python benchmarks/data_pipeline.py [--workers 1 2] [--repeats 3] [--batches 24]

Both loaders turn webdataset shards of noisy 512-px toy JPEGs and their captions into batches of
224-px random resized crops (area 0.9–1.0, open_clip's default) and 77-token captions: clipkit's
``ShardStream`` (uint8 crops, normalised later on the device) and open_clip's
``open_clip_train.data.get_wds_dataset`` with ``open_clip.image_transform(224, is_train=True)`` (float
crops, normalised in the worker). open_clip's data code needs webdataset 0.2.86: it runs in a child
process that finds that version first on its path (installed once into the benchmark cache).

Every measurement is a fresh process; the two pipelines alternate, so drift on a shared machine
hits both alike. Printed: samples/s per loader and per worker (median and range of the repeats),
the CPU time each sample costs (workers and main process: what other load on the machine does not
inflate), the ratios of both (medians of the paired runs), and statistics of both pipelines' crops of
the same samples. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import _common

IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
SHUFFLE = 1000  # samples; open_clip fills 1000 before its first batch
SCRIPT = Path(__file__).resolve()


@dataclass(frozen=True)
class LoaderRate:
    samples_per_s: float
    cpu_ms_per_sample: float  # workers and main process together
    first_batch: Any


def loader_rate(batches: Iterable[Any], count: Callable[[Any], int], warmup: int, timed: int) -> LoaderRate:
    """Throughput over ``timed`` batches after ``warmup`` ones (worker start-up, shuffle-buffer fill)."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start, cpu_start = time.perf_counter(), _common.cpu_seconds()
    first = next(iterator)
    samples = count(first)
    for batch in itertools.islice(iterator, timed - 1):
        samples += count(batch)
    cpu, wall = _common.cpu_seconds() - cpu_start, time.perf_counter() - start
    return LoaderRate(samples / wall, cpu * 1000 / samples, first)


def output_statistics(shards: list[str], count: int) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean and std (in CLIP-normalised units) and sharpness of the crops each pipeline's
    image transform makes of the same ``count`` samples: the evidence that the outputs are equivalent."""
    import open_clip
    import torch
    from PIL import Image

    from clipkit.modalities.image import ImageTowerConfig
    from clipkit.data.pipeline import read_shards
    from clipkit.modalities.image import ImageDecoder

    images = [sample["jpg"] for sample in itertools.islice(read_shards(shards, {"jpg"}), count)]
    tower = ImageTowerConfig()
    mean, std = torch.tensor(tower.mean).view(1, 3, 1, 1), torch.tensor(tower.std).view(1, 3, 1, 1)
    decoder = ImageDecoder(IMAGE_SIZE, train=True, crop_scale=_common.OPEN_CLIP_CROP_SCALE, horizontal_flip=False)
    ours = torch.stack([decoder(data, random.Random(i)) for i, data in enumerate(images)])
    ours = (ours.float() / 255 - mean) / std  # what clipkit's image tower does on the device
    transform = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    theirs = torch.stack([transform(Image.open(io.BytesIO(data)).convert("RGB")) for data in images])
    stats = {}
    for name, batch in (("clipkit", ours), ("open_clip", theirs)):
        stats[name] = {"mean": batch.mean(dim=(0, 2, 3)).tolist(), "std": batch.std(dim=(0, 2, 3)).tolist(),
                       # mean |difference| of neighbouring pixels: falls if an image is blurred
                       "sharpness": (batch[..., 1:] - batch[..., :-1]).abs().mean().item()}
    return stats


def measure_clipkit(pattern: str, workers: int, batch_size: int, warmup: int, timed: int) -> dict[str, Any]:
    from clipkit.config import AugmentConfig, ModelConfig
    from clipkit.modalities.image import ImageTowerConfig
    from clipkit.modalities.text import TextTowerConfig
    from clipkit.data.pipeline import ShardStream, build_loader
    from clipkit.data.shards import shard_sources
    from clipkit.modalities import get_modality

    model = ModelConfig(image=ImageTowerConfig(image_size=IMAGE_SIZE), text=TextTowerConfig(context_length=CONTEXT_LENGTH))
    augment = AugmentConfig(crop_scale=_common.OPEN_CLIP_CROP_SCALE)
    fields = [get_modality(name, model, augment).field(train=True) for name in ("image", "text")]
    epoch = batch_size * (warmup + timed) * 4  # never runs out within the measurement
    stream = ShardStream(shard_sources(pattern), fields, batch_size, train=True, resampled=True,
                         epoch_samples=epoch, shuffle_size=SHUFFLE)
    rate = loader_rate(build_loader(stream, workers), lambda b: len(b["image"]), warmup, timed)
    images = rate.first_batch["image"]
    return {"samples_per_s": rate.samples_per_s, "cpu_ms": rate.cpu_ms_per_sample,
            "batch": [list(images.shape), str(images.dtype)]}


def measure_open_clip(pattern: str, workers: int, batch_size: int, warmup: int, timed: int) -> dict[str, Any]:
    import open_clip
    import webdataset
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    if webdataset.__version__ != "0.2.86":
        raise RuntimeError(f"open_clip's data code needs webdataset 0.2.86, this process has {webdataset.__version__}")
    epoch = batch_size * (warmup + timed) * 4
    args = parse_args(["--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
                       "--train-num-samples", str(epoch), "--batch-size", str(batch_size), "--workers", str(workers)])
    args.world_size, args.rank = 1, 0  # what open_clip's main sets for one process
    transform = open_clip.image_transform(IMAGE_SIZE, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")  # CLIP's BPE, 77 tokens, as clipkit's
    loader = get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer).dataloader
    rate = loader_rate(loader, lambda b: len(b[0]), warmup, timed)
    images = rate.first_batch[0]
    return {"samples_per_s": rate.samples_per_s, "cpu_ms": rate.cpu_ms_per_sample,
            "batch": [list(images.shape), str(images.dtype)]}


MEASURES = {"clipkit": measure_clipkit, "open_clip": measure_open_clip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=24, help="timed batches per measurement")
    parser.add_argument("--samples", type=int, default=1024, help="size of the generated shard set")
    parser.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)  # one child measurement
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        workers = args.workers[0]
        result = MEASURES[args.measure](args.shards, workers, args.batch_size, warmup=2 * workers, timed=args.batches)
        print(json.dumps(result))
        return

    toy = _common.bench_shards(args.samples)
    pattern = toy.shard_pattern("train")
    _common.open_clip_deps()
    print(f"{_common.machine()}\n{args.samples} noisy 512-px JPEG samples → {IMAGE_SIZE}-px crops (area "
          f"{_common.OPEN_CLIP_CROP_SCALE[0]}–{_common.OPEN_CLIP_CROP_SCALE[1]}), batch {args.batch_size}, "
          f"{args.batches} timed batches × {args.repeats} repeats, clipkit and open_clip alternating\n")
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):
        for workers in args.workers:
            order = list(MEASURES) if repeat % 2 == 0 else list(MEASURES)[::-1]
            for name in order:
                child = ["--measure", name, "--shards", pattern, "--workers", str(workers),
                         "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
                result = _common.run_child(SCRIPT, child, with_open_clip_deps=name == "open_clip")
                results.setdefault((name, workers), []).append(result)
                print(f"  repeat {repeat + 1}, {workers} worker(s), {name:9s}: {result['samples_per_s']:6.0f} samples/s, "
                      f"{result['cpu_ms']:5.2f} CPU-ms/sample", flush=True)

    print("\nloader samples/s (median and range of the repeats), per worker, and CPU time per sample (workers and main "
          "process); ratios are medians of the paired runs")
    print(f"{'workers':>7} {'clipkit':>15} {'open_clip':>15} {'clipkit/worker':>15} {'open_clip/worker':>17} "
          f"{'ratio':>6} {'CPU-ms clipkit':>15} {'CPU-ms open_clip':>17} {'CPU ratio':>10}")
    for workers in args.workers:
        ours, theirs = results[("clipkit", workers)], results[("open_clip", workers)]
        rate = {name: [r["samples_per_s"] for r in runs] for name, runs in (("ours", ours), ("theirs", theirs))}
        ratio = statistics.median(a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, theirs))
        cpu_ratio = statistics.median(b["cpu_ms"] / a["cpu_ms"] for a, b in zip(ours, theirs))
        print(f"{workers:>7} {_common.median_and_range(rate['ours']):>15} {_common.median_and_range(rate['theirs']):>15} "
              f"{statistics.median(rate['ours']) / workers:>15.0f} {statistics.median(rate['theirs']) / workers:>17.0f} "
              f"{ratio:>5.2f}x {statistics.median(r['cpu_ms'] for r in ours):>15.2f} "
              f"{statistics.median(r['cpu_ms'] for r in theirs):>17.2f} {cpu_ratio:>9.2f}x")
    stats = output_statistics([str(p) for p in toy.train_shards], count=64)
    print("\nthe same output: batches as they reach the model, and the crops of the same 64 samples "
          "(CLIP-normalised; clipkit normalises on the device)")
    for name in MEASURES:
        shape, dtype = results[(name, args.workers[0])][-1]["batch"]
        numbers = stats[name]
        print(f"  {name:9s} {tuple(shape)} {dtype:13s} channel means "
              f"[{', '.join(f'{v:.3f}' for v in numbers['mean'])}], stds [{', '.join(f'{v:.3f}' for v in numbers['std'])}], "
              f"sharpness {numbers['sharpness']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
