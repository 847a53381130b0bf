"""Batches from a prepared split: the one shard stream behind train, eval, experiment and neighbors.

The stream only reads and decodes: each sample's JPEG becomes a uint8 (3, H, W) image and the
batch goes to the device, where `alexcli.transforms` crops, flips, adds colour noise and subtracts
the mean (section 4.1 on whole batches, as airbench and FFCV do).

Training order is a pure function of (seed, epoch, rank, worker): shards are dealt to
rank x worker slots from a per-epoch permutation, each slot cycles over its shards with a seeded
buffer shuffle, and every rank takes exactly `steps_per_epoch` batches. So every rank runs the
same number of steps (no DDP hang at an epoch end), and a run resumed at an epoch boundary reads
exactly what the uninterrupted run read. A run resumed at step S of an epoch skips the first S
batches without decoding them (`skip`): batch i of a rank comes from its loader worker i mod W. Evaluation reads each shard of a slot once, in order.
Each shard's sample count is checked against dataset.json as it is read: a shard cut short is an
error naming it, never a silent short epoch. A split at a URL (`--data https://...`, s3://,
pipe:) reads the same way: each loader process streams its own shards (`Split.path` gives a
`RemoteShard`), each checked against its bytes and sha256 before its first sample is used. An error in a loader process travels to the main
process as a value and is raised there as one DataError, not a DataLoader traceback.
"""

from __future__ import annotations

import random
import signal
from typing import Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexcli.data.dataset import Split
from alexcli.data.image import decode_rgb
from alexcli.data.tar import read_samples
from alexcli.env import cpu_cores, die_with_parent, torchrun_world
from alexcli.errors import DataError

SHUFFLE_BUFFER = 2000  # samples held for the in-worker shuffle (about 20 KB of JPEG each at 256x256)
MAX_GPU_LOADER_WORKERS = 8


class Where(NamedTuple):
    """Where a keyed batch's images come from: one shard, consecutive positions in it."""

    shard: int                # index into split.shards
    positions: torch.Tensor   # (B,) int64, position of each sample in its shard
    keys: list                # the samples' keys


class _Failure:
    """An error found in a loader process, carried to the main process as a value."""

    def __init__(self, message: str):
        self.message = message


def _undecodable(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image PIL recognises"
    return str(exc) or type(exc).__name__


def _wrong_size(where: str, width: int, height: int, size) -> DataError:
    """The one wording for a decoded image that is not the data set's SIZE (a side, or "WxH")."""
    side = f"{size}x{size}" if isinstance(size, int) else size
    return DataError(f"{where}: a {width}x{height} image, but the data set's are {side}")


def decode_batch(jpgs: list[bytes], sources: list[str] | None = None, size: int | None = None) -> torch.Tensor:
    """JPEG bytes -> uint8 (B, 3, H, W), each decoded by `decode_rgb` (pillow-simd, the pixels
    prepare's statistics were computed on) straight into the batch. The memory is (B, H, W, 3), so
    the result has channels-last strides (what `--channels-last` wants on a GPU; `.contiguous()`
    gives NCHW).

    SOURCES names each image for errors (`<shard>: sample <key>`): an image that does not decode,
    or is not SIZE x SIZE (when given) or the batch's first image's size, is a DataError naming it."""
    out = arr = None
    for i, jpg in enumerate(jpgs):
        where = sources[i] if sources is not None else f"image {i} of the batch"
        try:
            a = decode_rgb(jpg)
        except MemoryError:
            raise
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            raise DataError(f"{where}: undecodable JPEG ({_undecodable(exc)})") from None
        if size is not None and a.shape != (size, size, 3):
            raise _wrong_size(where, a.shape[1], a.shape[0], size)
        if out is None:
            out = torch.empty(len(jpgs), *a.shape, dtype=torch.uint8)
            arr = out.numpy()
        if a.shape != arr.shape[1:]:
            raise DataError(f"{where}: images of different sizes in one batch ({a.shape[1]}x{a.shape[0]} and "
                            f"{arr.shape[2]}x{arr.shape[1]}): not a prepared data set")
        arr[i] = a
    return out.permute(0, 3, 1, 2)


class Packed(NamedTuple):
    """A batch decoded where training runs (--decode device, mixed; `images_on`): its first
    len(offsets) - 1 images as JPEG bytes, then REST, the others already decoded in the loader."""

    data: torch.Tensor            # the JPEGs' bytes, one after the other (uint8)
    offsets: torch.Tensor         # (n + 1,) int64: where each starts, then the end
    sources: list                 # each packed image's name for errors ("<shard>: sample <key>")
    size: int | None = None       # the data set's image side, checked after decoding
    rest: torch.Tensor | None = None


def pack(jpgs: list[bytes], sources: list[str] | None = None, size: int | None = None,
         rest: torch.Tensor | None = None) -> Packed:
    """JPEGs as one uint8 tensor and their offsets, for `images_on` to decode on the device."""
    offsets = torch.tensor([0] + [len(j) for j in jpgs]).cumsum(0)
    names = sources if sources is not None else [f"image {i} of the batch" for i in range(len(jpgs))]
    return Packed(torch.frombuffer(bytearray(b"".join(jpgs)), dtype=torch.uint8), offsets, names, size, rest)


def device_count(batch: int, share: float) -> int:
    """How many of a BATCH-image batch `--decode mixed` decodes on the device: the first
    round(share x batch), by position in the batch (the stream's seeded order). A fixed rule, not
    one that follows the timing, so a run reads the same pixels every time on the same hardware."""
    return min(batch, max(0, round(share * batch)))


def images_on(images, device, non_blocking: bool = True) -> torch.Tensor:
    """uint8 (B, 3, H, W) images on DEVICE, from a decoded batch or from a `Packed` one, whose JPEGs
    are decoded there: with nvJPEG on a GPU (torchvision.io.decode_jpeg), so the loader's processes
    only read and shuffle; a mixed batch's REST (decoded in the loader) follows them. nvJPEG's
    pixels are not PIL's (which prepare's statistics used): on 128 ImageNet photos 34% of the values
    differ, by 0.84 levels on average and up to 77 (chroma upsampling; docs/design.md). An image
    that does not decode, or not to the data set's size, is a DataError naming it."""
    if not isinstance(images, Packed):
        return images.to(device, non_blocking=non_blocking)
    first = _decode_packed(images, torch.device(device))
    if images.rest is None:
        return first
    return torch.cat([first, images.rest.to(device, non_blocking=non_blocking)])


def _decode_packed(p: Packed, device: torch.device) -> torch.Tensor:
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    parts = [p.data[int(a):int(b)] for a, b in zip(p.offsets[:-1], p.offsets[1:])]
    if device.type == "cuda":
        # nvJPEG's batched hardware decode does not wait for the work queued on the stream it is
        # given: it can write its output into memory the caching allocator has just handed back
        # while queued kernels still read it (pytorch/vision PR 9606, meta-pytorch/torchcodec PR
        # 1634: 134 of 200 iterations corrupted on an H100). Draining the stream first, as those
        # fixes do, costs nothing measurable: the decode synchronises the same stream when it ends.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image codecs deprecated
        try:
            decoded = decode_jpeg(parts, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # which one: each on its own, once (a batch that fails is rare)
            for part, where in zip(parts, p.sources):
                try:
                    decode_jpeg(part, mode=ImageReadMode.RGB, device=device)
                except RuntimeError as exc:
                    reason = (str(exc).strip().splitlines() or ["?"])[-1].split(", ")[-1]
                    raise DataError(f"{where}: undecodable JPEG on {device} ({reason})") from None
            raise
    want = (3, p.size, p.size) if p.size else decoded[0].shape
    for img, where in zip(decoded, p.sources):
        if img.shape != want:
            raise _wrong_size(where, img.shape[2], img.shape[1], p.size or f"{want[2]}x{want[1]}")
    return torch.stack(decoded)


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
    shard of this rank once, in order, the last batch possibly short. keyed=True (evaluation only):
    a batch never spans two shards and comes with its `Where`, as a third element."""

    def __init__(self, split: Split, batch: int, *, train: bool, rank: int = 0, world: int = 1,
                 seed: int = 0, epoch: int = 0, buffer: int = SHUFFLE_BUFFER, decode: str = "cpu",
                 share: float = 0.5, keyed: bool = False, skip: int = 0):
        if keyed and train:
            raise ValueError("keyed batches are for evaluation (train=False)")
        self.split, self.batch, self.train, self.decode, self.keyed = split, batch, train, decode, keyed
        self.share = share  # decode="mixed": the part of each batch decoded on the device
        self.rank, self.world, self.seed, self.epoch, self.buffer = rank, world, seed, epoch, buffer
        self.skip = skip  # batches of this rank already trained on (a run resumed mid-epoch)

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + wid, self.world * workers

    def _shard(self, i: int):
        entry = self.split.shards[i]
        return read_samples(self.split.path(entry), entry["samples"])

    def _train_samples(self, slot: int, slots: int):
        order = list(range(len(self.split.shards)))
        random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        mine = order[slot::slots]
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}/{slots}")
        while True:  # cycle: a slot whose shards run out keeps going until the rank has its steps
            rng.shuffle(mine)
            for i in mine:
                for s in self._shard(i):
                    yield i, 0, s

    def _eval_samples(self, slot: int, slots: int):
        for i in range(slot, len(self.split.shards), slots):
            for pos, s in enumerate(self._shard(i)):
                yield i, pos, s

    def _batch(self, buf: list):
        jpgs = [s.jpg for _, _, s in buf]
        # the first ON_DEVICE images go packed, to be decoded where training runs (images_on)
        if self.decode == "mixed":
            on_device = device_count(len(buf), self.share)
        else:
            on_device = len(buf) if self.decode == "device" else 0
        sources = [f"{self.split.path(self.split.shards[i])}: sample {s.key}" for i, _, s in buf]
        rest = None
        if on_device < len(buf):
            rest = decode_batch(jpgs[on_device:], sources[on_device:], self.split.size)
        images = rest if not on_device else pack(jpgs[:on_device], sources[:on_device], self.split.size, rest)
        labels = torch.tensor([s.label for _, _, s in buf])
        if labels.min() < 0 or labels.max() >= len(self.split.classes):
            i, _, bad = next(b for b in buf if not 0 <= b[2].label < len(self.split.classes))
            raise DataError(f"{self.split.path(self.split.shards[i])}: sample {bad.key}: class {bad.label}, but "
                            f"dataset.json lists {len(self.split.classes)} classes (edited or from another data set)")
        if not self.keyed:
            return images, labels
        return images, labels, Where(buf[0][0], torch.tensor([p for _, p, _ in buf]), [s.key for _, _, s in buf])

    def __iter__(self):
        info = get_worker_info()
        if info is not None:  # a decoding process: leave the cores to the others
            torch.set_num_threads(1)
            # SIGINT and SIGTERM are for the main process, which saves the run's position and stops
            # the workers; a worker dying of them first would turn that stop into a DataLoader error.
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            die_with_parent()  # kill -9 of the run takes its loader processes with it at once
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        skip = len(range(wid, self.skip, workers))  # the rank's batch i comes from worker i mod W
        slot, slots = self._slot()
        if self.train:
            items = _buffer_shuffle(self._train_samples(slot, slots),
                                    random.Random(f"{self.seed}/{self.epoch}/{slot}/buffer"), self.buffer)
        else:
            items = self._eval_samples(slot, slots)
        buf = []
        try:
            for item in items:
                if buf and self.keyed and item[0] != buf[0][0]:  # a keyed batch stays within its shard
                    yield self._batch(buf)
                    buf = []
                buf.append(item)
                if len(buf) == self.batch:
                    if skip:  # trained on before the run was stopped: not decoded again
                        skip -= 1
                    else:
                        yield self._batch(buf)
                    buf = []
            if buf:
                yield self._batch(buf)
        except DataError as exc:
            yield _Failure(str(exc))
        except (OSError, ValueError) as exc:  # a shard's bytes (an undecodable JPEG is a DataError naming it)
            yield _Failure(f"{self.split.folder}: unreadable {self.split.name} shard ({exc})")


def steps_per_epoch(split: Split, batch: int, world: int) -> int:
    """Batches every rank takes per epoch: the paper's epoch is one pass over the training set."""
    return max(1, split.samples // (batch * world))


def check_slots(split: Split, world: int, workers: int) -> None:
    if len(split.shards) < world * max(1, workers):
        raise DataError(f"{split.folder}: {len(split.shards)} {split.name} shards cannot feed {world} rank(s) x "
                        f"{max(1, workers)} loader worker(s); use fewer --loader-workers or prepare with a "
                        f"smaller --shard-size")


def loader_workers(split: Split, world: int, device_type: str, requested: int = -1) -> int:
    """Decoding processes per rank: REQUESTED when it is 0 or more; by default, on a GPU all cores
    but one per rank (at most 8), on the CPU a quarter of them, since the model's arithmetic needs
    the rest (on 2 cores, decoding in the main process was twice as fast as 2 workers); never more
    than there are shards per rank."""
    if requested >= 0:
        return requested
    # The ranks on this machine share its cores: torchrun says how many there are (several
    # machines); alexcli's own --gpus launcher runs them all here.
    local = (torchrun_world() or (world, world))[1]
    cores = max(1, cpu_cores() // max(1, min(local, world)))
    wanted = min(MAX_GPU_LOADER_WORKERS, cores - 1) if device_type == "cuda" else cores // 4
    return max(0, min(wanted, len(split.shards) // world))


def batches(split: Split, batch: int, *, train: bool, workers: int, rank: int = 0, world: int = 1,
            seed: int = 0, epoch: int = 0, pin: bool = False, limit: int | None = None,
            decode: str = "cpu", share: float = 0.5, keyed: bool = False, skip: int = 0) -> Iterator:
    """Iterate a split's batches; with train=True exactly LIMIT of them (steps_per_epoch), after
    SKIP batches already trained on. decode="device" yields pack()ed JPEGs for images_on() to decode
    on the training device; decode="mixed" packs the first SHARE of each batch (`device_count`) and
    decodes the rest."""
    if train:
        check_slots(split, world, workers)
    stream = ShardStream(split, batch, train=train, rank=rank, world=world, seed=seed, epoch=epoch, decode=decode,
                         share=share, keyed=keyed, skip=skip)
    # The loader's own generator: otherwise starting it draws from torch's global generator, which
    # dropout uses, so a run resumed mid-epoch (which starts the loader later) would drift. The
    # stream's randomness comes from its (seed, epoch, slot) alone.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin,
                        prefetch_factor=4 if workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
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
