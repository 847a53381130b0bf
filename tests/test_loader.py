"""The shard loader: every sample once per val pass, equal steps per rank, errors that name the shard."""

import json
import shutil

import pytest
import torch

from alexcli.errors import DataError
from alexcli.data import dataset, stream


def test_val_pass_reads_every_sample_once_in_order(train_data):
    split = dataset.open_split(train_data, "val")
    got = list(stream.batches(split, 5, train=False, workers=0))
    assert sum(len(y) for _, y in got) == split.samples == 16 and len(split.shards) == 2
    assert got[0][0].dtype == torch.uint8 and got[0][0].shape[1:] == (3, 72, 72)
    labels = torch.cat([y for _, y in got])
    manifest = json.loads((train_data / "dataset.json").read_text())
    assert labels.max() < len(manifest["classes"])


def test_train_epoch_is_a_function_of_seed_and_epoch(train_data):
    split = dataset.open_split(train_data, "train")
    steps = stream.steps_per_epoch(split, 8, 1)
    assert steps == split.samples // 8

    def epoch(seed, e):
        return torch.cat([y for _, y in stream.batches(split, 8, train=True, workers=0, seed=seed, epoch=e, limit=steps)])

    a, b, c = epoch(0, 1), epoch(0, 1), epoch(0, 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and len(a) == steps * 8


def test_every_rank_gets_the_same_number_of_batches(train_data):
    split = dataset.open_split(train_data, "train")  # 5 shards, the last one smaller
    assert len({s["samples"] for s in split.shards}) > 1
    steps = stream.steps_per_epoch(split, 8, 2)
    counts = [len(list(stream.batches(split, 4, train=True, workers=0, rank=r, world=2, limit=steps)))
              for r in (0, 1)]
    assert counts == [steps, steps]


def test_worker_processes_give_the_same_samples(train_data):
    split = dataset.open_split(train_data, "val")
    one = sorted(torch.cat([y for _, y in stream.batches(split, 4, train=False, workers=0)]).tolist())
    two = sorted(torch.cat([y for _, y in stream.batches(split, 4, train=False, workers=1)]).tolist())
    assert one == two


def test_fewer_shards_than_ranks_times_workers(train_data):
    split = dataset.open_split(train_data, "train")
    with pytest.raises(DataError, match=r"5 train shards cannot feed 2 rank\(s\) x 3 loader worker\(s\)"):
        list(stream.batches(split, 4, train=True, workers=3, world=2, limit=1))


def copy_data(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_named(train_data, tmp_path):
    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(DataError, match=r"val-000000.tar: \d+ bytes, but dataset.json says"):
        dataset.open_split(data, "val")


def test_shard_with_fewer_samples_than_the_manifest_is_named(train_data, tmp_path):
    """A tar cut at a member boundary but padded back to size reads short without any tar error."""
    import tarfile

    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000000.tar"
    size = shard.stat().st_size
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut = members[-3].offset  # drop the last sample's three members
    shard.write_bytes(shard.read_bytes()[:cut] + b"\0" * (size - cut))
    split = dataset.open_split(data, "val")
    with pytest.raises(DataError, match=r"val-000000.tar: 11 samples read, but dataset.json says 12"):
        list(stream.batches(split, 4, train=False, workers=0))
    with pytest.raises(DataError, match=r"val-000000.tar: 11 samples read"):  # the same from a worker process
        list(stream.batches(split, 4, train=False, workers=1))


def test_missing_split_and_folder(train_data, tmp_path):
    with pytest.raises(DataError, match="no 'test' split"):
        dataset.open_split(train_data, "test")
    with pytest.raises(DataError, match="no such data folder"):
        dataset.open_split(tmp_path / "nope", "train")


def test_shards_written_by_other_tools_are_read_with_tarfile(train_data, tmp_path):
    """A shard rewritten in tarfile's GNU format (as other tools write them) reads the same samples."""
    import io
    import tarfile

    data = copy_data(train_data, tmp_path / "d")
    before = [torch.cat(b) for b in zip(*stream.batches(dataset.open_split(data, "val"), 4, train=False, workers=0))]
    manifest = json.loads((data / "dataset.json").read_text())
    for entry in manifest["splits"]["val"]["shards"]:
        path = data / entry["name"]
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst:
            for m, payload in members:
                m.uname = "someone-with-a-long-name"
                dst.addfile(m, io.BytesIO(payload))
        path.write_bytes(buf.getvalue())
        entry["bytes"] = len(buf.getvalue())
    (data / "dataset.json").write_text(json.dumps(manifest))
    assert tarfile.open(data / "val-000000.tar").getmembers()[0].offset == 0
    after = [torch.cat(b) for b in zip(*stream.batches(dataset.open_split(data, "val"), 4, train=False, workers=0))]
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_damaged_header_is_named(train_data, tmp_path):
    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000000.tar"
    raw = bytearray(shard.read_bytes())
    import tarfile

    with tarfile.open(shard) as tar:
        off = tar.getmembers()[3].offset  # the second sample's first header
    raw[off + 1] ^= 0x01  # one bit of its name
    shard.write_bytes(bytes(raw))
    split = dataset.open_split(data, "val")
    with pytest.raises(DataError, match=rf"val-000000.tar: damaged tar header at byte {off}"):
        list(stream.batches(split, 4, train=False, workers=0))


def test_decode_on_the_device_gives_the_loaders_pixels(train_data):
    """--decode device: the loader packs the JPEG bytes, images_on() decodes them where training runs
    (torchvision's decoder here on the CPU; nvJPEG on a GPU)."""
    split = dataset.open_split(train_data, "val")
    cpu = list(stream.batches(split, 5, train=False, workers=0))
    packed = list(stream.batches(split, 5, train=False, workers=1, decode="device"))
    assert [len(y) for _, y in cpu] == [len(y) for _, y in packed]
    for (a, ya), (b, yb) in zip(cpu, packed):
        assert isinstance(b, (tuple, list)) and b[0].dtype == torch.uint8 and len(b[1]) == len(yb) + 1
        got = stream.images_on(b, "cpu")
        assert got.shape == a.shape and torch.equal(ya, yb)
        assert (got.int() - a.int()).abs().max() <= 2  # both libjpeg-turbo here; nvJPEG may differ slightly
