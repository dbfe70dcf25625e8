"""Reading a training run's ``metrics.jsonl`` back: one list of records per split, in step order.

Pure Python (no torch, no matplotlib), so that anything that inspects a run can use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError

METRICS_FILE = "metrics.jsonl"
DEFAULT_SPLIT = "train"  # runs logged before evaluation lines existed have no "split" key


class MetricsFileError(ClipkitError):
    """A run folder without a readable ``metrics.jsonl``."""


@dataclass(frozen=True)
class RunMetrics:
    """The records of one run's ``metrics.jsonl`` by split ("train", "eval", ...), each list sorted by step
    with one record per step."""

    path: Path
    splits: dict[str, list[dict[str, Any]]]

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` in ``split``; records where it is absent or not a number (acc5 is
        null below 5 classes) are skipped."""
        points = [(record["step"], float(record[key])) for record in self.splits.get(split, [])
                  if _is_number(record.get(key))]
        return [step for step, _ in points], [value for _, value in points]

    def keys(self, split: str) -> set[str]:
        """Every key that some record of ``split`` has."""
        return {key for record in self.splits.get(split, []) for key in record}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Read ``RUN_DIR/metrics.jsonl``. A resumed run appends to the file and logs some steps again: the
    later line for a (split, step) wins."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricsFileError(f"no run folder {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise MetricsFileError(f"no {METRICS_FILE} in {run_dir} (clipkit train writes it to train.output_dir)")
    by_step: dict[str, dict[int, dict[str, Any]]] = {}
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MetricsFileError(f"{path} line {number} is not JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise MetricsFileError(f"{path} line {number} is not an object with an integer \"step\"")
            by_step.setdefault(record.get("split", DEFAULT_SPLIT), {})[record["step"]] = record
    if not by_step:
        raise MetricsFileError(f"{path} is empty: the run has logged nothing yet")
    return RunMetrics(path, {split: [steps[step] for step in sorted(steps)] for split, steps in by_step.items()})
