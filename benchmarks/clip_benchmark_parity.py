"""clipkit's evaluation against CLIP_benchmark's own, on the same model and the same files.

    python benchmarks/clip_benchmark_parity.py                       # the quickstart's checkpoint
    python benchmarks/clip_benchmark_parity.py --checkpoint CKPT --json parity.json

Two datasets are written with CLIP_benchmark's own webdataset builder (``convert_dataset`` and
``convert_retrieval_dataset``: ``ROOT/test/0.tar ...``, ``classnames.txt`` and ``{c}`` templates
one folder up, captions one per line): the toy world's held-out split (zero-shot classification
over its classes; retrieval with each image's caption and two more from its class, so that captions
repeat and scores tie), and crops of scikit-image's real sample photographs at odd sizes and aspect
ratios (13 to 1000 pixels a side, aspect ratios 1:15 to 7:1), labelled by photograph, with two
captions each. The checkpoint is exported to open_clip; CLIP_benchmark's ``evaluate`` functions
(amp off, CPU) run on the export with open_clip's preprocessing and tokenizer, over its own
webdataset reader, and ``clipkit eval`` runs on the checkpoint over the same folders. The script
prints both sets of metrics and the largest image-embedding difference between the two paths.
Figures are printed, never asserted (tests/test_clip_benchmark_parity.py asserts them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset
from PIL import Image
from skimage import data as skimage_data
from torch.utils.data import DataLoader

from clipkit.data.captions import parse_captions
from clipkit.eval.benchmark import evaluate_retrieval, evaluate_zeroshot
from clipkit.eval.encoders import load_encoder
from clipkit.interop.openclip_export import export_to_open_clip

DEFAULT_CHECKPOINT = "runs/toy-image-text/checkpoints/final.pt"
DEFAULT_TOY = Path.home() / ".cache" / "clipkit" / "toy-image-text-64px"
# scikit-image's sample photographs (all in its wheel) and the class name each crop gets.
PHOTOS = {"astronaut": "astronaut", "chelsea": "cat", "coffee": "cup of coffee", "rocket": "rocket",
          "hubble_deep_field": "galaxy", "camera": "photographer", "coins": "coin", "colorwheel": "colour wheel",
          "immunohistochemistry": "tissue", "retina": "retina"}
CROPS_PER_PHOTO = 8
PHOTO_TEMPLATES = ["a photo of a {c}.", "a picture of a {c}."]
RECALL_KS = (1, 5, 10)


class LabelledFiles(list):
    """(image bytes, label or captions) pairs, with the attributes CLIP_benchmark's builder reads."""

    def __init__(self, items: list, classes: list[str] | None = None, templates: list[str] | None = None) -> None:
        super().__init__(items)
        self.classes = classes
        self.templates = templates


def toy_items(toy: Path, limit: int) -> tuple[list[tuple[bytes, int, list[str]]], list[str], list[str]]:
    """(jpg bytes, class index, captions) of the toy held-out split, its class names and templates."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(toy.glob("eval-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    classnames = (toy / "classnames.txt").read_text().splitlines()
    templates = (toy / "zeroshot_classification_templates.txt").read_text().splitlines()
    items = [(s["jpg"], int(s["cls"]), parse_captions(s["txt"].decode())) for _, s in sorted(samples.items())][:limit]
    # Two more captions per image, shared by every image of its class: repeated captions, tied scores.
    items = [(jpg, label, [*captions, f"a {classnames[label]}", f"an image of a {classnames[label]}"])
             for jpg, label, captions in items]
    return items, classnames, [t.replace("{}", "{c}") for t in templates]


def photo_items(seed: int = 0) -> tuple[list[tuple[bytes, int, list[str]]], list[str]]:
    """Crops of the sample photos at random sizes and aspect ratios, as JPEG (or PNG), with captions."""
    rng = random.Random(seed)
    items = []
    for label, (name, classname) in enumerate(PHOTOS.items()):
        image = Image.fromarray(getattr(skimage_data, name)())
        for index in range(CROPS_PER_PHOTO):
            width = rng.randint(13, image.width)
            height = max(13, min(image.height, round(width * 2 ** rng.uniform(-3, 3))))
            left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
            crop = image.crop((left, top, left + width, top + height))
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG" if index % 2 == 0 else "PNG", quality=90)
            items.append((buffer.getvalue(), label, [f"a photo of a {classname}", f"a {width}x{height} crop of a {classname}"]))
    return items, list(PHOTOS.values())


def write_clip_benchmark_sets(root: Path, items: list[tuple[bytes, int, list[str]]], classnames: list[str],
                              templates: list[str]) -> tuple[Path, Path]:
    """The classification and retrieval folders, written by CLIP_benchmark's own builder."""
    classification, retrieval = root / "classification", root / "retrieval"
    labelled = LabelledFiles([(image, label) for image, label, _ in items], classnames, templates)
    captioned = LabelledFiles([(image, captions) for image, _, captions in items])
    # Images pass as bytes (transform None); the builder names members by image_format, and Pillow
    # decodes by content, so JPEG and PNG bytes both read back.
    convert_dataset(labelled, "test", str(classification), image_format="jpg", max_count=40, verbose=False)
    convert_retrieval_dataset(captioned, "test", str(retrieval), image_format="jpg", max_count=40, verbose=False)
    return classification, retrieval


def numpy2_accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy()`` with one change: it calls ``float()`` on a 1-element
    array, which numpy 2 refuses; the ranking and counting are its own."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_metrics(folder: Path, model: torch.nn.Module, preprocess: Any, tokenizer: Any,
                           task: str) -> dict[str, float]:
    """CLIP_benchmark's own evaluation of an open_clip model on a folder its builder wrote."""
    zeroshot_classification.accuracy = numpy2_accuracy
    dataset = build_wds_dataset("parity", transform=preprocess, split="test", data_dir=str(folder))
    if task == "classification":
        loader = DataLoader(dataset, batch_size=32)
        return zeroshot_classification.evaluate(model, loader, tokenizer, dataset.classes, dataset.templates,
                                                device="cpu", amp=False)
    loader = DataLoader(dataset, batch_size=32, collate_fn=image_captions_collate_fn)
    return zeroshot_retrieval.evaluate(model, loader, tokenizer, device="cpu", amp=False,
                                       recall_k_list=list(RECALL_KS))


def clipkit_metrics(folder: Path, encoder: Any, task: str) -> tuple[dict[str, float], dict[str, Any]]:
    if task == "classification":
        report = evaluate_zeroshot(encoder, str(folder), batch_size=32)
        metrics = {k: report.metrics[k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    else:
        report = evaluate_retrieval(encoder, str(folder), batch_size=32)
        metrics = dict(report.metrics)
    return metrics, {"samples": report.num_samples, **{k: v for k, v in report.details.items() if k == "texts"}}


def embedding_gap(items: list[tuple[bytes, int, list[str]]], encoder: Any, model: torch.nn.Module,
                  preprocess: Any) -> float:
    """The largest difference between clipkit's image embeddings and open_clip's own of the same files."""
    decoder = encoder.eval_decoder("image")
    ours = torch.stack([decoder.decode(image, random.Random(0)) for image, _, _ in items])
    theirs = torch.stack([preprocess(Image.open(io.BytesIO(image))) for image, _, _ in items])
    with torch.no_grad():
        gap = (encoder.encode("image", ours) - model.encode_image(theirs, normalize=True)).abs().max()
    return float(gap)


@contextlib.contextmanager
def quiet():
    """CLIP_benchmark's builder and evaluation print progress bars and shard names: hidden here."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def run(checkpoint: Path, toy: Path, num_toy: int, workdir: Path) -> dict[str, Any]:
    encoder = load_encoder(str(checkpoint))
    export = export_to_open_clip(checkpoint, workdir / "open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    toy_data, toy_classes, toy_templates = toy_items(toy, num_toy)
    photo_data, photo_classes = photo_items()
    results: dict[str, Any] = {}
    for name, (items, classes, templates) in {"toy": (toy_data, toy_classes, toy_templates),
                                              "photos": (photo_data, photo_classes, PHOTO_TEMPLATES)}.items():
        with quiet():
            written = write_clip_benchmark_sets(workdir / name, items, classes, templates)
        folders = dict(zip(("classification", "retrieval"), written))
        results[name] = {"embedding_max_abs_diff": embedding_gap(items, encoder, model, preprocess)}
        for task, folder in folders.items():
            ours, counts = clipkit_metrics(folder, encoder, task)
            with quiet():
                theirs = clip_benchmark_metrics(folder, model, preprocess, tokenizer, task)
            results[name][task] = {"counts": counts,
                                   "metrics": {metric: [ours[metric], theirs[metric]] for metric in ours}}
    return results


def print_results(results: dict[str, Any], checkpoint: Path) -> None:
    print(f"clipkit eval on {checkpoint} against CLIP_benchmark 1.6.2 on its open_clip export "
          "(same CLIP_benchmark-written folders, CPU, fp32)")
    print(f"{'dataset':<8} {'task':<15} {'metric':<28} {'clipkit':>10} {'CLIP_benchmark':>15} {'|diff|':>9}")
    for name, tasks in results.items():
        for task in ("classification", "retrieval"):
            counts = ", ".join(f"{k} {v}" for k, v in tasks[task]["counts"].items())
            for metric, (ours, theirs) in tasks[task]["metrics"].items():
                print(f"{name:<8} {task:<15} {metric:<28} {ours:>10.4%} {theirs:>15.4%} {abs(ours - theirs):>9.1e}")
            print(f"{'':<8} {'':<15} ({counts})")
        print(f"{name}: largest image-embedding difference, clipkit vs open_clip's own preprocessing and model: "
              f"{tasks['embedding_max_abs_diff']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a clipkit image-text checkpoint")
    parser.add_argument("--toy", default=str(DEFAULT_TOY),
                        help="a toy image-text folder with eval-*.tar (the quickstart's cache by default)")
    parser.add_argument("--num-toy", type=int, default=600, help="held-out toy samples to use")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    checkpoint, toy = Path(args.checkpoint), Path(args.toy)
    for path, how in ((checkpoint, "run `clipkit quickstart` first, or pass --checkpoint"),
                      (toy, "run `clipkit quickstart` first, or pass --toy")):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: {how}")
    with tempfile.TemporaryDirectory() as workdir:
        results = run(checkpoint, toy, args.num_toy, Path(workdir))
    print_results(results, checkpoint)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    np.set_printoptions(precision=4)
    main()
