"""clipkit: contrastive multimodal alignment — train, evaluate zero-shot, and retrieve."""

import os

# GNU OpenMP (torch's CPU thread pool) lets idle threads spin between parallel regions. Beside other
# work on the same cores the spinning threads burn the time slices the busy ones need: with two
# spinning jobs on 2 cores the quickstart's step slowed 3.8× (a fair share: 2×); with sleeping threads
# 1.9×, at 10% less speed alone (benchmarks/cpu_contention.py). Read when torch loads, so set here,
# before any clipkit module imports it; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
