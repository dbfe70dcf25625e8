"""``clipkit plot``: a run's metrics.jsonl read back (resumed runs, old lines) and drawn to a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipkit.cli import main
from clipkit.train.metrics_file import read_metrics
from clipkit.train.plot import run_figure, run_panels

EVAL_METRICS = {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.48, "val_loss": 2.5,
                "image_retrieval_recall@1": 0.3, "image_retrieval_recall@5": 0.6,
                "text_retrieval_recall@1": 0.35, "text_retrieval_recall@5": 0.65}


def _train(step: int, loss: float, **extra) -> dict:
    return {"step": step, "time": 1.0 + step, "split": "train", "epoch": 0, "loss": loss, "lr": 1e-3,
            "temperature": 0.07, "logit_scale": 14.2, "samples_per_s": 300.0, **extra}


def write_run(folder: Path, lines: list[dict | str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                                  for line in lines))
    return folder


def resumed_run(folder: Path) -> Path:
    """An old-format first segment (no "split"), an evaluation, then a resume from step 20 that logs
    step 30 again."""
    old = [{k: v for k, v in _train(step, 4.0 - step / 20).items() if k != "split"} for step in (10, 20, 30)]
    return write_run(folder, [*old, {"step": 20, "time": 25.0, "split": "eval", **EVAL_METRICS},
                              _train(30, 1.0), _train(40, 0.9),
                              {"step": 40, "time": 45.0, "split": "eval", **EVAL_METRICS, "acc1": 0.7}])


def test_reader_keeps_the_later_line_and_reads_old_lines_as_train(tmp_path):
    metrics = read_metrics(resumed_run(tmp_path / "run"))
    assert sorted(metrics.splits) == ["eval", "train"]
    assert metrics.series("train", "loss") == ([10, 20, 30, 40], [3.5, 3.0, 1.0, 0.9])
    assert metrics.series("eval", "acc1") == ([20, 40], [0.5, 0.7])
    assert metrics.series("eval", "nope") == ([], [])


def test_series_skip_values_that_are_not_numbers(tmp_path):
    metrics = read_metrics(write_run(tmp_path / "run", [{"step": 5, "split": "eval", "acc1": 0.4, "acc5": None},
                                                        {"step": 9, "split": "eval", "acc1": 0.6, "acc5": 0.9}]))
    assert metrics.series("eval", "acc5") == ([9], [0.9])


def test_plot_writes_a_png_of_every_panel(tmp_path, capsys):
    run = resumed_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    assert capsys.readouterr().out.strip() == str(png)
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.width >= 800 and image.height >= 600
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # curves, text, not a blank page
    titles = [panel.title for panel in run_panels(read_metrics(run))]
    assert titles == ["loss", "learning rate", "temperature", "zero-shot classification", "retrieval"]


def test_panels_without_data_are_left_out(tmp_path):
    only_classification = write_run(tmp_path / "run", [_train(10, 3.0),
                                                        {"step": 10, "split": "eval", "acc1": 0.4, "acc5": 0.8}])
    figure = run_figure(read_metrics(only_classification), "t")
    assert [axes.get_title() for axes in figure.axes] == ["loss", "learning rate", "temperature",
                                                          "zero-shot classification"]
    assert [line.get_label() for line in figure.axes[3].get_lines()] == ["top-1", "top-5"]


def test_out_option_writes_elsewhere(tmp_path, capsys):
    out = tmp_path / "figures" / "curves.png"
    assert main(["plot", str(resumed_run(tmp_path / "run")), "--out", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.strip() == str(out)


@pytest.mark.parametrize("lines, expected", [
    (None, "no run folder"),
    ([], "is empty"),
    (["", "  "], "is empty"),
    ([_train(10, 3.0), _train(20, 2.0), '{"step": 30, "loss": 1.'], "line 3 is not JSON"),
    ([_train(10, 3.0), '[1, 2]'], "line 2 is not an object"),
    ([{"step": 10, "split": "train", "samples_per_s": 300.0}], "no loss, learning rate"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, lines, expected):
    run = tmp_path / "run"
    if lines is not None:
        write_run(run, lines)
    assert main(["plot", str(run)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("clipkit: plot: ") and expected in message and "\n" not in message
    assert not (run / "metrics.png").exists()


def test_folder_without_metrics_file_exits_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert "no metrics.jsonl in" in message and "\n" not in message
