"""The README's main job, end to end with the shipped config: the accuracy the issue promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from clipkit.cli import QUICKSTART_CONFIG, resolve_config_path
from clipkit.config import load_config
from clipkit.data.toy_worlds import TOY_WORLDS
from clipkit.quickstart import describe_towers, run_quickstart

QUERIES = TOY_WORLDS["image"].queries

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_learns_the_toy_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config(resolve_config_path(QUICKSTART_CONFIG), [f"train.output_dir={tmp_path / 'run'}"])
    result = run_quickstart(config, tmp_path / "cache", num_train=24_000, num_eval=2_400, progress=False)

    assert result.zeroshot.num_classes >= 20 and result.zeroshot.chance <= 0.05
    assert result.zeroshot.num_samples == 2_400
    assert result.zeroshot.top1 >= 0.9, result.zeroshot  # in 270 steps, a third of the old 1496 steps' FLOPs
    red_circles = result.queries[QUERIES[0]]
    assert len(red_circles) == 5
    assert red_circles[0].metadata["class_name"] == "red circle"
    assert all(hit.metadata["colour"] == "red" for hit in red_circles)
    blue_squares = result.queries[QUERIES[1]]
    assert all(hit.metadata["colour"] == "blue" for hit in blue_squares)
    assert sum(hit.metadata["shape"] == "square" for hit in blue_squares) >= 3
    assert result.checkpoint.is_file()

    printed = capsys.readouterr().out
    assert f"top-1 {result.zeroshot.top1:.1%}" in printed and "chance 4.2%" in printed
    curve = re.findall(r"eval after step (\d+): top-1 ([\d.]+)%", printed)
    assert [int(step) for step, _ in curve] == [90, 180, 270] and float(curve[-1][1]) >= 90
    cost = float(re.search(r"evaluations during training took \d+ s, ([\d.]+)% of it", printed).group(1))
    assert cost < 5.0, printed


def test_quickstart_command_rejects_a_bad_override(tmp_path: Path) -> None:
    """The console entry point runs and fails fast, before making data, on a misspelt key."""
    run = subprocess.run(
        [sys.executable, "-m", "clipkit", "quickstart", "--cache-dir", str(tmp_path), "--set", "train.lrr=1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert run.returncode == 2
    assert "unknown key 'train.lrr'" in run.stderr and "did you mean 'train.lr'" in run.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, described", [
    ("toy-image-text", "the image tower + 2-layer text transformer"),
    ("toy-video-text", "the video tower + 2-layer text transformer"),
    ("toy-image-audio",
     "the audio tower against the locked image tower (locked 2-layer text transformer carried along)"),
])
def test_quickstart_says_what_trains_against_what(name: str, described: str) -> None:
    assert describe_towers(load_config(REPO / "configs" / f"{name}.yaml").model) == described
