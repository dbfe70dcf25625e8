"""make-shards on real files: folder / CSV / TSV / JSONL inputs, bad samples, determinism, the CLI;
and img2dataset's own shard layout read as it is."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.data.make_shards import MakeShardsError, make_shards
from clipkit.data.pipeline import METADATA_FIELD, ShardStream, build_loader
from clipkit.data.shards import count_samples
from clipkit.modalities import get_modality
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parent.parent


def save_image(path: Path, colour: tuple[int, int, int], image_format: str, size: int = 24) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format=image_format)
    return path.read_bytes()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_members(out: Path, prefix: str = "train") -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for shard in sorted(out.glob(f"{prefix}-*.tar")):
        members.update(tar_members(shard))
    return members


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """8 images in sorted order: 4 good ones (jpg, jpeg, png, webp) and 4 bad ones, one of each kind."""
    root = tmp_path / "images"
    save_image(root / "a" / "01.jpg", (255, 0, 0), "JPEG")
    (root / "a" / "01.txt").write_text("a red square\n")
    (root / "a" / "01.json").write_text(json.dumps({"licence": "cc0", "width": 24}))
    save_image(root / "a" / "02.jpeg", (0, 255, 0), "JPEG")
    (root / "a" / "02.txt").write_text("a green square")
    save_image(root / "b" / "04.png", (0, 0, 255), "PNG")  # no caption file
    (root / "b" / "03.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt
    (root / "b" / "03.txt").write_text("broken")
    save_image(root / "c" / "05.png", (0, 0, 255), "PNG")
    (root / "c" / "05.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))  # not UTF-8
    save_image(root / "c" / "06.png", (0, 0, 255), "PNG")
    (root / "c" / "06.txt").write_text("   \n")  # empty
    save_image(root / "d" / "07.png", (255, 255, 0), "PNG")
    (root / "d" / "07.txt").write_text("a yellow square")
    save_image(root / "d" / "08.webp", (0, 255, 255), "WEBP")
    (root / "d" / "08.txt").write_text("un carré cyan")
    (root / "d" / "notes.txt").write_text("a caption without an image is not a sample")
    return root


def test_folder_input_writes_original_bytes_captions_and_metadata(image_folder, tmp_path, caplog):
    out = tmp_path / "out"
    result = make_shards(image_folder, out, samples_per_shard=3, progress=False)

    assert (result.num_inputs, result.num_samples) == (8, 4)
    assert dict(result.skipped) == {"undecodable image": 1, "missing caption": 1, "caption not UTF-8": 1,
                                    "empty caption": 1}
    # Chunks of 3 inputs: [01 02 03] [04 05 06] [07 08]; the middle one is all bad, so the last is renumbered.
    assert [p.name for p in result.shards] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 2, "train-000001.tar": 2}

    members = all_members(out)
    assert sorted(members) == [f"00000000{k}.{ext}" for k, exts in
                               ((0, ("jpg", "json", "txt")), (1, ("jpg", "json", "txt")),
                                (6, ("json", "png", "txt")), (7, ("json", "txt", "webp")))
                               for ext in exts]
    assert members["000000000.jpg"] == (image_folder / "a" / "01.jpg").read_bytes()
    assert members["000000001.jpg"] == (image_folder / "a" / "02.jpeg").read_bytes()
    assert members["000000006.png"] == (image_folder / "d" / "07.png").read_bytes()
    assert members["000000007.webp"] == (image_folder / "d" / "08.webp").read_bytes()
    assert members["000000000.txt"] == b"a red square"
    assert members["000000007.txt"].decode() == "un carré cyan"
    assert json.loads(members["000000000.json"]) == {
        "key": "000000000", "caption": "a red square", "source": str(image_folder / "a" / "01.jpg"),
        "licence": "cc0", "width": 24,
    }
    assert json.loads(members["000000006.json"])["source"] == str(image_folder / "d" / "07.png")

    for name, reason in (("03.jpg", "undecodable image"), ("04.png", "missing caption"),
                         ("05.png", "caption not UTF-8"), ("06.png", "empty caption")):
        assert any(name in r.getMessage() and reason in r.getMessage() for r in caplog.records), name
    assert "skipped 4 of 8 input samples: 1 caption not UTF-8, 1 empty caption, 1 missing caption, " \
           "1 undecodable image" in result.summary()


def test_output_does_not_depend_on_the_number_of_workers(image_folder, tmp_path):
    # One input per chunk: 8 chunks over 2 processes finish out of order, and 4 of them are empty.
    one = make_shards(image_folder, tmp_path / "one", samples_per_shard=1, workers=1, progress=False)
    two = make_shards(image_folder, tmp_path / "two", samples_per_shard=1, workers=2, progress=False)
    assert [p.name for p in one.shards] == [p.name for p in two.shards] and len(one.shards) == 4
    for a, b in zip(one.shards, two.shards):
        assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "one" / "sizes.json").read_bytes() == (tmp_path / "two" / "sizes.json").read_bytes()


def test_rerun_replaces_earlier_shards_of_the_prefix_only(image_folder, tmp_path):
    out = tmp_path / "out"
    make_shards(image_folder, out, samples_per_shard=1, progress=False)
    make_shards(image_folder, out, prefix="eval", samples_per_shard=4, progress=False)
    make_shards(image_folder, out, samples_per_shard=4, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "eval-000000.tar", "eval-000001.tar", "sizes.json", "train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "eval-000000.tar": 2, "eval-000001.tar": 2, "train-000000.tar": 2, "train-000001.tar": 2}


def test_a_rerun_that_converts_nothing_keeps_the_earlier_shards(image_folder, tmp_path):
    out = tmp_path / "out"
    make_shards(image_folder, out, samples_per_shard=4, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad"
    for i in range(3):
        (bad / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (bad / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        (bad / f"{i}.txt").write_text("a caption")
    with pytest.raises(MakeShardsError, match=r"none of the 3 input samples could be converted \(3 undecodable "
                                              r"image\); the shards already in .* are left as they were"):
        make_shards(bad, out, samples_per_shard=4, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing deleted, nothing left over


def write_table(path: Path, rows: list[dict[str, str]], delimiter: str) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_table_input(tmp_path, suffix, delimiter, caplog):
    jpg = save_image(tmp_path / "data" / "img" / "red.jpg", (255, 0, 0), "JPEG")
    png = save_image(tmp_path / "elsewhere" / "blue.png", (0, 0, 255), "PNG")
    rows = [
        {"image": "img/red.jpg", "caption": "a red, square thing", "url": "http://x/red.jpg"},
        {"image": str(tmp_path / "elsewhere" / "blue.png"), "caption": "blue\tand tabbed", "url": "u2"},
        {"image": "img/gone.jpg", "caption": "no such file", "url": "u3"},
        {"image": "img/red.jpg", "caption": "", "url": "u4"},
        {"image": "", "caption": "no image path", "url": "u5"},
    ]
    table = tmp_path / "data" / f"pairs{suffix}"
    write_table(table, rows, delimiter)
    result = make_shards(table, tmp_path / "out", progress=False)

    assert dict(result.skipped) == {"missing image": 2, "empty caption": 1}
    members = tar_members(result.shards[0])
    assert sorted(members) == ["000000000.jpg", "000000000.json", "000000000.txt",
                               "000000001.json", "000000001.png", "000000001.txt"]
    assert members["000000000.jpg"] == jpg and members["000000001.png"] == png
    assert members["000000001.txt"] == b"blue\tand tabbed"
    assert json.loads(members["000000000.json"]) == {
        "key": "000000000", "caption": "a red, square thing", "source": "img/red.jpg", "url": "http://x/red.jpg"}
    assert "img/gone.jpg: missing image" in caplog.text
    assert f"pairs{suffix} row 5: missing image" in caplog.text


def test_jsonl_input_with_other_column_names(tmp_path):
    save_image(tmp_path / "cat.png", (10, 20, 30), "PNG")
    lines = [
        {"path": "cat.png", "text": "a cat", "tags": ["pet", "grey"], "score": 0.9},
        {"path": "cat.png", "score": 0.1},  # no caption
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    result = make_shards(jsonl, tmp_path / "out", image_col="path", caption_col="text", progress=False)
    assert dict(result.skipped) == {"missing caption": 1}
    meta = json.loads(tar_members(result.shards[0])["000000000.json"])
    assert meta == {"key": "000000000", "caption": "a cat", "source": "cat.png", "tags": ["pet", "grey"],
                    "score": 0.9}


def test_inputs_that_cannot_be_converted_raise_naming_the_problem(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("img,caption\nx.jpg,a cat\n")
    with pytest.raises(MakeShardsError, match=r"--image-col 'image' is not a column of .*pairs.csv \(columns: caption, img\)"):
        make_shards(table, tmp_path / "out", progress=False)
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "x.jpg", "caption": "a cat"}\n')
    with pytest.raises(MakeShardsError, match="--caption-col 'text' is not a column"):
        make_shards(jsonl, tmp_path / "out", caption_col="text", progress=False)
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("image\tcaption\nx.jpg\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(MakeShardsError, match="cannot read .*latin.tsv"):
        make_shards(latin, tmp_path / "out", progress=False)
    jsonl.write_text('{"image": "x.jpg", "caption": "a cat"}\nnot json\n')
    with pytest.raises(MakeShardsError, match="pairs.jsonl line 2 is not JSON"):
        make_shards(jsonl, tmp_path / "out", progress=False)
    with pytest.raises(MakeShardsError, match="does not exist"):
        make_shards(tmp_path / "nowhere.csv", tmp_path / "out", progress=False)
    with pytest.raises(MakeShardsError, match="neither a folder nor"):
        make_shards(table.rename(tmp_path / "pairs.xlsx"), tmp_path / "out", progress=False)


def image_text_fields():
    config = tiny_model_config()
    return [get_modality("image", config).field(False), get_modality("text", config).field(False), METADATA_FIELD]


def test_shard_stream_reads_converted_shards(image_folder, tmp_path):
    result = make_shards(image_folder, tmp_path / "out", samples_per_shard=3, progress=False)
    shards = [str(p) for p in result.shards]
    assert count_samples(shards) == 4
    batches = list(build_loader(ShardStream(shards, image_text_fields(), 8, train=False), 0))
    assert [m["caption"] for b in batches for m in b["metadata"]] == [
        "a red square", "a green square", "a yellow square", "un carré cyan"]
    assert batches[0]["image"].shape == (4, 3, 32, 32) and batches[0]["text"].shape == (4, 16)
    assert int(batches[0]["num_skipped"]) == 0
    red = batches[0]["image"][0].float().mean(dim=(1, 2))
    assert red[0] > 200 and red[1] < 50 and red[2] < 50


def test_cli_converts_and_exits_2_on_a_wrong_column(image_folder, tmp_path):
    command = [sys.executable, "-m", "clipkit", "make-shards", "--no-progress", "--samples-per-shard", "4"]
    done = subprocess.run([*command, "--input", str(image_folder), "--out", str(tmp_path / "out"),
                           "--workers", "2", "--prefix", "part"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"wrote 4 samples in 2 shard(s) to {tmp_path / 'out'}" in done.stdout
    assert f"shards: {tmp_path / 'out'}/part-{{000000..000001}}.tar" in done.stdout
    assert "skipped 4 of 8 input samples" in done.stdout
    assert "skipped " + str(image_folder / "b" / "03.jpg") in done.stderr

    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\nx.jpg,a cat\n")
    failed = subprocess.run([*command, "--input", str(table), "--out", str(tmp_path / "out2"),
                             "--caption-col", "txt"], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2
    assert "clipkit: make-shards: --caption-col 'txt' is not a column of" in failed.stderr
    assert "Traceback" not in failed.stderr


def write_img2dataset_shards(out: Path, per_shard: list[int]) -> None:
    """Shards exactly as img2dataset lays them out: NNNNN.tar + NNNNN_stats.json, no sizes.json."""
    out.mkdir(parents=True)
    for shard, count in enumerate(per_shard):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.new("RGB", (20, 16), (0, 200, 0)).save(buffer, format="JPEG")
                meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                        "caption": f"green picture {key}", "width": 20, "height": 16}
                for ext, data in (("jpg", buffer.getvalue()), ("txt", meta["caption"].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        stats = {"count": count + 1, "successes": count, "failed_to_download": 1, "failed_to_resize": 0,
                 "status_dict": {"success": count, "404": 1}}
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


def test_img2dataset_shards_are_read_as_they_are(tmp_path):
    out = tmp_path / "img2dataset"
    write_img2dataset_shards(out, [5, 3])
    shards = [str(out / "00000.tar"), str(out / "00001.tar")]
    assert not (out / "sizes.json").exists()
    assert count_samples(shards) == 8
    assert count_samples([shards[1]]) == 3
    (out / "00001_stats.json").unlink()
    assert count_samples(shards) is None

    batches = list(build_loader(ShardStream(shards, image_text_fields(), 16, train=False), 0))
    metas = [m for b in batches for m in b["metadata"]]
    assert [m["key"] for m in metas] == [f"00000000{i}" for i in range(5)] + [f"00001000{i}" for i in range(3)]
    image, text = batches[0]["image"], batches[0]["text"]
    assert image.shape == (8, 3, 32, 32) and image.dtype == torch.uint8
    assert text.shape == (8, 16) and (text != 0).sum(dim=1).min() > 2
    assert image[:, 1].float().mean() > 150


def test_several_captions_are_written_one_per_line_and_read_back_as_several(tmp_path):
    save_image(tmp_path / "cat.png", (10, 20, 30), "PNG")
    save_image(tmp_path / "dog.png", (30, 20, 10), "PNG")
    lines = [
        {"image": "cat.png", "caption": ["a cat", "a grey\ncat", "  "]},  # a list; a newline inside one caption
        {"image": "dog.png", "caption": "a dog"},
    ]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = make_shards(jsonl, tmp_path / "out", progress=False)
    members = tar_members(result.shards[0])
    assert members["000000000.txt"] == b"a cat\na grey cat"  # not "['a cat', ...]"
    assert json.loads(members["000000000.json"])["captions"] == ["a cat", "a grey cat"]
    assert json.loads(members["000000000.json"])["caption"] == "a cat"
    assert members["000000001.txt"] == b"a dog" and "captions" not in json.loads(members["000000001.json"])
    # A sidecar caption file with two lines is two captions, as CLIP_benchmark writes them.
    folder = tmp_path / "folder"
    save_image(folder / "x.jpg", (1, 2, 3), "JPEG")
    (folder / "x.txt").write_text("a small square\na dark square\n")
    shard = make_shards(folder, tmp_path / "out2", progress=False).shards[0]
    assert json.loads(tar_members(shard)["000000000.json"])["captions"] == ["a small square", "a dark square"]

    from clipkit.eval.datasets import CAPTIONS_FIELD
    stream = ShardStream([str(p) for p in result.shards], [CAPTIONS_FIELD], 8, train=False)
    (batch,) = list(build_loader(stream, 0))
    assert batch["captions"] == [["a cat", "a grey cat"], ["a dog"]]


def labelled_images(root: Path) -> list[dict[str, str]]:
    rows = []
    for i, (name, colour) in enumerate([("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("red", (250, 5, 5))]):
        save_image(root / f"{i}.jpg", colour, "JPEG")
        rows.append({"image": f"{i}.jpg", "label": name, "index": str(["blue", "red"].index(name))})
    return rows


def test_a_label_column_makes_a_zero_shot_evaluation_set(tmp_path):
    rows = labelled_images(tmp_path / "data")
    table = tmp_path / "data" / "labels.csv"
    write_table(table, [*rows, {"image": "0.jpg", "label": "", "index": ""}], ",")
    result = make_shards(table, tmp_path / "out", label_col="label", progress=False)
    assert result.classnames == ["blue", "red"] and dict(result.skipped) == {"missing label": 1}
    assert (tmp_path / "out" / "classnames.txt").read_text() == "blue\nred\n"
    members = all_members(tmp_path / "out")
    assert [members[f"00000000{i}.cls"] for i in range(3)] == [b"1", b"0", b"1"]
    assert "000000000.txt" not in members  # no caption column: none written
    assert "zero-shot evaluation set" in result.summary()
    # Class names given: their order fixes the indices; class indices need them.
    names = tmp_path / "names.txt"
    names.write_text("red\nblue\ngreen\n")
    given = make_shards(table, tmp_path / "out", label_col="label", classnames_file=names, progress=False)
    assert given.classnames == ["red", "blue", "green"]
    assert all_members(tmp_path / "out")["000000000.cls"] == b"0"
    (tmp_path / "two.txt").write_text("blue\nred\n")
    indexed = make_shards(table, tmp_path / "out", label_col="index", classnames_file=tmp_path / "two.txt",
                          progress=False)
    assert indexed.classnames == ["blue", "red"]
    assert [all_members(tmp_path / "out")[f"00000000{i}.cls"] for i in range(3)] == [b"1", b"0", b"1"]
    with pytest.raises(MakeShardsError, match="holds class indices: give the class names"):
        make_shards(table, tmp_path / "out", label_col="index", progress=False)
    names.write_text("green\n")
    with pytest.raises(MakeShardsError, match="labels 'blue', 'red' .* are not among the 1 class names"):
        make_shards(table, tmp_path / "out", label_col="label", classnames_file=names, progress=False)


def test_class_folders_make_an_evaluation_set_that_eval_reads(tmp_path):
    root = tmp_path / "classes"
    for name, colour in (("red_thing", (255, 0, 0)), ("blue_thing", (0, 0, 255))):
        for i in range(3):
            save_image(root / name / f"{i}.png", colour, "PNG")
    (root / "red_thing" / "0.txt").write_text("a red thing\n")  # sidecar captions are optional
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "clipkit", "make-shards", "--input", str(root), "--out", str(out),
                           "--class-folders", "--prefix", "eval", "--no-progress", "--workers", "1"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "2 classes in" in done.stdout and "skipped 0 of 6" in done.stdout
    assert (out / "classnames.txt").read_text() == "blue thing\nred thing\n"
    members = all_members(out, "eval")
    assert [members[f"00000000{i}.cls"] for i in range(6)] == [b"0"] * 3 + [b"1"] * 3
    assert members["000000003.txt"] == b"a red thing" and "000000004.txt" not in members

    from clipkit.config import ExperimentConfig
    from clipkit.eval.benchmark import evaluate_zeroshot
    from clipkit.eval.encoders import load_encoder
    from clipkit.model import create_model
    from clipkit.train.checkpoint import save_checkpoint

    config = ExperimentConfig(model=tiny_model_config())
    checkpoint = save_checkpoint(tmp_path / "model.pt", create_model(config.model).eval(), config)
    encoder = load_encoder(str(checkpoint))
    from_shards = evaluate_zeroshot(encoder, str(out), templates="simple")
    from_folders = evaluate_zeroshot(encoder, str(root), templates="simple")
    assert from_shards.num_samples == 6 and from_shards.metrics["acc1"] == pytest.approx(from_folders.metrics["acc1"])
    wrong = tmp_path / "names.txt"
    wrong.write_text("red thing\ngreen thing\n")
    with pytest.raises(MakeShardsError, match="1 of the 2 class folders match no class name"):
        make_shards(root, tmp_path / "out3", class_folders=True, classnames_file=wrong, progress=False)
