"""`clipkit embed` throughput: images/s with 1 and 2 torchrun ranks, side by side in one run.

Each run is a real ``torchrun --standalone --nproc_per_node=R -m clipkit.embed`` over the same cached
shards of noisy 512-px JPEGs (about 95 KB each, as costly to decode as web photos) into a fresh folder;
the figure is the job's own count (vectors over the slowest rank's decode + encode + write seconds,
which leaves out process start-up and model loading). The tower has random weights: the quickstart's
(test_resnet, 64 px) by default, or ``--tower vit-b-32`` (ViT-B/32 at 224 px, open_clip's
ViT-B-32 image tower's size) to compare on a GPU with clip-retrieval's published 2,500 images/s for
ViT-B/32 on one A100.

    python benchmarks/embed.py                                   # 1 and 2 ranks on the CPU
    python benchmarks/embed.py --tower vit-b-32 --device cuda --ranks 1 --workers 8 --images 8192
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import CACHE, bench_shards  # noqa: E402

CLIP_RETRIEVAL_A100_VIT_B_32 = 2500  # images/s, clip-retrieval's README (clip inference, ViT-B/32, one A100)
SUMMARY = re.compile(r"(\d+) image vectors in .* \(([\d.]+) s, (\d+) vectors/s\)")


def tower_checkpoint(tower: str) -> Path:
    """A clipkit checkpoint of ``tower`` with random weights (seeded), written once into the cache."""
    import torch

    from clipkit.config import ExperimentConfig, load_config
    from clipkit.model import create_model
    from clipkit.modalities.image import ImageTowerConfig
    from clipkit.train.checkpoint import save_checkpoint

    path = CACHE / f"embed-{tower}.pt"
    if path.is_file():
        return path
    config = load_config(REPO / "configs" / "toy-image-text.yaml")
    if tower == "vit-b-32":
        config.model.embed_dim = 512
        config.model.image = ImageTowerConfig(timm_name="vit_base_patch32_224", image_size=224)
    torch.manual_seed(0)
    save_checkpoint(path, create_model(config.model).eval(), ExperimentConfig(model=config.model))
    return path


def embed_rate(checkpoint: Path, dataset: str, ranks: int, workers: int, device: str, batch_size: int) -> tuple[int, float]:
    """(vectors, vectors/s) of one torchrun job into a fresh folder."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    env.pop("WORLD_SIZE", None)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                   "-m", "clipkit.embed", "--model", str(checkpoint), "--dataset", dataset, "--out", out,
                   "--workers", str(workers), "--device", device, "--batch-size", str(batch_size), "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    found = SUMMARY.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"clipkit embed on {ranks} rank(s) failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return int(found[1]), float(found[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048, help="images embedded per run (default: 2048)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to compare (default: 1 2)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers per rank (default: 1)")
    parser.add_argument("--tower", choices=("quickstart", "vit-b-32"), default="quickstart")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes its own GPU)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    toy = bench_shards(args.images)
    dataset = toy.shard_pattern("train")
    checkpoint = tower_checkpoint(args.tower)
    print(f"{args.images} noisy 512-px JPEGs, {args.tower} tower (random weights), {args.workers} worker(s) per "
          f"rank, {args.device}, {os.cpu_count()} CPU cores")
    rates = {}
    for ranks in args.ranks:
        vectors, rates[ranks] = embed_rate(checkpoint, dataset, ranks, args.workers, args.device, args.batch_size)
        assert vectors == args.images, f"{vectors} vectors for {args.images} images"
        print(f"{ranks} rank(s): {rates[ranks]:8.0f} images/s", flush=True)
    if len(rates) > 1:
        low, high = min(rates), max(rates)
        print(f"{high} ranks / {low}: {rates[high] / rates[low]:.2f}x")
    if args.tower == "vit-b-32" and args.device.startswith("cuda"):
        best = max(rates.values())
        print(f"clip-retrieval, ViT-B/32 on one A100: {CLIP_RETRIEVAL_A100_VIT_B_32} images/s; here: {best:.0f} "
              f"({best / CLIP_RETRIEVAL_A100_VIT_B_32:.2f}x)")


if __name__ == "__main__":
    main()
