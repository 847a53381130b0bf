"""A prepared split decoded once into memory as one uint8 tensor (small data sets: CIFAR-10).

At 32x32 a JPEG decodes in about 20 us but a training step on 128 of them takes tens of ms, so
decoding every epoch would cost little; what costs is the per-sample Python of a streaming
loader. Held as one (N, 3, S, S) uint8 tensor on the training device (airbench's approach), an
epoch is a permutation and one gather per batch: the loop is bound by the model's arithmetic.
The split may be at a URL (`alexcli.data.remote`): its shards are streamed once, checked, decoded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
import torch

from alexcli.data.dataset import open_split
from alexcli.data.stream import decode_batch
from alexcli.data.tar import read_samples
from alexcli.errors import UsageError
from alexcli.events import Advance, Begin, Progress, ignore

MAX_SHARE_OF_MEMORY = 0.5  # refuse a split that would take more than this share of free memory


@dataclass
class InMemory:
    images: torch.Tensor   # (N, 3, S, S) uint8, contiguous
    labels: torch.Tensor   # (N,) int64
    classes: list[str]
    split: str

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "InMemory":
        return InMemory(self.images.to(device), self.labels.to(device), self.classes, self.split)


def _free_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_split(folder, split: str, *, limit: int = 0, progress: Progress = ignore, verify: bool = True) -> InMemory:
    """The first LIMIT samples (0: all) of SPLIT in shard order, decoded as the shard stream decodes
    them (each shard's sha256 checked first unless VERIFY is off). prepare shuffles the training
    split before sharding, so its first LIMIT samples are a random subset."""
    s = open_split(folder, split, verify=verify, progress=progress)
    n = min(limit, s.samples) if limit > 0 else s.samples
    need = n * 3 * s.size * s.size
    free = _free_bytes()
    if free is not None and need > MAX_SHARE_OF_MEMORY * free:
        raise UsageError(f"{folder}: {n:,} {split} images of {s.size}x{s.size} need {need / 2**30:.1f} GiB in memory, "
                         f"more than half of the {free / 2**30:.1f} GiB free; use --subset, or `alexcli train`, "
                         f"which streams from the shards")
    images = torch.empty(n, s.size, s.size, 3, dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    done, chunk, jpgs = 0, 1024, []
    progress(Begin(f"decode {split} into memory", n))

    def flush():
        nonlocal done, jpgs
        if jpgs:
            images[done:done + len(jpgs)] = decode_batch([j for j, _, _ in jpgs], [w for _, _, w in jpgs],
                                                         s.size).permute(0, 2, 3, 1)
            labels[done:done + len(jpgs)] = torch.tensor([c for _, c, _ in jpgs])
            done += len(jpgs)
            progress(Advance(len(jpgs)))
            jpgs = []

    for entry in s.shards:
        for sample in read_samples(s.path(entry), entry["samples"]):
            jpgs.append((sample.jpg, sample.label, f"{s.path(entry)}: sample {sample.key}"))
            if done + len(jpgs) == n:
                break
            if len(jpgs) == chunk:
                flush()
        flush()
        if done == n:
            break
    return InMemory(images.permute(0, 3, 1, 2).contiguous(), labels, list(s.classes), split)
