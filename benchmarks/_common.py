"""What both speed benchmarks share: the cached 512-px shards, open_clip's trainer dependencies in
their own folder, child processes that report one measurement each, and robust summaries.

Nothing here imports webdataset: a child that runs open_clip's data code gets webdataset 0.2.86
from the dependency folder first on its ``PYTHONPATH``, while clipkit runs on the current release.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from clipkit.data.toy import ToyDataset

CACHE = Path(os.environ.get("CLIPKIT_BENCH_CACHE", Path.home() / ".cache" / "clipkit" / "bench")).expanduser()
# open_clip's trainer pins webdataset<=0.2.86 (it fails on 1.x) and its data module imports pandas.
# --no-deps with pandas' own pure-Python dependencies listed: the folder must not shadow the numpy
# and torch of the running environment.
OPEN_CLIP_DEPS = ("webdataset==0.2.86", "pandas", "python-dateutil", "pytz", "tzdata", "six")
# open_clip's default training augmentation (AugmentationCfg.scale): clipkit is run at the same strength.
OPEN_CLIP_CROP_SCALE = (0.9, 1.0)
# JPEG grain that makes the 512-px toy images about 95 KB each: as costly to decode as web photos.
BENCH_PIXEL_NOISE = 8.0


def open_clip_deps() -> Path:
    """The folder holding open_clip's pinned trainer dependencies, installed on first use."""
    target = CACHE / "open-clip-deps"
    marker = target / ".complete"
    if marker.is_file() and marker.read_text() == "\n".join(OPEN_CLIP_DEPS):
        return target
    print(f"installing open_clip's trainer dependencies ({', '.join(OPEN_CLIP_DEPS)}) into {target} "
          "(once; the running environment is not touched)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade",
                    "--target", str(target), *OPEN_CLIP_DEPS], check=True)
    marker.write_text("\n".join(OPEN_CLIP_DEPS))
    return target


def bench_shards(num_samples: int, image_size: int = 512, samples_per_shard: int = 128) -> "ToyDataset":
    """Toy image–text shards of noisy ``image_size`` JPEGs, generated once into the cache."""
    from clipkit.data.toy import make_toy_image_text

    root = CACHE / f"shards-{image_size}px-noise{BENCH_PIXEL_NOISE:g}-{num_samples}"
    if not (root / "toy.json").is_file():
        print(f"writing {num_samples} noisy {image_size}-px toy samples to {root} (once)", flush=True)
    return make_toy_image_text(root, num_train=num_samples, num_eval=0, image_size=image_size,
                               samples_per_shard=samples_per_shard, pixel_noise=BENCH_PIXEL_NOISE)


def run_child(script: Path, args: Sequence[str], *, with_open_clip_deps: bool = False) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh interpreter and return the JSON object it prints last."""
    env = dict(os.environ)
    if with_open_clip_deps:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(open_clip_deps()), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_seconds() -> float:
    """CPU time (user + system) of this process's threads and, on Linux, of its live child processes
    (data-loader workers): the cost of the work itself, which other load on the machine does not
    inflate the way it inflates wall-clock time."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == os.getpid():  # fields after the name: state, ppid, ..., utime, stime
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def median_and_range(values: Sequence[float]) -> str:
    """``median (min–max)``, to one decimal place for small numbers and whole numbers otherwise."""
    digits = 1 if max(values) < 100 else 0
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}–{max(values):.{digits}f})")


def machine() -> str:
    """One line naming the software and the hardware the figures come from."""
    import platform

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name()
    return (f"{device}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "CPU"
