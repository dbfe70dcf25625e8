"""The zero-shot confusion matrix and its matplotlib rendering."""

from __future__ import annotations

import torch
from PIL import Image

from clipkit.eval.confusion import confusion_figure, confusion_matrix, save_confusion_png


def test_confusion_matrix_counts_top1_predictions():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.0, 0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 2])
    assert confusion_matrix(scores, labels).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_three_classes_png_has_values_names_and_colour_bar(tmp_path):
    matrix = torch.tensor([[8, 2, 0], [1, 9, 0], [0, 5, 5]])
    names = ["cat", "dog", "bird"]
    path = save_confusion_png(matrix, names, tmp_path / "out" / "cm.png", title="toy on eval: top-1 73.3%")
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 400 and image.height >= 400
    figure = confusion_figure(matrix, names)
    matrix_axes, colour_bar = figure.axes
    assert [text.get_text() for text in matrix_axes.texts] == ["0.80", "0.20", "0", "0.10", "0.90", "0",
                                                               "0", "0.50", "0.50"]  # rows sum to 1
    assert [label.get_text() for label in matrix_axes.get_xticklabels()] == names
    assert [label.get_text() for label in matrix_axes.get_yticklabels()] == names
    assert (matrix_axes.get_xlabel(), matrix_axes.get_ylabel()) == ("predicted class", "true class")


def test_long_title_and_100_classes_stay_on_the_figure(tmp_path):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randint(0, 5, (100, 100), generator=generator) + 20 * torch.eye(100, dtype=torch.long)
    names = [f"a rather long class name {i}" for i in range(100)]
    title = "open_clip:ViT-B-32 on " + "/data/" + "very-long-folder-name/" * 40 + "test: top-1 41.0%"
    figure = confusion_figure(matrix, names, title)
    figure.savefig(tmp_path / "cm.png")  # what save_confusion_png does; the figure is kept for its layout
    box, page = figure.texts[0].get_window_extent(), figure.bbox
    assert box.x0 >= page.x0 and box.x1 <= page.x1 and box.y1 <= page.y1
    assert "\n" in figure.texts[0].get_text()  # wrapped, not shrunk to nothing
    assert not figure.axes[0].texts  # too many cells to write the values in
    assert len(figure.axes[0].get_xticklabels()) == 100
    with Image.open(tmp_path / "cm.png") as image:
        assert image.width >= 1000 and image.height >= 1000
