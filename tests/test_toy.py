"""The toy generator: deterministic, readable by tarfile and webdataset, captions that match pixels."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from clipkit.data.toy import COLOURS, SHAPES, class_names, make_toy_image_text
from clipkit.data.writer import ShardWriter


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_same_parameters_give_byte_identical_shards(tmp_path: Path) -> None:
    a = make_toy_image_text(tmp_path / "a", num_train=40, num_eval=12, image_size=32, samples_per_shard=16)
    b = make_toy_image_text(tmp_path / "b", num_train=40, num_eval=12, image_size=32, samples_per_shard=16)
    assert [p.name for p in a.train_shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for path_a, path_b in zip(a.train_shards + a.eval_shards, b.train_shards + b.eval_shards):
        assert path_a.read_bytes() == path_b.read_bytes()


def test_samples_do_not_depend_on_sharding(tmp_path: Path) -> None:
    small = make_toy_image_text(tmp_path / "a", num_train=20, num_eval=0, image_size=32, samples_per_shard=5)
    large = make_toy_image_text(tmp_path / "b", num_train=20, num_eval=0, image_size=32, samples_per_shard=20)
    members = {}
    for path in small.train_shards:
        members.update(tar_members(path))
    assert members == tar_members(large.train_shards[0])


def test_another_seed_gives_other_samples(tmp_path: Path) -> None:
    a = make_toy_image_text(tmp_path / "a", num_train=8, num_eval=0, image_size=32, seed=0)
    b = make_toy_image_text(tmp_path / "b", num_train=8, num_eval=0, image_size=32, seed=1)
    assert a.train_shards[0].read_bytes() != b.train_shards[0].read_bytes()


def test_layout_is_img2dataset_and_plain_tarfile_reads_it(toy_shards) -> None:
    members = tar_members(toy_shards.eval_shards[0])
    keys = sorted({name.split(".", 1)[0] for name in members})
    assert len(keys) == 64
    for key in keys:
        assert {f"{key}.{ext}" for ext in ("jpg", "txt", "json", "cls")} <= set(members)
        meta = json.loads(members[f"{key}.json"])
        caption = members[f"{key}.txt"].decode()
        assert meta["caption"] == caption and meta["key"] == key
        assert meta["colour"] in caption and meta["shape"] in caption
        assert meta["class_name"] == f"{meta['colour']} {meta['shape']}"
        assert class_names()[meta["label"]] == meta["class_name"]
        assert int(members[f"{key}.cls"]) == meta["label"]
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32) and image.mode == "RGB"


def test_training_split_has_no_labels(toy_shards) -> None:
    names = tar_members(toy_shards.train_shards[0])
    assert not any(name.endswith(".cls") for name in names)
    assert all("label" not in json.loads(data) for name, data in names.items() if name.endswith(".json"))


def test_webdataset_reads_every_sample(toy_shards) -> None:
    dataset = wds.WebDataset([str(p) for p in toy_shards.train_shards], shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == 320
    assert len({s["__key__"] for s in samples}) == 320
    assert all(isinstance(s["jpg"], Image.Image) and s["txt"] for s in samples)
    sizes = json.loads((toy_shards.root / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("train-")) == 320


def test_classes_and_templates_are_written_for_zero_shot(toy_shards) -> None:
    assert len(toy_shards.classnames) == len(COLOURS) * len(SHAPES) >= 20
    assert (toy_shards.root / "classnames.txt").read_text().splitlines() == toy_shards.classnames
    templates = (toy_shards.root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == toy_shards.templates and all("{}" in t for t in templates)
    assert toy_shards.shard_pattern("train").endswith("train-{000000..000004}.tar")


def test_captions_vary_and_all_classes_occur(tmp_path: Path) -> None:
    toy = make_toy_image_text(tmp_path, num_train=0, num_eval=600, image_size=32, samples_per_shard=600)
    members = tar_members(toy.eval_shards[0])
    metas = [json.loads(data) for name, data in members.items() if name.endswith(".json")]
    assert {m["class_name"] for m in metas} == set(class_names())
    assert {m["texture"] for m in metas} == {"plain", "stripes", "checkerboard", "noise", "gradient"}
    assert len({m["caption"] for m in metas}) > 300


def test_shape_is_drawn_in_its_colour_at_its_position(tmp_path: Path) -> None:
    """The pixels agree with the caption: the named colour dominates the named grid cell."""
    toy = make_toy_image_text(tmp_path, num_train=0, num_eval=200, image_size=64, samples_per_shard=200)
    members = tar_members(toy.eval_shards[0])
    checked = 0
    for name, data in members.items():
        meta = json.loads(data) if name.endswith(".json") else None
        if meta is None or meta["size"] != "large":
            continue
        pixels = np.asarray(Image.open(io.BytesIO(members[f"{meta['key']}.jpg"])), np.float32)
        colour = np.array(COLOURS[meta["colour"]], np.float32)
        close = np.linalg.norm(pixels - colour, axis=-1) < 60
        ys, xs = np.nonzero(close)
        assert close.mean() > 0.08, meta
        column = {"left": 0, "right": 2}.get(meta["position"].split()[-1], 1)
        row = {"top": 0, "bottom": 2}.get(meta["position"].split()[0], 1)
        assert abs(xs.mean() / 64 * 3 - 0.5 - column) < 0.75, meta
        assert abs(ys.mean() / 64 * 3 - 0.5 - row) < 0.75, meta
        checked += 1
    assert checked > 30


def test_cached_dataset_is_reused_and_changed_parameters_regenerate(tmp_path: Path) -> None:
    first = make_toy_image_text(tmp_path, num_train=16, num_eval=8, image_size=32, samples_per_shard=8)
    mtimes = {p: p.stat().st_mtime_ns for p in first.train_shards}
    again = make_toy_image_text(tmp_path, num_train=16, num_eval=8, image_size=32, samples_per_shard=8)
    assert {p: p.stat().st_mtime_ns for p in again.train_shards} == mtimes

    first.train_shards[1].unlink()  # a damaged cache is rebuilt, not trusted
    rebuilt = make_toy_image_text(tmp_path, num_train=16, num_eval=8, image_size=32, samples_per_shard=8)
    assert all(p.is_file() for p in rebuilt.train_shards)

    fewer = make_toy_image_text(tmp_path, num_train=8, num_eval=8, image_size=32, samples_per_shard=8)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"eval-000000.tar": 8, "train-000000.tar": 8}
    assert len(fewer.train_shards) == 1


def test_shard_writer_rejects_bad_keys_and_extensions(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "x", 4) as writer:
        for key in ("", "a.b", "a/b"):
            with pytest.raises(ValueError, match="sample key"):
                writer.write(key, {"txt": b"x"})
        with pytest.raises(ValueError, match="bad extension"):
            writer.write("k", {"t xt": b"x"})
        with pytest.raises(ValueError, match="no files"):
            writer.write("k", {})


def test_shard_writer_discards_the_open_shard_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "x", 2) as writer:
            for i in range(3):
                writer.write(f"k{i}", {"txt": b"x"})
            raise RuntimeError("generator crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.json", "x-000000.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"x-000000.tar": 2}
