"""``python -m clipkit.train --config X.yaml [--set key=value ...]``: the same as ``clipkit train``."""

import sys

from clipkit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
