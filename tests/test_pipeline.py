import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipkit.config import AugmentConfig
from clipkit.data.pipeline import (
    CLASS_LABEL_FIELD,
    METADATA_FIELD,
    ShardStream,
    build_loader,
    count_samples,
    expand_shards,
)
from clipkit.data.writer import ShardWriter
from clipkit.modalities import get_modality
from tests.conftest import tiny_model_config


def fields(train: bool = False):
    config = tiny_model_config()
    image = get_modality("image", config, AugmentConfig(crop_scale=(0.5, 1.0))).field(train)
    text = get_modality("text", config).field(train)
    return [image, text, METADATA_FIELD]


def keys_of(batches) -> list[str]:
    return [meta["key"] for batch in batches for meta in batch["metadata"]]


def jpeg_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_expand_shards():
    assert expand_shards("a/s-{000..002}.tar") == ["a/s-000.tar", "a/s-001.tar", "a/s-002.tar"]
    assert expand_shards("x.tar::y-{0..1}.tar") == ["x.tar", "y-0.tar", "y-1.tar"]
    with pytest.raises(ValueError, match="names no shards"):
        expand_shards("")


def test_count_samples_reads_sizes_json(toy_shards):
    assert count_samples([str(p) for p in toy_shards.train_shards]) == 320
    assert count_samples([str(toy_shards.train_shards[0])]) == 64
    assert count_samples(["/nowhere/shard-000.tar"]) is None


def test_eval_stream_reads_every_sample_once_in_order(toy_shards):
    shards = [str(p) for p in toy_shards.eval_shards]
    stream = ShardStream(shards, [*fields(), CLASS_LABEL_FIELD], batch_size=10, train=False)
    batches = list(build_loader(stream, num_workers=0))
    keys = keys_of(batches)
    assert len(keys) == 96 and keys == sorted(keys)
    first = batches[0]
    assert first["image"].shape == (10, 3, 32, 32) and first["image"].dtype == torch.uint8
    assert first["text"].shape == (10, 16) and first["text"].dtype == torch.int64
    labels = torch.cat([b["label"] for b in batches])
    assert labels.tolist() == [m["label"] for b in batches for m in b["metadata"]]
    assert sum(int(b["num_skipped"]) for b in batches) == 0


def test_workers_and_ranks_partition_the_shards(toy_shards):
    shards = [str(p) for p in toy_shards.train_shards]
    seen = []
    for rank in range(2):
        stream = ShardStream(shards, fields(train=True), 8, train=True, shuffle_size=20, seed=3,
                             rank=rank, world_size=2)
        seen.append(keys_of(build_loader(stream, num_workers=2)))
    # 5 shards of 64 over 2 ranks: every batch is full, so nothing is dropped and nothing repeats.
    assert len(seen[0]) + len(seen[1]) == 320
    assert not set(seen[0]) & set(seen[1])


def test_training_order_is_seeded_by_epoch(toy_shards):
    shards = [str(p) for p in toy_shards.train_shards]

    def order(epoch: int, seed: int = 0) -> list[str]:
        stream = ShardStream(shards, fields(train=True), 16, train=True, shuffle_size=50, seed=seed)
        stream.set_epoch(epoch)
        return keys_of(build_loader(stream, num_workers=0))

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=1)
    assert sorted(order(0)) == sorted(order(1))


def test_training_drops_ragged_last_batch_eval_keeps_it(toy_shards):
    shards = [str(toy_shards.eval_shards[0])]
    train = list(build_loader(ShardStream(shards, fields(True), 60, train=True), 0))
    evaluation = list(build_loader(ShardStream(shards, fields(), 60, train=False), 0))
    assert [len(b["metadata"]) for b in train] == [60]
    assert [len(b["metadata"]) for b in evaluation] == [60, 4]


def write_bad_shard(tmp_path: Path) -> str:
    with ShardWriter(tmp_path, "bad", samples_per_shard=100) as writer:
        writer.write("good0", {"jpg": jpeg_bytes(), "txt": b"a red box", "json": b'{"key": "good0"}'})
        writer.write("corrupt", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"x", "json": b'{"key": "c"}'})
        writer.write("nocaption", {"jpg": jpeg_bytes(), "json": b'{"key": "n"}'})
        writer.write("latin1", {"jpg": jpeg_bytes(), "txt": "caf\xe9".encode("latin-1"), "json": b'{"key": "l"}'})
        writer.write("empty", {"jpg": jpeg_bytes(), "txt": b"  ", "json": b'{"key": "e"}'})
        writer.write("good1", {"png": _png(), "txt": b"a png", "json": b'{"key": "good1"}'})
    return str(writer.shard_paths[0])


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    shard = write_bad_shard(tmp_path)
    batches = list(build_loader(ShardStream([shard], fields(), 10, train=False), 0))
    assert keys_of(batches) == ["good0", "good1"]
    assert sum(int(b["num_skipped"]) for b in batches) == 4
    text = caplog.text
    for key in ("corrupt", "nocaption", "latin1", "empty"):
        assert key in text
    assert "bad-000000.tar" in text


def test_truncated_shard_yields_what_it_can(toy_shards, tmp_path, caplog):
    data = Path(toy_shards.eval_shards[0]).read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    shards = [str(truncated), str(toy_shards.eval_shards[1])]
    batches = list(build_loader(ShardStream(shards, fields(), 16, train=False), 0))
    keys = keys_of(batches)
    from_truncated = [k for k in keys if int(k[4:]) < 64]
    # The first half of the 64-sample shard survives; the next shard (32 samples) is read whole.
    assert 20 < len(from_truncated) < 64 and len(keys) - len(from_truncated) == 32
    assert "unreadable" in caplog.text and "truncated.tar" in caplog.text
    assert sum(int(b["num_skipped"]) for b in batches) <= 1  # at most the sample cut in half


def test_image_decoder_outputs():
    image = get_modality("image", tiny_model_config(), AugmentConfig(crop_scale=(0.3, 1.0), horizontal_flip=True))
    raw = jpeg_bytes(size=(80, 50))
    for train in (True, False):
        out = image.field(train).decode(raw)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        # A flat red JPEG stays red through decode, crop and resize.
        assert out[0].float().mean() > 150 and out[2].float().mean() < 80
    with pytest.raises(Exception):
        image.field(False).decode(b"garbage")


def test_loader_uses_no_more_workers_than_shards(toy_shards, caplog):
    stream = ShardStream([str(toy_shards.eval_shards[0])], fields(), 16, train=False)
    assert build_loader(stream, num_workers=4).num_workers == 1
    assert "using 1 data workers" in caplog.text
