"""Reading prepared shards for training and evaluation, with webdataset's tar reader.

The loader only decodes: each sample's 256x256 JPEG becomes a uint8 (3, H, W) tensor and the
batch goes to the device, where `alexcli.augment` crops, flips, adds colour noise and subtracts
the mean (section 4.1 on whole batches, as airbench and FFCV do).

Training order is a pure function of (seed, epoch, rank, worker): shards are dealt to
rank x worker slots from a per-epoch permutation, each slot cycles over its shards with a seeded
buffer shuffle, and every rank takes exactly `steps_per_epoch` batches. So every rank runs the
same number of steps (no DDP hang at an epoch end), and a run resumed at an epoch boundary reads
exactly what the uninterrupted run read. Each shard's sample count is checked against
dataset.json as it is read: a shard cut short is an error naming it, never a silent short epoch.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexcli.data.shards import MANIFEST, read_manifest, verify_shard
from alexcli.data.stats import STATS_FILE, load as load_stats
from alexcli.errors import DataError

SHUFFLE_BUFFER = 2000  # samples held for the in-worker shuffle (about 20 KB of JPEG each at 256x256)


@dataclass
class Split:
    """One split of a prepared data set, as dataset.json describes it."""

    folder: Path
    name: str
    shards: list[dict]        # {"name", "samples", "bytes", "sha256"}
    classes: list[str]
    size: int                 # side of the stored images

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)


def open_split(folder: str | Path, split: str) -> Split:
    """The split's shards, each checked to exist with the size dataset.json gives (cheap: a stat)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (prepare one with `alexcli prepare SRC --out {folder}`)")
    manifest = read_manifest(folder)
    splits = manifest.get("splits", {})
    if split not in splits or not splits[split]["shards"]:
        have = ", ".join(k for k, v in splits.items() if v.get("shards")) or "none"
        raise DataError(f"{folder}: no {split!r} split in {MANIFEST} (splits: {have})")
    entries = splits[split]["shards"]
    for entry in entries:
        verify_shard(folder, entry)
    return Split(folder, split, entries, list(manifest["classes"]), int(manifest["parameters"]["size"]))


def load_data_stats(folder: str | Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (run `alexcli prepare` again to write it)")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_stats(path).items()}


class _Failure:
    """An error found in a worker process, carried to the main process as a value so it arrives as
    one clean DataError instead of a DataLoader traceback."""

    def __init__(self, message: str):
        self.message = message


def decode_batch(jpgs: list[bytes]) -> torch.Tensor:
    """JPEG bytes -> uint8 (B, 3, H, W), decoded with the same PIL (pillow-simd) that prepare used,
    so the network sees exactly the pixels the mean image and PCA were computed on. Each image is
    written once, straight into the batch: the memory is (B, H, W, 3), so the result has
    channels-last strides (what `--channels-last` wants on a GPU; `.contiguous()` gives NCHW)."""
    from PIL import Image

    out = None
    for i, jpg in enumerate(jpgs):
        with Image.open(io.BytesIO(jpg)) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            if out is None:
                out = torch.empty(len(jpgs), im.height, im.width, 3, dtype=torch.uint8)
                arr = out.numpy()
            if im.size != (arr.shape[2], arr.shape[1]):
                raise DataError(f"images of different sizes in one batch ({im.size} and "
                                f"{(arr.shape[2], arr.shape[1])}): not a prepared data set")
            arr[i] = np.asarray(im)
    return out.permute(0, 3, 1, 2)


def _plain_ustar(h: bytes) -> bool:
    """A plain USTAR header of a regular file, as prepare writes them."""
    return len(h) == 512 and h[257:262] == b"ustar" and h[156] in (0x30, 0)


def _ustar_members(data: bytes, path: str) -> Iterator[dict]:
    """The members of a tar written by `alexcli prepare` (plain USTAR headers, regular files), as
    webdataset's tar_file_iterator yields them. Parsing the 512-byte headers directly costs about
    5 us a member against tarfile's 130 us, which was 40% of the loader's time per image. A shard
    that starts otherwise (PAX or GNU headers from other tools) is read with tarfile instead; one
    that changes format midway is an error."""
    off, n = 0, len(data)
    while off + 512 <= n:
        h = data[off:off + 512]
        if not any(h):
            return  # end-of-archive blocks
        if not _plain_ustar(h):
            raise DataError(f"{path}: unexpected tar header at byte {off} (not a shard written by prepare)")
        if int(h[148:156].strip(b"\0 ") or b"0", 8) != sum(h) - sum(h[148:156]) + 256:
            raise DataError(f"{path}: damaged tar header at byte {off}")
        name = h[:100].rstrip(b"\0").decode("utf-8")
        prefix = h[345:500].rstrip(b"\0")
        if prefix:
            name = prefix.decode("utf-8") + "/" + name
        size = int(h[124:136].strip(b"\0 ") or b"0", 8)
        if off + 512 + size > n:
            raise DataError(f"{path}: member {name} runs past the end of the file (truncated)")
        yield {"fname": name, "data": data[off + 512:off + 512 + size], "__url__": path}
        off += 512 + (size + 511) // 512 * 512


def _samples(split: Split, entry: dict) -> Iterator[tuple[bytes, int]]:
    """(jpg bytes, class) of one shard: members grouped into samples by webdataset's group_by_keys
    (its key rules), read by the USTAR fast path or webdataset's tar reader; the sample count is
    checked against dataset.json at the end."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = split.folder / entry["name"]
    data = path.read_bytes()
    if _plain_ustar(data[:512]):
        members = _ustar_members(data, str(path))
    else:  # not written by prepare: webdataset's own tar reader
        members = tar_file_expander([{"url": str(path), "stream": io.BytesIO(data)}])
    n = 0
    for sample in group_by_keys(members):
        if "jpg" not in sample or "cls" not in sample:
            raise DataError(f"{path}: sample {sample.get('__key__')!r} lacks jpg or cls")
        n += 1
        yield sample["jpg"], int(sample["cls"])
    if n != entry["samples"]:
        raise DataError(f"{path}: {n} samples read, but {MANIFEST} says {entry['samples']} (truncated or replaced)")


def _buffer_shuffle(items: Iterator, rng: random.Random, size: int) -> Iterator:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardStream(IterableDataset):
    """Batches (uint8 images (B, 3, H, W), int64 labels (B,)) from one rank's share of a split.

    train=True: shuffled, endless (the caller takes `steps_per_epoch` batches); train=False: each
    shard of this rank once, in order, the last batch possibly short."""

    def __init__(self, split: Split, batch: int, *, train: bool, rank: int = 0, world: int = 1,
                 seed: int = 0, epoch: int = 0, buffer: int = SHUFFLE_BUFFER, decode: str = "cpu"):
        self.split, self.batch, self.train, self.decode = split, batch, train, decode
        self.rank, self.world, self.seed, self.epoch, self.buffer = rank, world, seed, epoch, buffer

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + wid, self.world * workers

    def _train_samples(self, slot: int, slots: int) -> Iterator[tuple[bytes, int]]:
        order = list(range(len(self.split.shards)))
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        mine = order[slot::slots]
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{slots}")
        while True:  # cycle: a slot whose shards run out keeps going until the rank has its steps
            rng.shuffle(mine)
            for i in mine:
                yield from _samples(self.split, self.split.shards[i])

    def __iter__(self):
        if get_worker_info() is not None:  # a decoding process: leave the cores to the others
            torch.set_num_threads(1)
        slot, slots = self._slot()
        if self.train:
            items = _buffer_shuffle(self._train_samples(slot, slots),
                                    random.Random(f"{self.seed}/{self.epoch}/{slot}/buffer"), self.buffer)
        else:
            items = (s for i in range(slot, len(self.split.shards), slots) for s in _samples(self.split, self.split.shards[i]))
        jpgs, labels = [], []
        try:
            for jpg, label in items:
                jpgs.append(jpg)
                labels.append(label)
                if len(jpgs) == self.batch:
                    yield self._images(jpgs), torch.tensor(labels)
                    jpgs, labels = [], []
            if jpgs:
                yield self._images(jpgs), torch.tensor(labels)
        except DataError as exc:
            yield _Failure(str(exc))
        except OSError as exc:  # PIL on a corrupt JPEG
            yield _Failure(f"{self.split.folder}: undecodable image in a {self.split.name} shard ({exc})")


    def _images(self, jpgs: list[bytes]):
        return decode_batch(jpgs) if self.decode == "cpu" else pack(jpgs)


DECODE = ("cpu", "device")


def pack(jpgs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of undecoded JPEGs as one uint8 tensor and the offsets of each (for --decode device)."""
    offsets = torch.tensor([0] + [len(j) for j in jpgs]).cumsum(0)
    return torch.frombuffer(bytearray(b"".join(jpgs)), dtype=torch.uint8), offsets


def images_on(images, device, non_blocking: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W) images on DEVICE, from a decoded batch or from pack()ed JPEGs, which are
    decoded there: with nvJPEG on a GPU (torchvision.io.decode_jpeg), so the loader's processes
    only read and shuffle. nvJPEG's pixels can differ from PIL's (which prepare's statistics used)
    by a level or two in places."""
    if not isinstance(images, (tuple, list)):
        return images.to(device, non_blocking=non_blocking)
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    data, offsets = images
    parts = [data[int(a):int(b)] for a, b in zip(offsets[:-1], offsets[1:])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image codecs deprecated
        decoded = decode_jpeg(parts, mode=ImageReadMode.RGB, device=torch.device(device))
    return torch.stack(decoded)


def steps_per_epoch(split: Split, batch: int, world: int) -> int:
    """Batches every rank takes per epoch: the paper's epoch is one pass over the training set."""
    return max(1, split.samples // (batch * world))


def check_slots(split: Split, world: int, workers: int) -> None:
    if len(split.shards) < world * max(1, workers):
        raise DataError(f"{split.folder}: {len(split.shards)} {split.name} shards cannot feed {world} rank(s) x "
                        f"{max(1, workers)} loader worker(s); use fewer --loader-workers or prepare with a "
                        f"smaller --shard-size")


def auto_workers(split: Split, world: int, wanted: int) -> int:
    """The most loader workers (up to WANTED) for which every slot has a shard."""
    return max(0, min(wanted, len(split.shards) // world))


def batches(split: Split, batch: int, *, train: bool, workers: int, rank: int = 0, world: int = 1,
            seed: int = 0, epoch: int = 0, pin: bool = False, limit: int | None = None,
            decode: str = "cpu") -> Iterator:
    """Iterate a split's batches; with train=True exactly LIMIT of them (steps_per_epoch).
    decode="device" yields pack()ed JPEGs for images_on() to decode on the training device."""
    if train:
        check_slots(split, world, workers)
    stream = ShardStream(split, batch, train=train, rank=rank, world=world, seed=seed, epoch=epoch, decode=decode)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    it = iter(loader)
    try:
        n = 0
        for item in it:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            yield item
            n += 1
            if limit is not None and n >= limit:
                break
    finally:
        del it  # stops the workers of an endless training stream
