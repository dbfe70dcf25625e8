"""One figure of a training run's curves against steps: loss, learning rate, temperature and the
evaluation metrics, from its ``metrics.jsonl``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
from matplotlib.ticker import PercentFormatter

from clipkit.train.metrics_file import MetricsFileError, RunMetrics, read_metrics

DEFAULT_PNG = "metrics.png"
ACCURACIES = (("acc1", "top-1"), ("acc5", "top-5"), ("mean_per_class_recall", "mean per-class recall"))
# image_retrieval_recall@5, text_retrieval_recall@1, and audio_... or video_... for other modalities.
RETRIEVAL_KEY = re.compile(r"(?P<target>\w+)_retrieval_recall@(?P<k>\d+)")
TARGET_LINESTYLES = ("-", "--", ":")  # image R@5 and text R@5 are told apart by more than their colour
MARKER_BELOW = 50  # series this short (evaluations, short runs) get point markers: one point is no line


@dataclass(frozen=True)
class Curve:
    """One line of a panel: ``key`` of the records of ``split``."""

    split: str
    key: str
    label: str
    linestyle: str = "-"


@dataclass(frozen=True)
class Panel:
    """One set of axes; ``percent`` for fractions shown as percentages."""

    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    percent: bool = False


def _retrieval_curves(metrics: RunMetrics) -> tuple[Curve, ...]:
    found = [match for key in metrics.keys("eval") if (match := RETRIEVAL_KEY.fullmatch(key))]
    found.sort(key=lambda match: (match["target"], int(match["k"])))
    targets = sorted({match["target"] for match in found})
    return tuple(Curve("eval", match[0], f"{match['target']} retrieval R@{match['k']}",
                       TARGET_LINESTYLES[targets.index(match["target"]) % len(TARGET_LINESTYLES)])
                 for match in found)


def run_panels(metrics: RunMetrics) -> list[Panel]:
    """The panels that have data to draw, in a fixed order."""
    panels = [
        Panel("loss", "contrastive loss",
              (Curve("train", "loss", "train loss"), Curve("eval", "val_loss", "val loss"))),
        Panel("learning rate", "learning rate", (Curve("train", "lr", "learning rate"),)),
        Panel("temperature", "temperature", (Curve("train", "temperature", "temperature"),)),
        Panel("zero-shot classification", "accuracy",
              tuple(Curve("eval", key, label) for key, label in ACCURACIES), percent=True),
        Panel("retrieval", "recall", _retrieval_curves(metrics), percent=True),
    ]
    return [panel for panel in panels if any(metrics.series(c.split, c.key)[0] for c in panel.curves)]


def _draw(axes: Axes, panel: Panel, metrics: RunMetrics) -> None:
    for curve in panel.curves:
        steps, values = metrics.series(curve.split, curve.key)
        if steps:
            axes.plot(steps, values, curve.linestyle, label=curve.label,
                      marker="o" if len(steps) < MARKER_BELOW else None, markersize=3)
    axes.set_title(panel.title)
    axes.set_xlabel("step")
    axes.set_ylabel(panel.ylabel)
    if panel.percent:
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    else:
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # learning rates: 2e-3, not 0.002000
    axes.grid(alpha=0.3)
    axes.legend()


def run_figure(metrics: RunMetrics, title: str) -> Figure:
    """The run's panels on a grid of two columns, over one range of steps."""
    panels = run_panels(metrics)
    if not panels:
        raise MetricsFileError(f"{metrics.path} has no loss, learning rate, temperature or evaluation "
                               "metric to plot")
    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(6.4 * columns, 3.6 * rows + 0.4), layout="constrained")
    figure.suptitle(title)
    first = None
    for index, panel in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, index, sharex=first)
        first = first or axes
        _draw(axes, panel, metrics)
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``RUN_DIR/metrics.jsonl`` to ``out`` (default ``RUN_DIR/metrics.png``; the suffix picks the
    format) and return the path written."""
    metrics = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / DEFAULT_PNG
    figure = run_figure(metrics, title=f"training run {Path(run_dir).resolve().name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out
