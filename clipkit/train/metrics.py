"""Metrics to a JSONL file (one object per logged step) and to TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """Writes ``{"step": ..., "time": ..., "split": "train" | "eval", **metrics}`` lines to
    ``metrics.jsonl`` in ``log_dir``, and each number to TensorBoard as ``split/name``."""

    def __init__(self, log_dir: str | Path, *, append: bool = False, tensorboard: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / "metrics.jsonl"
        # A resumed run continues its log; a fresh run starts a new one.
        self._file = self.path.open("a" if append else "w")
        self._tensorboard = SummaryWriter(str(self.log_dir / "tensorboard")) if tensorboard else None

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        record = {"step": step, "time": round(time.time(), 3), "split": prefix, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
