"""How much a CPU training run slows down when other work shares the cores, per thread setting.

    python benchmarks/cpu_contention.py [--steps 30] [--busy 2]

For each setting the quickstart's training step runs in a fresh process (so that OpenMP reads its
environment), first alone, then beside ``--busy`` processes that spin on the CPU (two other jobs on the
machine). It prints steps/s both ways and the slowdown, against the slowdown a fair share of the cores
would give (``(own processes + busy) / own processes`` when that exceeds the cores). Figures are printed,
never asserted: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    # What clipkit does by default: torch's threads (one per core), sleeping while they wait (PASSIVE).
    "clipkit default": {},
    # torch's own default: threads that spin between parallel regions (GOMP's active wait policy).
    "spinning threads": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}

WORKER = r"""
import json, sys, tempfile, time
import clipkit  # sets clipkit's OpenMP wait policy before torch loads
import torch
from clipkit.cli import resolve_config_path
from clipkit.config import load_config
from clipkit.train.trainer import Trainer

steps, shards = int(sys.argv[1]), sys.argv[2]
config = load_config(resolve_config_path("configs/toy-image-text.yaml"))
config.data.train_shards = shards
config.data.eval_shards = ""
config.train.eval_every = None
with tempfile.TemporaryDirectory() as tmp:
    config.train.output_dir = tmp
    config.train.max_steps = steps + 5
    trainer = Trainer(config, progress=False)
    batches = trainer._micro_batches()
    for _ in range(5):  # warm-up: worker start, first allocations
        trainer.train_step([next(batches)])
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step([next(batches)])
    rate = steps / (time.perf_counter() - start)
    batches.close()  # shuts the data loader's worker down before the interpreter exits
    print(json.dumps({"steps_per_s": rate, "threads": torch.get_num_threads()}))
"""


def spin() -> None:
    while True:
        pass


def measure(env: dict[str, str], steps: int, shards: str) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, str(steps), shards], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the run (default: 2)")
    args = parser.parse_args()
    from clipkit.data.toy import make_toy_image_text

    cores = len(os.sched_getaffinity(0))
    own = 2  # the training process and its one data worker
    fair = max(1.0, (own + args.busy) / max(cores, own))
    with tempfile.TemporaryDirectory() as tmp:
        toy = make_toy_image_text(Path(tmp), num_train=4000, num_eval=0, image_size=64, samples_per_shard=1000)
        shards = toy.shard_pattern("train")
        print(f"{cores} cores; {args.busy} spinning processes beside the run; a fair share slows it {fair:.1f}×")
        print(f"{'setting':<20}{'threads':>8}{'alone steps/s':>15}{'shared steps/s':>16}{'slowdown':>10}")
        for name, env in SETTINGS.items():
            alone = measure(env, args.steps, shards)
            busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
            for process in busy:
                process.start()
            try:
                time.sleep(0.5)
                shared = measure(env, args.steps, shards)
            finally:
                for process in busy:
                    process.terminate()
            slowdown = alone["steps_per_s"] / shared["steps_per_s"]
            print(f"{name:<20}{alone['threads']:>8}{alone['steps_per_s']:>15.2f}{shared['steps_per_s']:>16.2f}"
                  f"{slowdown:>9.1f}×")


if __name__ == "__main__":
    main()
