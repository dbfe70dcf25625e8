"""`clipkit eval zeroshot` / `eval retrieval` on real toy shards, a class-folder tree and CSVs, with a
real checkpoint."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.config import ExperimentConfig
from clipkit.data.pipeline import CLASS_LABEL_FIELD
from clipkit.eval.benchmark import evaluate_retrieval, evaluate_zeroshot
from clipkit.eval.classifier_cache import ClassifierCache
from clipkit.eval.embed import embed_shards, embed_texts
from clipkit.eval.encoders import load_encoder
from clipkit.eval.metrics import image_text_retrieval
from clipkit.eval.zeroshot import build_zeroshot_classifier, zeroshot_accuracy
from clipkit.model import create_model
from clipkit.train.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ExperimentConfig(model=tiny_model_config())
    # Seeded: the class-name matching test compares two classifiers whose near-tied random scores
    # could otherwise tip either way, depending on what earlier test modules drew from the generator.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_model(config.model).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model, config)


def shard_members(shards) -> list[dict[str, bytes]]:
    """Every sample of the toy shards as {extension: bytes}, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(f"{shard}/{key}", {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


@pytest.fixture(scope="module")
def folder_dataset(toy_shards, tmp_path_factory) -> Path:
    """The toy held-out split as an ImageFolder tree (sub-folder = class name with underscores) plus a
    CSV of path,label over the same files, and one corrupt JPEG in each."""
    root = tmp_path_factory.mktemp("folder")
    rows = []
    for i, sample in enumerate(shard_members(toy_shards.eval_shards)):
        name = toy_shards.classnames[int(sample["cls"])]
        relative = Path("images") / name.replace(" ", "_") / f"{i:05d}.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(sample["jpg"])
        rows.append({"filepath": str(relative), "label": name})
    (root / "images" / "red_circle" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows.append({"filepath": "images/red_circle/broken.jpg", "label": "red circle"})
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["filepath", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_zeroshot_report_matches_the_library_calls(toy_shards, checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    report = evaluate_zeroshot(encoder, toy_shards.shard_pattern("eval"), cache=ClassifierCache(tmp_path))
    assert (report.num_samples, report.details["classes"], report.details["templates"]) == (96, 24, 5)
    assert report.model == str(checkpoint) and report.num_skipped == 0
    features, fields = embed_shards(encoder, "image", [str(p) for p in toy_shards.eval_shards],
                                    extra_fields=[CLASS_LABEL_FIELD])
    expected = zeroshot_accuracy(features, fields["label"],
                                 build_zeroshot_classifier(encoder, toy_shards.classnames, toy_shards.templates))
    assert report.metrics["acc1"] == pytest.approx(expected.top1)
    assert report.metrics["acc5"] == pytest.approx(expected.top5)
    assert report.metrics["mean_per_class_recall"] == pytest.approx(expected.mean_per_class_recall)
    assert list(report.metrics["per_class_recall"]) == toy_shards.classnames


def test_folder_and_csv_datasets_give_the_shard_figures(toy_shards, checkpoint, folder_dataset, tmp_path):
    encoder = load_encoder(str(checkpoint))
    from_shards = evaluate_zeroshot(encoder, toy_shards.shard_pattern("eval"), templates="photo")
    from_folder = evaluate_zeroshot(encoder, str(folder_dataset / "images"), templates="photo",
                                    confusion_png=tmp_path / "cm.png")
    from_csv = evaluate_zeroshot(encoder, str(folder_dataset / "labels.csv"), templates="photo",
                                 classnames_file=toy_shards.root / "classnames.txt")
    for report in (from_folder, from_csv):
        assert (report.num_samples, report.num_skipped) == (96, 1)  # the corrupt JPEG is counted
        for name in ("acc1", "acc5", "mean_per_class_recall"):
            assert report.metrics[name] == pytest.approx(from_shards.metrics[name])
    # Folder class names are the sorted folder names, so per-class recall is keyed differently but equal.
    assert sorted(from_folder.metrics["per_class_recall"].values()) == \
        pytest.approx(sorted(from_shards.metrics["per_class_recall"].values()))
    with Image.open(tmp_path / "cm.png") as png:
        assert png.width > 24 * 4 and png.height > 24 * 4


def test_classifier_cache_reuses_and_separates(checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    cache = ClassifierCache(tmp_path)
    names, templates = ["red circle", "blue square"], ["a {}.", "a photo of a {}."]
    first = build_zeroshot_classifier(encoder, names, templates, cache=cache)
    assert first.shape == (32, 2) and len(list(tmp_path.glob("*.pt"))) == 1
    again = build_zeroshot_classifier(encoder, names, templates, cache=cache)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and again.equal(first)
    build_zeroshot_classifier(encoder, names, templates[:1], cache=cache)
    with torch.no_grad():
        next(encoder.parameters()).add_(1.0)  # other weights must not reuse the classifier
    build_zeroshot_classifier(encoder, names, templates, cache=cache)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def write_retrieval_csv(root: Path, toy_shards) -> Path:
    """Images with two or three captions each: extra rows for some, a JSON list cell for others."""
    rows = []
    for i, sample in enumerate(shard_members(toy_shards.eval_shards)[:40]):
        path = Path("img") / f"{i:03d}.jpg"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(sample["jpg"])
        caption = sample["txt"].decode()
        name = toy_shards.classnames[int(sample["cls"])]
        if i % 2:
            rows += [{"path": str(path), "caption": caption}, {"path": str(path), "caption": f"a {name}"}]
        else:
            rows.append({"path": str(path), "caption": json.dumps([caption, f"the {name}", f"one {name}"])})
    out = root / "captions.csv"
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def test_retrieval_counts_several_captions_per_image(toy_shards, checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    report = evaluate_retrieval(encoder, str(write_retrieval_csv(tmp_path, toy_shards)))
    assert report.num_samples == 40 and report.details["texts"] == 20 * 3 + 20 * 2
    assert set(report.metrics) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    # The same numbers straight from the metric on independently computed embeddings.
    decoder = encoder.eval_decoder("image")
    pixels = torch.stack([decoder.decode((tmp_path / "img" / f"{i:03d}.jpg").read_bytes(), None) for i in range(40)])
    with open(tmp_path / "captions.csv") as f:
        captions: dict[str, list[str]] = {}
        for row in csv.DictReader(f):
            cell = row["caption"]
            captions.setdefault(row["path"], []).extend(json.loads(cell) if cell.startswith("[") else [cell])
    texts = [t for item in captions.values() for t in item]
    owner = torch.tensor([i for i, item in enumerate(captions.values()) for _ in item])
    with torch.no_grad():
        expected = image_text_retrieval(encoder.encode("image", pixels), embed_texts(encoder, texts), owner)
    assert report.metrics == pytest.approx(expected)


def write_caption_list_shard(path: Path, toy_shards) -> None:
    """A webdataset shard whose txt members hold JSON lists of captions."""
    with tarfile.open(path, "w") as tar:
        for i, sample in enumerate(shard_members(toy_shards.eval_shards)[:30]):
            name = toy_shards.classnames[int(sample["cls"])]
            for ext, data in (("jpg", sample["jpg"]), ("txt", json.dumps([sample["txt"].decode(), name]).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cli_zeroshot_and_retrieval(toy_shards, checkpoint, folder_dataset, tmp_path):
    out = tmp_path / "results" / "zeroshot.json"
    base = [sys.executable, "-m", "clipkit", "eval"]
    model = ["--model", str(checkpoint), "--no-progress"]
    command = [*base, "zeroshot", *model, "--dataset", str(folder_dataset / "images"), "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "CLIPKIT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cache" / "zeroshot-classifiers").glob("*.pt"))) == 1
    assert "zeroshot_classification of 96 image samples (classes 24, templates 16; 1 skipped)" in done.stdout
    assert "acc1" in done.stdout and "mean_per_class_recall" in done.stdout
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_classification" and result["num_samples"] == 96
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall", "per_class_recall"}

    write_caption_list_shard(tmp_path / "captions-000000.tar", toy_shards)
    retrieval = subprocess.run([*base, "retrieval", *model, "--dataset", str(tmp_path / "captions-000000.tar"),
                                "--output", str(tmp_path / "retrieval.json")],
                               capture_output=True, text=True, timeout=300, cwd=REPO)
    assert retrieval.returncode == 0, retrieval.stderr
    assert "zeroshot_retrieval of 30 image samples (texts 60; 0 skipped)" in retrieval.stdout
    assert json.loads((tmp_path / "retrieval.json").read_text())["metrics"]["text_retrieval_recall@10"] > 0

    too_few = tmp_path / "three.txt"
    too_few.write_text("red circle\nred square\nred star\n")
    shards = [*base, "zeroshot", *model, "--no-cache", "--dataset", toy_shards.shard_pattern("eval")]
    bad = subprocess.run([*shards, "--classnames", str(too_few)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "only 3 class names" in bad.stderr
    missing = subprocess.run([*shards, "--templates", str(tmp_path / "none.txt")], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
    assert missing.returncode == 1 and "neither a file nor a built-in set" in missing.stderr
    wrong_column = subprocess.run([*base, "zeroshot", *model, "--no-cache", "--dataset", str(folder_dataset / "labels.csv"),
                                   "--label-col", "klass"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert wrong_column.returncode == 2 and "has no klass column" in wrong_column.stderr


def test_class_folders_are_matched_to_given_class_names_by_name(toy_shards, checkpoint, folder_dataset, tmp_path):
    encoder = load_encoder(str(checkpoint))
    plain = evaluate_zeroshot(encoder, str(folder_dataset / "images"), templates="photo")
    # The same names in another order, other case, with spaces: matched by name, not by position.
    shuffled = sorted(toy_shards.classnames, key=lambda name: name[::-1])
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{name.upper()}\n" for name in shuffled) + "purple hexagon\n")
    matched = evaluate_zeroshot(encoder, str(folder_dataset / "images"), templates="photo", classnames_file=names)
    assert matched.details["classes"] == 25  # a name without a folder stays a class of the classifier
    per_class = {name.lower(): recall for name, recall in matched.metrics["per_class_recall"].items()}
    for name, recall in plain.metrics["per_class_recall"].items():
        assert per_class[name] == pytest.approx(recall)
    # A folder → class name mapping, for folders named by ids.
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({name.replace(" ", "_"): f"a {name}" for name in toy_shards.classnames}))
    mapped = evaluate_zeroshot(encoder, str(folder_dataset / "images"), templates="photo", classnames_file=mapping)
    assert list(mapped.metrics["per_class_recall"]) == [f"a {name}" for name in sorted(toy_shards.classnames)]
    # Names that do not match every folder stop the run, naming the folders.
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(toy_shards.classnames[:20]))
    done = subprocess.run([sys.executable, "-m", "clipkit", "eval", "zeroshot", "--model", str(checkpoint),
                           "--no-progress", "--no-cache", "--dataset", str(folder_dataset / "images"),
                           "--classnames", str(partial)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "4 of the 24 class folders match no class name" in done.stderr
    assert "Traceback" not in done.stderr


def clip_benchmark_layout(root: Path, toy_shards, retrieval: bool) -> Path:
    """A CLIP_benchmark dataset folder as its builder writes it: ROOT/test/0.tar ... and nshards.txt,
    classnames.txt and {c} templates (or dataset_type.txt 'retrieval') in ROOT, captions one per line."""
    samples = shard_members(toy_shards.eval_shards)
    (root / "test").mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for i, sample in enumerate(samples[shard * 48:(shard + 1) * 48]):
                name = toy_shards.classnames[int(sample["cls"])]
                second = ("txt", f"{sample['txt'].decode()}\na {name}\nan image of a {name}".encode())
                for ext, data in (("webp", sample["jpg"]), second if retrieval else ("cls", sample["cls"])):
                    info = tarfile.TarInfo(f"s{shard * 48 + i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("2\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    else:
        (root / "classnames.txt").write_text("\n".join(toy_shards.classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    return root


def test_clip_benchmark_folders_read_as_they_are(toy_shards, checkpoint, tmp_path):
    encoder = load_encoder(str(checkpoint))
    classification = clip_benchmark_layout(tmp_path / "cls", toy_shards, retrieval=False)
    expected = evaluate_zeroshot(encoder, toy_shards.shard_pattern("eval"),
                                 templates=str(tmp_path / "cls" / "zeroshot_classification_templates.txt"))
    for spec in (str(classification), str(classification / "test"), str(classification / "test" / "{0..1}.tar")):
        report = evaluate_zeroshot(encoder, spec)
        assert (report.num_samples, report.details["classes"], report.details["templates"]) == (96, 24, 2)
        assert report.metrics["acc1"] == pytest.approx(expected.metrics["acc1"])
    with pytest.raises(Exception, match="none in 'train': pass --split"):
        evaluate_zeroshot(encoder, str(classification), split="train")
    retrieval = clip_benchmark_layout(tmp_path / "ret", toy_shards, retrieval=True)
    report = evaluate_retrieval(encoder, str(retrieval))
    assert (report.num_samples, report.details["texts"]) == (96, 288)  # three captions per image, one per line
    with pytest.raises(Exception, match="is a retrieval dataset .*`clipkit eval retrieval`"):
        evaluate_zeroshot(encoder, str(retrieval))


def test_shards_without_class_labels_say_so_once(toy_shards, checkpoint, tmp_path):
    shard = tmp_path / "nolabels-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, sample in enumerate(shard_members(toy_shards.eval_shards)[:20]):
            for ext in ("jpg", "txt"):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    (tmp_path / "classnames.txt").write_text("\n".join(toy_shards.classnames))
    done = subprocess.run([sys.executable, "-m", "clipkit", "eval", "zeroshot", "--model", str(checkpoint),
                           "--no-progress", "--no-cache", "--dataset", str(shard)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "have no cls member" in done.stderr and "make-shards --label-col" in done.stderr
    assert done.stderr.count("WARNING") == 0
