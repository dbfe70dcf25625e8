"""``torchrun --nproc_per_node=N [--nnodes ...] -m clipkit.embed --model ... --dataset ... --out ...``:
``clipkit embed`` on N ranks, which take disjoint parts and write one folder."""

import sys

from clipkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
