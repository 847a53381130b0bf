"""The shard loader: every sample once per val pass, equal steps per rank, errors that name the shard."""

import json
import shutil
from pathlib import Path

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
    split = dataset.open_split(data, "val", verify=False)  # (its sha256 differs: verification would stop it)
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
    import hashlib
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
        entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
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
    split = dataset.open_split(data, "val", verify=False)
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


def test_mixed_decode_packs_the_first_share_of_every_batch(train_data):
    """--decode mixed: the first round(share x B) images of each batch go packed (decoded where
    training runs), the rest decoded in the loader; images_on() puts them back in the batch's order."""
    split = dataset.open_split(train_data, "val")
    cpu = list(stream.batches(split, 5, train=False, workers=0))
    mixed = list(stream.batches(split, 5, train=False, workers=1, decode="mixed", share=0.4))
    assert [len(y) for _, y in cpu] == [len(y) for _, y in mixed] and len(cpu) > 1
    for (a, ya), (b, yb) in zip(cpu, mixed):
        k = stream.device_count(len(yb), 0.4)
        assert torch.equal(ya, yb)
        if k == 0:  # a short last batch of 1: nothing to pack
            assert torch.equal(b, a)
            continue
        assert len(b.offsets) == k + 1 and torch.equal(b.rest, a[k:])  # the loader's part: PIL's pixels exactly
        got = stream.images_on(b, "cpu")
        assert got.shape == a.shape and torch.equal(got[k:], a[k:])
        assert (got[:k].int() - a[:k].int()).abs().max() <= 2  # the device's decoder: libjpeg-turbo here


@pytest.mark.parametrize("batch,share,expected", [(128, 0.5, 64), (5, 0.4, 2), (1, 0.3, 0), (1, 0.7, 1), (3, 0.99, 3)])
def test_the_mixed_split_is_a_fixed_count_per_batch(batch, share, expected):
    assert stream.device_count(batch, share) == expected


def test_the_device_decode_waits_for_the_stream_first(monkeypatch):
    """nvJPEG's batched decode ignores stream order (pytorch/vision PR 9606): images_on drains the
    caller's stream before every GPU decode. Checked here on the CPU by recording the calls."""
    import torchvision.io

    calls = []

    class Stream:
        def synchronize(self):
            calls.append("synchronize")

    def decode(parts, mode, device):
        calls.append(("decode", str(device)))
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in parts]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    packed = stream.pack([b"a", b"bc"])
    assert stream.images_on(packed, "cuda:0").shape == (2, 3, 2, 2)
    assert calls == ["synchronize", ("decode", "cuda:0")]
    calls.clear()
    stream.images_on(packed, "cpu")
    assert calls == [("decode", "cpu")]  # nothing to wait for on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_decode_of_the_same_batch_is_identical_while_the_stream_is_busy(train_data):
    """The same packed batch decoded 50 times, each time right after queueing ~tens of ms of other
    work on the stream and freeing its tensors (so the allocator hands their blocks to the decoder
    while queued kernels still read them): every decode is the first one's, and the queued work's
    results are right."""
    split = dataset.open_split(train_data, "val")
    packed = next(iter(stream.batches(split, 16, train=False, workers=0, decode="device")))[0]
    first = stream.images_on(packed, "cuda").clone()
    for _ in range(50):
        x = torch.ones(4096, 4096, device="cuda")
        for _ in range(20):
            x = x @ x / 4096  # stays all ones: the check below knows the answer
        sums = [x.sum()]
        del x  # freed while its matmuls and the sum are still queued
        got = stream.images_on(packed, "cuda")
        assert torch.equal(got, first)
        assert sums[0].item() == 4096 * 4096


# ---------------------------------------------------------------- sha256 before first use, remembered

def jpeg_members(shard):
    """(key, offset of the JPEG's bytes, its length) of every sample of SHARD."""
    import tarfile

    with tarfile.open(shard) as tar:
        return [(m.name[:-4], m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")]


def flip_jpeg_bytes(shard, sample=0, at=0.6):
    """Flip bytes inside one sample's JPEG entropy data: same size, still a valid tar (and usually a
    JPEG that still decodes, to other pixels)."""
    key, off, size = jpeg_members(shard)[sample]
    raw = bytearray(shard.read_bytes())
    for i in range(off + int(size * at), off + int(size * at) + 8):
        raw[i] ^= 0x55
    shard.write_bytes(bytes(raw))
    return key


def test_flipped_bytes_of_the_same_size_are_found_before_use(train_data, tmp_path):
    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000000.tar"
    flip_jpeg_bytes(shard)
    with pytest.raises(DataError) as err:
        dataset.open_split(data, "val")
    assert str(err.value) == (f"{shard}: sha256 differs from dataset.json (corrupt or replaced); "
                              f"run `alexcli verify {data}`")
    assert dataset.open_split(data, "val", verify=False).samples == 16  # the way around it, on purpose


def test_a_train_shard_replaced_by_another_of_the_same_size_is_refused(train_data, tmp_path):
    data = copy_data(train_data, tmp_path / "d")
    entries = json.loads((data / "dataset.json").read_text())["splits"]["train"]["shards"]
    by_size = {}
    for e in entries:
        by_size.setdefault(e["bytes"], []).append(e["name"])
    a, b = next(names for names in by_size.values() if len(names) > 1)[:2]  # two shards of one size
    shutil.copyfile(data / a, data / b)  # training would see a's samples twice
    with pytest.raises(DataError, match=rf"{b}: sha256 differs from dataset.json \(corrupt or replaced\)"):
        dataset.open_split(data, "train")


class Hashes:
    """Counts the shards open_split hashes."""

    def __init__(self, monkeypatch):
        self.names = []
        real = dataset.sha256_file

        def counting(path, *a, **k):
            self.names.append(path.name)
            return real(path, *a, **k)

        monkeypatch.setattr(dataset, "sha256_file", counting)

    def take(self):
        names, self.names = sorted(self.names), []
        return names


def test_verified_shards_are_remembered_until_they_change(train_data, tmp_path, monkeypatch):
    import os
    import time

    data = copy_data(train_data, tmp_path / "d")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dataset, "_now_ns", lambda: time.time_ns() + 10 ** 10)  # the shards are not just written
    hashes = Hashes(monkeypatch)
    names = [e["name"] for e in dataset.open_split(data, "val").shards]
    assert hashes.take() == names and (data / dataset.VERIFIED_FILE).is_file()
    dataset.open_split(data, "val")
    dataset.open_split(data, "val")
    assert hashes.take() == []  # later epochs and runs pay a stat per shard
    shard = data / names[1]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # touched: hashed again, still good
    dataset.open_split(data, "val")
    assert hashes.take() == [names[1]]
    flip_jpeg_bytes(shard)  # changed, and its mtime put back: its ctime still tells
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    with pytest.raises(DataError, match="sha256 differs"):
        dataset.open_split(data, "val")
    assert not (tmp_path / "xdg").exists()  # the folder was writable: nothing in the user's cache


def test_just_written_shards_are_hashed_again(train_data, tmp_path, monkeypatch):
    """A shard changed within the clock's granularity of its verification would keep its mtime, so a
    shard younger than a few seconds when hashed is not remembered (git's "racy clean" rule)."""

    data = copy_data(train_data, tmp_path / "d")  # ctime: now
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    newest = max(max(p.stat().st_ctime_ns, p.stat().st_mtime_ns) for p in data.glob("*.tar"))
    monkeypatch.setattr(dataset, "_now_ns", lambda: newest + 1)  # hashed just after the copy, however slow it was
    hashes = Hashes(monkeypatch)
    dataset.open_split(data, "val")
    dataset.open_split(data, "val")
    assert len(hashes.take()) == 4


def test_a_read_only_data_folder_is_remembered_in_the_users_cache(train_data, tmp_path, monkeypatch):
    import hashlib
    import time

    data = copy_data(train_data, tmp_path / "d")
    (data / dataset.VERIFIED_FILE).unlink(missing_ok=True)  # copied along, if earlier tests verified train_data
    real = dataset.write_json

    def read_only(path, obj, *a, **k):  # tests run as root here, so chmod would not stop a write
        if Path(path).parent == data:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, obj, *a, **k)

    monkeypatch.setattr(dataset, "write_json", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(dataset, "_now_ns", lambda: time.time_ns() + 10 ** 10)
    hashes = Hashes(monkeypatch)
    dataset.open_split(data, "val")
    assert len(hashes.take()) == 2 and not (data / dataset.VERIFIED_FILE).exists()
    user = tmp_path / "xdg" / "alexcli" / "verified" / (hashlib.sha256(str(data.resolve()).encode()).hexdigest()
                                                       + ".json")
    assert user.is_file() and set(json.loads(user.read_text())["shards"]) == {"val-000000.tar", "val-000001.tar"}
    dataset.open_split(data, "val")
    assert hashes.take() == []
    # neither place writable: not an error, only slower next time
    monkeypatch.setenv("XDG_CACHE_HOME", str(data / "dataset.json"))  # a file: no folder can be made in it
    dataset.open_split(data, "val")
    dataset.open_split(data, "val")
    assert len(hashes.take()) == 4


def test_verification_reports_its_progress(train_data, tmp_path):
    from alexcli.events import Advance, Begin

    data = copy_data(train_data, tmp_path / "d")
    events = []
    dataset.open_split(data, "val", progress=events.append)
    assert events[0] == Begin("verify val", 2, unit="shards") and events[1:] == [Advance(1), Advance(1)]


def test_undecodable_jpeg_names_its_shard_and_key(train_data, tmp_path):
    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000001.tar"
    key, off, size = jpeg_members(shard)[2]
    raw = bytearray(shard.read_bytes())
    raw[off:off + size] = b"\0" * size  # not a JPEG any more, same size
    shard.write_bytes(bytes(raw))
    split = dataset.open_split(data, "val", verify=False)
    for workers in (0, 1):
        with pytest.raises(DataError) as err:
            list(stream.batches(split, 4, train=False, workers=workers))
        assert str(err.value).startswith(f"{shard}: sample {key}: undecodable JPEG (")
    import itertools

    got = list(itertools.islice(stream.ShardStream(split, 4, train=True, buffer=1), 10))  # training, too
    assert isinstance(got[-1], stream._Failure)
    assert got[-1].message.startswith(f"{shard}: sample {key}: undecodable JPEG (")


@pytest.mark.parametrize("decode", ["device", "mixed"])
def test_an_image_decoded_on_the_device_is_named_when_it_fails(train_data, tmp_path, decode):
    """--decode device or mixed: a JPEG that the device's decoder refuses (here torchvision's on the
    CPU, nvJPEG on a GPU) is a DataError naming its shard and key, as with PIL in the loader; it was
    `internal: RuntimeError: decode_jpeg, .../decode_jpeg.cpp:171, Not a JPEG file` (exit 1)."""
    data = copy_data(train_data, tmp_path / "d")
    shard = data / "val-000000.tar"
    key, off, size = jpeg_members(shard)[0]  # the first of the first batch: packed in both modes
    raw = bytearray(shard.read_bytes())
    raw[off:off + size] = b"\0" * size
    shard.write_bytes(bytes(raw))
    split = dataset.open_split(data, "val", verify=False)
    images, _ = next(iter(stream.batches(split, 4, train=False, workers=0, decode=decode, share=0.5)))
    with pytest.raises(DataError) as err:
        stream.images_on(images, "cpu")
    assert str(err.value) == f"{shard}: sample {key}: undecodable JPEG on cpu (Not a JPEG file: starts with 0x00 0x00)"


def test_an_image_of_another_size_decoded_on_the_device_is_named():
    from PIL import Image

    from alexcli.data.image import ImageParams, encode

    jpgs = [encode(Image.new("RGB", (s, s), (200, 30, 90)), ImageParams(size=s)) for s in (16, 16, 24)]
    stream.images_on(stream.pack(jpgs[:2], ["a", "b"], 16), "cpu")
    with pytest.raises(DataError, match=r"^c: a 24x24 image, but the data set's are 16x16$"):
        stream.images_on(stream.pack(jpgs, ["a", "b", "c"], 16), "cpu")
    with pytest.raises(DataError, match=r"^a: a 16x16 image, but the data set's are 24x24$"):
        stream.images_on(stream.pack(jpgs, ["a", "b", "c"], 24), "cpu")


def test_default_loader_workers_share_one_machines_cores_among_its_own_ranks(monkeypatch):
    """Under torchrun on several machines, a machine's cores go to the ranks on it (LOCAL_WORLD_SIZE),
    not to the whole world: 2 nodes x 8 GPUs on 72 cores give each rank 8 loader processes."""
    from types import SimpleNamespace

    from alexcli.data import stream

    monkeypatch.setattr(stream, "cpu_cores", lambda: 72)
    split = SimpleNamespace(shards=[{}] * 1000)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert stream.loader_workers(split, 8, "cuda") == 8  # one machine, 8 ranks: 9 cores each, all but one
    assert stream.loader_workers(split, 16, "cuda") == 3  # 16 ranks assumed on this machine: 4 cores each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # without RANK and WORLD_SIZE not torchrun's: ignored
    assert stream.loader_workers(split, 16, "cuda") == 3
    monkeypatch.setenv("RANK", "9")  # rank 9 of torchrun's 2 nodes x 8
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert stream.loader_workers(split, 16, "cuda") == 8
    assert stream.loader_workers(split, 16, "cpu") == 2  # a quarter of the 9 cores on the CPU
    assert stream.loader_workers(SimpleNamespace(shards=[{}] * 40), 16, "cuda") == 2  # 40 shards for 16 ranks
    assert stream.loader_workers(split, 16, "cuda", requested=5) == 5
