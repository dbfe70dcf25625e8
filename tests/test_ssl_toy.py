"""The README's toy table in small (benchmarks/ssl_toy.py --small): the pretrained towers' features
beat the same tower at random initialisation under the same probe. (The supervised row is reported,
not ordered: at the table's full scale it still wins at 1% labels; see the README.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
def test_small_toy_table_orders_pretrained_above_random(tmp_path):
    out = tmp_path / "ssl.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ssl_toy.py"), "--small", "--root",
                          str(tmp_path / "run"), "--json", str(out)], capture_output=True, text=True, timeout=900,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| simclr + linear probe |" in run.stdout
    result = json.loads(out.read_text())
    low, high = (str(n) for n in result["shots"])
    rows = {name: {n: mean(figures[n]) for n in (low, high)} for name, figures in result["rows"].items()}
    random_init = rows["random init + linear probe"]
    assert all(rows["simclr + linear probe"][n] > random_init[n] for n in (low, high)), rows
    assert rows["byol + linear probe"][high] > random_init[high], rows
    assert all(len(figures[n]) == result["scale"]["draws"] for figures in result["rows"].values() for n in (low, high))
