"""What one rank holds under DDP and under FSDP (``train.parallel``): its parameters, their gradients
and the optimizer's state, after one real training step of a ViT-B/32-sized CLIP (random weights,
open_clip's ViT-B-32 shapes: a timm ViT-B/32 at 224 px and a 12-layer, 512-wide text transformer).

Each setting runs as a torchrun job of ``--ranks`` processes (gloo on the CPU, NCCL on GPUs) and
every rank reports; with CUDA the peak allocated memory of the step is reported too.

    python benchmarks/fsdp_memory.py                      # 2 CPU ranks
    python benchmarks/fsdp_memory.py --ranks 4 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REPORT = "rank memory: "
KEYS = ("params_mib", "grads_mib", "optimizer_mib")


def write_config(folder: Path, parallel: str, device: str, precision: str) -> Path:
    """A ViT-B/32-sized CLIP config over a few toy shards (the step itself runs on a made-up batch)."""
    import yaml

    from clipkit.config import ExperimentConfig
    from clipkit.data.toy import make_toy_image_text
    from clipkit.modalities.image import ImageTowerConfig

    toy = make_toy_image_text(folder / "toy", num_train=32, num_eval=8, image_size=32, seed=0, samples_per_shard=8)
    config = ExperimentConfig()
    config.model.embed_dim = 512
    config.model.image = ImageTowerConfig(timm_name="vit_base_patch32_224", image_size=224)
    config.data.train_shards = toy.shard_pattern("train")
    config.data.batch_size = 2
    config.data.num_workers = 0
    config.train.parallel = parallel
    config.train.device = device
    config.train.precision = precision
    config.train.output_dir = str(folder / parallel)
    path = folder / f"{parallel}.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def worker(config_path: str) -> None:
    """Under torchrun: one training step on a random batch, then this rank's report on stdout."""
    import torch

    from clipkit.config import load_config
    from clipkit.distributed import shutdown_distributed
    from clipkit.modalities.text import tokenize
    from clipkit.train.fsdp import rank_memory_mib
    from clipkit.train.trainer import Trainer

    trainer = Trainer(load_config(config_path), progress=False)
    size = trainer.config.data.batch_size
    batch = {"image": torch.randint(0, 256, (size, 3, 224, 224), dtype=torch.uint8),
             "text": tokenize(["a photo of a cat"] * size, trainer.config.model.text.context_length)}
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train_step([batch])
    report = {"rank": trainer.dist.rank, **rank_memory_mib(trainer.model, trainer.optimizer)}
    if trainer.device.type == "cuda":
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(REPORT + json.dumps(report), flush=True)
    trainer.close()
    shutdown_distributed()


def measure(config: Path, ranks: int) -> list[dict]:
    """Every rank's report of one torchrun job."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                           __file__, "--worker", str(config)], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the torchrun job for {config.name} failed:\n{done.stderr[-3000:]}")
    reports = [json.loads(line[len(REPORT):]) for line in done.stdout.splitlines() if line.startswith(REPORT)]
    return sorted(reports, key=lambda report: report["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes its own GPU)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    print(f"ViT-B/32-sized CLIP (random weights), AdamW, {args.ranks} ranks, {args.device}, {args.precision}; "
          "MiB held by each rank after one step")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for parallel in ("ddp", "fsdp"):
            results[parallel] = measure(write_config(Path(tmp), parallel, args.device, args.precision), args.ranks)
    columns = [*KEYS, "cuda_peak_mib"] if "cuda_peak_mib" in results["ddp"][0] else list(KEYS)
    print(f"{'':10}" + "".join(f"{key:>16}" for key in [*columns, "total"]))
    for parallel, reports in results.items():
        for report in reports:
            total = sum(report[key] for key in KEYS)
            print(f"{parallel} r{report['rank']:<5}" + "".join(f"{report[key]:>16.1f}" for key in columns)
                  + f"{total:>16.1f}")
    ddp_total = max(sum(report[key] for key in KEYS) for report in results["ddp"])
    fsdp_total = max(sum(report[key] for key in KEYS) for report in results["fsdp"])
    print(f"parameters + gradients + optimizer state on the fullest rank: DDP {ddp_total:.0f} MiB, FSDP "
          f"{fsdp_total:.0f} MiB ({fsdp_total / ddp_total:.2f}x; 1/{args.ranks} would be {1 / args.ranks:.2f}x)")


if __name__ == "__main__":
    main()
