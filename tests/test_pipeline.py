import gzip
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.config import AugmentConfig, DataConfig
from clipkit.data.pipeline import (
    CLASS_LABEL_FIELD,
    METADATA_FIELD,
    DataQualityError,
    ShardStream,
    ShardReader,
    SkipRateGuard,
    build_loader,
    loader_position,
    member_extension,
    read_shards,
    training_stream,
)
from clipkit.data.shards import ShardSource, count_samples, expand_shards, shard_sources
from clipkit.errors import DataError
from clipkit.data.writer import ShardWriter
from clipkit.modalities import get_modality
from clipkit.modalities.base import FieldDecoder
from clipkit.modalities.image import random_resized_crop_box
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


def test_only_members_that_fields_decode_are_read(tmp_path):
    with ShardWriter(tmp_path, "extra", samples_per_shard=10) as writer:
        writer.write("a", {"jpg": jpeg_bytes(), "txt": b"a red box", "json": b"{}", "npy": bytes(100_000)})
        writer.write("b", {"json": b"{}"})  # nothing that a run on images and captions reads
    shard = str(writer.shard_paths[0])
    samples = list(read_shards([shard], {"jpg", "txt"}))
    assert [sorted(key for key in sample if not key.startswith("__")) for sample in samples] == [["jpg", "txt"]]
    assert len(list(read_shards([shard]))) == 2  # without a filter, every member of every sample
    stream = ShardStream([shard], fields(train=True)[:2], 1, train=True)
    raw = next(stream._raw_samples(0, 1, ShardReader({"jpg", "txt"})))  # what the shuffle buffer would hold
    assert {key for key in raw if not key.startswith("__")} == {"jpg", "txt"}
    assert member_extension("dir/k001.seg.PNG") == "seg.png" and member_extension("k001") == ""


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    shard = write_bad_shard(tmp_path)
    batches = list(build_loader(ShardStream([shard], fields(), 10, train=False), 0))
    assert keys_of(batches) == ["good0", "good1"]
    assert sum(int(b["num_skipped"]) for b in batches) == 4
    assert [b["skipped_shards"] for b in batches if b["skipped_shards"]] == [{shard: 4}]
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
    assert "broken shard" in caplog.text and "truncated.tar" in caplog.text
    assert [b["broken_shards"] for b in batches if b["broken_shards"]] == [[str(truncated)]]
    # Not in a sizes.json: what it lost is unknown, so only the sample cut in half can be counted.
    assert sum(int(b["num_skipped"]) for b in batches) <= 1


def broken_copies(toy_shards, folder: Path) -> dict[str, int]:
    """The toy training shards (64 samples each, listed in sizes.json) copied and broken each way a
    shard breaks; returns how many samples each broken copy should have held."""
    folder.mkdir()
    originals = [Path(p).read_bytes() for p in toy_shards.train_shards]
    damage = {
        "truncated": lambda data: data[: len(data) // 2],
        "random": lambda data: np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes(),
        "gzip": lambda data: gzip.compress(bytes(range(256)) * 64),
        "empty": lambda data: b"",
    }
    sizes = {}
    for (name, breaking), data in zip(damage.items(), originals):
        (folder / f"{name}.tar").write_bytes(breaking(data))
        sizes[f"{name}.tar"] = 64
    (folder / "folder.tar").mkdir()
    sizes["folder.tar"] = 64
    sizes["missing.tar"] = 64  # listed, never written
    (folder / "good.tar").write_bytes(originals[-1])
    sizes["good.tar"] = 64
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return sizes


def test_broken_shards_count_the_samples_they_lost(toy_shards, tmp_path, caplog):
    sizes = broken_copies(toy_shards, tmp_path / "shards")
    shards = [str(tmp_path / "shards" / name) for name in sizes]
    batches = list(build_loader(ShardStream(shards, fields(), 16, train=False), 0))
    delivered = sum(len(b["image"]) for b in batches if "image" in b)
    skipped = sum(int(b["num_skipped"]) for b in batches)
    broken = [url for b in batches for url in b["broken_shards"]]
    assert delivered + skipped == 64 * len(sizes)  # every sample the shards should hold is accounted for
    assert 64 < delivered <= 64 + 32  # the good shard and the first part of the truncated one
    assert {"random.tar", "gzip.tar", "empty.tar", "folder.tar", "missing.tar"} <= {Path(url).name for url in broken}
    lost = {}
    for b in batches:
        for url, count in b["skipped_shards"].items():
            lost[Path(url).name] = lost.get(Path(url).name, 0) + count
    assert all(lost[name] == 64 for name in ("random.tar", "gzip.tar", "empty.tar", "folder.tar", "missing.tar"))
    assert 32 <= lost["truncated.tar"] < 64  # known from sizes.json, with or without a read error


def test_duplicate_keys_are_counted_and_kept(toy_shards, tmp_path):
    shard = str(toy_shards.train_shards[0])
    batches = list(build_loader(ShardStream([shard, shard], fields(), 16, train=False), 0))
    assert sum(len(b["image"]) for b in batches if "image" in b) == 128
    assert sum(b["duplicate_keys"] for b in batches) == 64


def test_image_decoder_outputs():
    image = get_modality("image", tiny_model_config(), AugmentConfig(crop_scale=(0.3, 1.0), horizontal_flip=True))
    raw = jpeg_bytes(size=(80, 50))
    for train in (True, False):
        out = image.field(train).decode(raw, random.Random(0))
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        # A flat red JPEG stays red through decode, crop and resize.
        assert out[0].float().mean() > 150 and out[2].float().mean() < 80
    with pytest.raises(Exception):
        image.field(False).decode(b"garbage", random.Random(0))


def test_loader_uses_no_more_workers_than_shards(toy_shards, caplog):
    stream = ShardStream([str(toy_shards.eval_shards[0])], fields(), 16, train=False)
    assert build_loader(stream, num_workers=4).num_workers == 1
    assert "using 1 data workers" in caplog.text


def test_shard_sources_split_patterns_and_weights():
    assert shard_sources("a-{0..2}.tar::b.tar", [3, 1]) == [
        ShardSource(("a-0.tar", "a-1.tar", "a-2.tar"), 3.0), ShardSource(("b.tar",), 1.0)]
    assert shard_sources("x.tar") == [ShardSource(("x.tar",))]
    with pytest.raises(ValueError, match=r"1 weight\(s\) for 2"):
        shard_sources("a.tar::b.tar", [1])


def test_random_resized_crop_box_fits_and_falls_back_like_torchvision():
    rng = random.Random(0)
    for _ in range(200):
        top, left, height, width = random_resized_crop_box(80, 50, (0.3, 1.0), rng)
        assert 0 <= top <= top + height <= 50 and 0 <= left <= left + width <= 80 and height and width
    # No box of the whole area fits a 100 × 10 image at aspect ratios 3/4 to 4/3: the fallback is the
    # centred box of ratio 4/3 and full height.
    assert random_resized_crop_box(100, 10, (1.0, 1.0), random.Random(0)) == (0, 43, 10, 13)


def augmented_stream(shards: list[str], epoch: int, **kwargs) -> ShardStream:
    augment = AugmentConfig(crop_scale=(0.2, 1.0), horizontal_flip=True)
    image = get_modality("image", tiny_model_config(), augment).field(train=True)
    stream = ShardStream(shards, [image, METADATA_FIELD], 16, train=True, **kwargs)
    stream.set_epoch(epoch)
    return stream


def pixels_by_key(batches) -> dict[str, torch.Tensor]:
    return {meta["key"]: image for batch in batches for meta, image in zip(batch["metadata"], batch["image"])}


def test_augmentation_depends_on_sample_and_epoch_not_on_workers(toy_shards):
    shards = [str(p) for p in toy_shards.eval_shards]  # 64 + 32 samples: full batches in any layout
    torch.manual_seed(0)
    alone = pixels_by_key(build_loader(augmented_stream(shards, 0), 0))
    torch.manual_seed(1)
    shuffled_in_two = pixels_by_key(build_loader(augmented_stream(shards, 0, shuffle_size=20), 2))
    assert len(alone) == 96 and alone.keys() == shuffled_in_two.keys()
    assert all(torch.equal(alone[key], shuffled_in_two[key]) for key in alone)
    next_epoch = pixels_by_key(build_loader(augmented_stream(shards, 1), 0))
    assert sum(not torch.equal(alone[key], next_epoch[key]) for key in alone) > 90


def test_loader_position_follows_round_robin_past_finished_workers():
    assert loader_position([math.inf, math.inf], 5) == ([3, 2], 1)
    assert loader_position([12, 8], 17) == ([9, 8], 0)  # worker 1 ran out after batch 16
    assert loader_position([1, 5, 2], 6) == ([1, 3, 2], 1)
    assert loader_position([2, 2], 0) == ([0, 0], 0)


def run_epoch(stream: ShardStream, epoch: int, skip_batches: int, num_workers: int) -> list[dict]:
    stream.set_epoch(epoch, skip_batches=skip_batches)
    return list(build_loader(stream, num_workers))


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resumed_epoch_yields_exactly_the_remaining_batches(toy_shards, num_workers, resampled):
    shards = [str(p) for p in toy_shards.train_shards]
    sampling = {"resampled": True, "epoch_samples": 320} if resampled else {}
    stream = ShardStream(shards, fields(train=True), 16, train=True, shuffle_size=20, seed=5, **sampling)
    full = run_epoch(stream, 1, 0, num_workers)
    assert len(full) == 20
    # With 2 workers over 5 shards, the one with 2 shards runs out after batch 16: 18 resumes where
    # only the other worker delivers (the 10th of its 12 batches; 9th if the loader ignored that).
    for skip in (5, 18):
        resumed = run_epoch(stream, 1, skip, num_workers)
        assert keys_of(resumed) == keys_of(full[skip:])
        for want, got in zip(full[skip:], resumed, strict=True):
            assert torch.equal(want["image"], got["image"]) and torch.equal(want["text"], got["text"])


@dataclass
class RecordingDecoder:
    """Keeps every member it decodes (in this process: use it with num_workers=0)."""

    decoded: list[bytes] = field(default_factory=list)

    def __call__(self, data: bytes, rng: random.Random) -> bytes:
        self.decoded.append(data)
        return data


def test_skipped_batches_are_not_decoded(toy_shards):
    recorder = RecordingDecoder()
    stream = ShardStream([str(p) for p in toy_shards.train_shards], [FieldDecoder("raw", ("json",), recorder)],
                         16, train=True, shuffle_size=20)
    assert len(run_epoch(stream, 0, 3, 0)) == 17 and len(recorder.decoded) == 17 * 16


def test_resampled_sources_mix_by_weight_and_never_run_out(toy_shards):
    # Five training shards against one held-out shard, 64 samples each, weighted 3 : 1.
    sources = [ShardSource(tuple(str(p) for p in toy_shards.train_shards), 3.0),
               ShardSource((str(toy_shards.eval_shards[0]),), 1.0)]
    stream = ShardStream(sources, [METADATA_FIELD], 64, train=True, resampled=True, epoch_samples=64 * 400,
                         shuffle_size=100)
    keys = keys_of(build_loader(stream, 2))
    # 400 shards' worth of samples out of 6 shards: the stream went on far past the data's end.
    assert len(keys) == 64 * 400
    assert 0.70 < sum(key.startswith("train") for key in keys) / len(keys) < 0.80


def test_resampled_stream_serves_more_ranks_and_workers_than_shards(toy_shards):
    shard = [str(toy_shards.eval_shards[0])]

    def rank_keys(rank: int) -> list[str]:
        stream = ShardStream(shard, [METADATA_FIELD], 16, train=True, resampled=True, epoch_samples=4 * 128,
                             shuffle_size=20, rank=rank, world_size=4)
        loader = build_loader(stream, 2)
        assert loader.num_workers == 2
        return keys_of(loader)

    first, second = rank_keys(0), rank_keys(1)
    assert len(first) == len(second) == 128 and first != second


def test_resampled_stream_of_unreadable_shards_fails_instead_of_spinning(tmp_path):
    stream = ShardStream([str(tmp_path / "missing.tar")], [METADATA_FIELD], 4, train=True, resampled=True,
                         epoch_samples=8)
    with pytest.raises(DataError, match="held no readable sample"):
        list(build_loader(stream, 0))


def test_rank_without_shards_is_an_error(toy_shards):
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 ranks.*data\.resampled"):
        ShardStream([str(toy_shards.eval_shards[0])], fields(True), 16, train=True, rank=1, world_size=2)


def test_sampling_options_belong_to_resampled_streams():
    with pytest.raises(ValueError, match="resampled streams only"):
        ShardStream([ShardSource(("a.tar",), 2.0)], fields(True), 16, train=True)
    with pytest.raises(ValueError, match="resampled streams only"):
        ShardStream(["a.tar"], fields(True), 16, train=True, epoch_samples=100)
    with pytest.raises(ValueError, match="epoch_samples"):
        ShardStream(["a.tar"], fields(True), 16, train=True, resampled=True)


def test_training_stream_from_data_config(toy_shards):
    config = DataConfig(train_shards=f"{toy_shards.shard_pattern('train')}::{toy_shards.eval_shards[0]}",
                        resampled=True, train_num_samples=640, train_data_weights=[3, 1], batch_size=32)
    stream = training_stream(config, [METADATA_FIELD], seed=0)
    assert [source.weight for source in stream.sources] == [3, 1] and len(stream.shards) == 6
    assert stream.resampled and stream.batches_per_rank() == 20


def test_skip_rate_guard_stops_only_a_sustained_excess():
    guard = SkipRateGuard(max_fraction=0.1, min_samples=100)
    guard.update(delivered=10, skipped=5)  # a third skipped, but too few samples to judge
    guard.update(delivered=125, skipped=10)  # 15 of 150: at the limit, not above it
    with pytest.raises(DataQualityError) as err:
        guard.update(delivered=16, skipped=2)
    message = str(err.value)
    assert "10.1%" in message and "17 of 168" in message and "10.0%" in message
    assert "data.max_skip_fraction" in message
    with pytest.raises(ValueError, match="max_fraction"):
        SkipRateGuard(max_fraction=0)
