"""Confusion matrices of zero-shot predictions, and a PNG rendering of one (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

MAX_LABELLED_CLASSES = 60  # above this the class names would overlap: draw the cells only


def confusion_matrix(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """scores (N, C), true labels (N,) → counts (C, C): row = true class, column = top-1 prediction."""
    num_classes = scores.shape[1]
    predictions = scores.argmax(dim=1)
    flat = labels.long() * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _cell_colour(fraction: float) -> tuple[int, int, int]:
    """White (0) → dark blue (1)."""
    return (round(255 - 227 * fraction), round(255 - 200 * fraction), round(255 - 100 * fraction))


def save_confusion_png(matrix: torch.Tensor, classnames: Sequence[str], path: str | Path,
                       title: str = "") -> Path:
    """Draw the row-normalised matrix (each row sums to 1: recall per true class) with class names."""
    num_classes = matrix.shape[0]
    rows = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    font = ImageFont.load_default()
    labelled = num_classes <= MAX_LABELLED_CLASSES
    cell = max(4, min(28, 900 // num_classes))
    margin = 8 + (max(len(name) for name in classnames) * 6 if labelled else 0)
    top = 24 + margin
    size = (margin + num_classes * cell + 10, top + num_classes * cell + 10)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title or "confusion matrix (rows: true class, columns: predicted)", fill="black", font=font)
    for i in range(num_classes):
        for j in range(num_classes):
            x, y = margin + j * cell, top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_cell_colour(float(rows[i, j])))
    if labelled:
        for i, name in enumerate(classnames):
            draw.text((4, top + i * cell + (cell - 10) // 2), name, fill="black", font=font)
        # Column names, written horizontally then rotated, along the top edge.
        strip = Image.new("RGB", (margin, num_classes * cell), "white")
        strip_draw = ImageDraw.Draw(strip)
        for j, name in enumerate(classnames):
            strip_draw.text((4, j * cell + (cell - 10) // 2), name, fill="black", font=font)
        image.paste(strip.rotate(90, expand=True), (margin, 24))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
