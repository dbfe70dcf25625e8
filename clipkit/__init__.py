"""clipkit: contrastive multimodal alignment — train, evaluate zero-shot, and retrieve."""

import os

# GNU OpenMP (torch's CPU thread pool) lets idle threads spin between parallel regions. Beside other
# work on the same cores, the spinning threads burn the time slices the busy ones need, and a training
# step slowed many times more than the share of cores it lost (see benchmarks/cpu_contention.py).
# Sleeping threads cost nothing alone and degrade in proportion. Read when torch loads, so set here,
# before any clipkit module imports it; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
