"""`clipkit train` on a CSV/TSV/JSONL of image paths and captions: converted once into cached shards
beside the table, reused while the table is unchanged, rebuilt when it changes, one writer at a time."""

from __future__ import annotations

import csv
import fcntl
import io
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipkit.cli import main
from clipkit.config import ConfigError, DataConfig
from clipkit.data.table_shards import LOCK_FILE, RECORD_FILE, cache_dir, shards_for_tables, table_shards
from clipkit.errors import DataError

REPO = Path(__file__).resolve().parents[1]
GOOD = 6


def write_images(root: Path) -> list[str]:
    """GOOD real JPEGs in root/images/ and one undecodable file; their paths relative to root."""
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(GOOD):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / f"images/{i}.jpg")
        names.append(f"images/{i}.jpg")
    (root / "images/broken.jpg").write_bytes(b"not a jpeg at all")
    return names


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("filepath", "title")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def with_bad_rows(names: list[str]) -> list[tuple[str, str]]:
    """The good rows, then a missing file, an empty caption and an undecodable image."""
    return [(name, f"a photo of thing {i}") for i, name in enumerate(names)] + [
        ("images/missing.jpg", "gone"), (names[0], "  "), ("images/broken.jpg", "broken")]


@pytest.fixture
def config_file(tiny_config, tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config.to_dict()))
    return path


def train(config_file: Path, table: Path, out: Path) -> int:
    return main(["train", "--config", str(config_file), "--no-progress", "--set", f"data.train_shards={table}",
                 "--set", "train.max_steps=2", "--set", "data.batch_size=2", "--set", f"train.output_dir={out}"])


def shard_mtimes(table: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir(table).glob("*.tar")}


def test_train_on_csv_converts_once_then_reuses(config_file, tmp_path, capsys):
    table = write_csv(tmp_path / "captions.csv", with_bad_rows(write_images(tmp_path)))
    assert train(config_file, table, tmp_path / "run1") == 0
    out = capsys.readouterr().out
    cache = cache_dir(table)
    assert (f"converted 9 rows of {table} into {GOOD} shards in {cache} "
            "(3 skipped: 1 empty caption, 1 missing image, 1 undecodable image)") in out
    assert "trained 2 steps" in out
    assert json.loads((cache / "sizes.json").read_text()) == {f"shard-{i:06d}.tar": 1 for i in range(GOOD)}
    before = shard_mtimes(table)

    assert train(config_file, table, tmp_path / "run2") == 0
    out = capsys.readouterr().out
    assert f"reusing shards in {cache} ({GOOD} samples of {table}; 3 of its 9 rows skipped)" in out
    assert "trained 2 steps" in out
    assert shard_mtimes(table) == before
    saved = yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())
    assert saved["data"]["train_shards"] == f"{cache}/shard-{{000000..000005}}.tar"  # what it trained on


def test_edited_table_or_columns_rebuild(tmp_path):
    names = write_images(tmp_path)
    table = write_csv(tmp_path / "t.csv", with_bad_rows(names))
    assert table_shards(table, {}, progress=False).converted
    assert not table_shards(table, {}, progress=False).converted
    write_csv(table, with_bad_rows(names)[:4])  # drop two good rows and the bad ones
    edited = table_shards(table, {}, progress=False)
    assert (edited.converted, edited.num_rows, edited.num_samples, edited.skipped) == (True, 4, 4, {})
    assert sorted(shard_mtimes(table)) == [f"shard-{i:06d}.tar" for i in range(4)]  # stale shards are gone
    assert table_shards(table, {"caption": "title"}, progress=False).converted  # other settings: a new key


def test_an_image_replaced_or_added_under_the_same_path_rebuilds(tmp_path):
    """The shards hold copies of the images: an image file that changes, or appears, must not be
    trained on from the stale copy."""
    names = write_images(tmp_path)
    table = write_csv(tmp_path / "t.csv", with_bad_rows(names))
    first = table_shards(table, {}, progress=False)
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(buffer, format="JPEG")
    (tmp_path / names[1]).write_bytes(buffer.getvalue())
    replaced = table_shards(table, {}, progress=False)
    assert replaced.converted and replaced.num_samples == first.num_samples
    members = []
    for shard in sorted(cache_dir(table).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert buffer.getvalue() in members
    shutil.copy(tmp_path / names[2], tmp_path / "images/missing.jpg")  # the missing row's file appears
    added = table_shards(table, {}, progress=False)
    assert added.converted and added.num_samples == first.num_samples + 1
    assert not table_shards(table, {}, progress=False).converted


def test_jsonl_for_train_and_val(tmp_path):
    names = write_images(tmp_path)
    table = tmp_path / "pairs.jsonl"
    rows = [{"image": names[0], "caption": ["a cat", "a small cat"]}, {"image": names[1], "caption": "a dog"},
            {"image": "images/broken.jpg", "caption": "x"}, {"caption": "no image"}]
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data, tables = shards_for_tables(DataConfig(train_shards=str(table), val_shards=str(table)), progress=False)
    pattern = f"{cache_dir(table)}/shard-{{000000..000001}}.tar"
    assert (data.train_shards, data.val_shards) == (pattern, pattern)
    assert [t.converted for t in tables] == [True, False]
    assert tables[0].skipped == {"undecodable image": 1, "missing image": 1}


def test_columns_by_config_when_ambiguous(tmp_path):
    names = write_images(tmp_path)
    table = tmp_path / "t.tsv"
    table.write_text("image\tcaption\ttitle\n" + "".join(f"{name}\t\tcat {i}\n" for i, name in enumerate(names)))
    with pytest.raises(DataError, match=r"several caption columns \(caption, title\): name it with "
                                        r"data.table_columns.caption"):
        table_shards(table, {}, progress=False)
    assert table_shards(table, {"caption": "title"}, progress=False).num_samples == GOOD
    with pytest.raises(ConfigError, match="data.table_columns: unknown role 'path'"):
        shards_for_tables(DataConfig(train_shards=str(table), table_columns={"path": "image"}))


CONVERT = ("import logging, sys; logging.basicConfig(level=logging.INFO); from pathlib import Path; "
           "from clipkit.data.table_shards import table_shards; "
           "print(table_shards(Path(sys.argv[1]), {}, progress=False).describe())")


def test_concurrent_processes_one_writer(tmp_path):
    """Two converters started while the lock is held both wait; then one converts and the other reuses."""
    table = write_csv(tmp_path / "t.csv", with_bad_rows(write_images(tmp_path)))
    cache_dir(table).mkdir()
    with (cache_dir(table) / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        logs = [tmp_path / f"err{i}.txt" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(table)], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=log.open("w")) for log in logs]
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        assert not (cache_dir(table) / RECORD_FILE).exists()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    assert sorted(out.split()[0] for out in outs) == ["converted", "reusing"]
    assert len(list(cache_dir(table).glob("*.tar"))) == GOOD


def test_all_bad_table_exits_2(config_file, tmp_path, capsys):
    write_images(tmp_path)
    table = write_csv(tmp_path / "bad.csv", [("images/missing.jpg", "gone"), ("images/broken.jpg", "broken")])
    assert train(config_file, table, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"clipkit: train: converting {table}: none of the 2 input samples could be converted "
                   f"(1 missing image, 1 undecodable image); the shards already in {cache_dir(table)} are left "
                   "as they were")
    assert not (cache_dir(table) / RECORD_FILE).exists()
