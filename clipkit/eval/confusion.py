"""Confusion matrices of zero-shot predictions, and a matplotlib rendering of one."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display

MAX_ANNOTATED_CLASSES = 30  # above this the values no longer fit in their cells: colours only
MIN_LABEL_POINTS = 4.0  # class names smaller than this are unreadable: left out (ImageNet's 1000 classes)
MATRIX_INCHES = (4.0, 22.0)  # the matrix side grows 0.3 in per class within these bounds
CELL_INCHES = 0.3
DPI = 100
MIN_CELL_PIXELS = 3  # large matrices get a higher resolution rather than cells that vanish
TITLE_POINTS = (12.0, 9.0)  # a long title is set smaller before it is wrapped
TITLE_MAX_LINES = 4


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """scores (N, C), true labels (N,) → counts (C, C): row = true class, column = top-1 prediction."""
    num_classes = scores.shape[1]
    predictions = scores.argmax(dim=1)
    flat = labels.long() * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _wrapped_title(title: str, width_inches: float) -> tuple[str, float]:
    """The title wrapped to the figure's width, and its font size."""
    for points in TITLE_POINTS:
        # An average character is about 0.6 em wide; 0.9 of the width leaves a margin.
        per_line = max(20, int(0.9 * width_inches * 72 / (0.6 * points)))
        lines = textwrap.wrap(title, per_line)
        if len(lines) <= 2:
            break
    return textwrap.fill(title, per_line, max_lines=TITLE_MAX_LINES, placeholder=" …"), points


def confusion_figure(matrix: torch.Tensor, classnames: Sequence[str], title: str = "") -> Figure:
    """The row-normalised matrix (each row sums to 1: recall per true class) as a heat map with a colour
    bar, class names on both axes and, for up to ``MAX_ANNOTATED_CLASSES`` classes, the values in the cells."""
    num_classes = matrix.shape[0]
    recall = (matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(max(CELL_INCHES * num_classes, MATRIX_INCHES[0]), MATRIX_INCHES[1])
    cell_points = side * 72 / num_classes
    label_points = min(10.0, 0.7 * cell_points)
    labelled = label_points >= MIN_LABEL_POINTS
    # Room for the longest class name beside and below the matrix, and for the colour bar and title.
    names = 0.6 * label_points * max(map(len, classnames)) / 72 if labelled else 0.0
    width, height = side + names + 2.0, side + names + 1.5
    figure = Figure(figsize=(width, height), dpi=max(DPI, math.ceil(MIN_CELL_PIXELS * num_classes / side)),
                    layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, shrink=0.8, label="fraction of the true class")
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if labelled:
        ticks = range(num_classes)
        axes.set_xticks(ticks, classnames, rotation=90, fontsize=label_points)
        axes.set_yticks(ticks, classnames, fontsize=label_points)
    else:
        axes.tick_params(labelbottom=False, labelleft=False, length=0)
    if num_classes <= MAX_ANNOTATED_CLASSES:
        value_points = min(10.0, 0.3 * cell_points)  # "0.83" fits in its cell
        for i in range(num_classes):
            for j in range(num_classes):
                value = recall[i, j]
                axes.text(j, i, f"{value:.2f}" if value else "0", ha="center", va="center", fontsize=value_points,
                          color="white" if value > 0.5 else "black")  # readable on dark cells
    text, points = _wrapped_title(title or "confusion matrix", width)
    figure.suptitle(text, fontsize=points)
    return figure


def save_confusion_png(matrix: torch.Tensor, classnames: Sequence[str], path: str | Path,
                       title: str = "") -> Path:
    """Draw :func:`confusion_figure` to ``path`` (a PNG) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confusion_figure(matrix, classnames, title).savefig(path)
    return path
