"""A prepared data set as every stage sees it: dataset.json, its splits and shards, the statistics.

`open_split` is how train, eval, experiment and the figures get at shards: it reads the manifest and
checks that every shard of the split exists with the size the manifest gives (a stat per shard);
the reader (`alexcli.data.tar.read_samples`) then checks each shard's sample count as it reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from alexcli.data.stats import STATS_FILE
from alexcli.data.tar import count_samples
from alexcli.errors import DataError

MANIFEST = "dataset.json"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST} (prepare a data set with `alexcli prepare SRC --out {folder}`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def has_split(manifest: dict, split: str) -> bool:
    return bool(manifest.get("splits", {}).get(split, {}).get("shards"))


def class_names(meta: dict) -> list[str]:
    """Readable class names of a manifest or a checkpoint's metadata (the class ids where none)."""
    return list(meta.get("class_names") or meta["classes"])


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(folder: Path, entry: dict, *, full: bool = False) -> None:
    """Raise DataError if the shard's size (and with `full`, its sha256 and sample count)
    disagree with its manifest entry."""
    path = Path(folder) / entry["name"]
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes, but {MANIFEST} says {entry['bytes']} (truncated or replaced)")
    if full:
        if sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced)")
        n = count_samples(path)
        if n != entry["samples"]:
            raise DataError(f"{path}: {n} samples, but {MANIFEST} says {entry['samples']}")


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

    def path(self, entry: dict) -> Path:
        return self.folder / entry["name"]


def open_split(folder: str | os.PathLike, split: str) -> Split:
    """The split's shards, each checked to exist with the size dataset.json gives (cheap: a stat)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder (prepare one with `alexcli prepare SRC --out {folder}`)")
    manifest = read_manifest(folder)
    splits = manifest.get("splits", {})
    if not has_split(manifest, split):
        have = ", ".join(k for k, v in splits.items() if v.get("shards")) or "none"
        raise DataError(f"{folder}: no {split!r} split in {MANIFEST} (splits: {have})")
    entries = splits[split]["shards"]
    for entry in entries:
        verify_shard(folder, entry)
    return Split(folder, split, entries, list(manifest["classes"]), int(manifest["parameters"]["size"]))


def load_stats(folder: str | os.PathLike) -> dict:
    """The data set's stats.safetensors as float64 torch tensors (mean image, RGB PCA, ...)."""
    import numpy as np
    import torch

    from alexcli.data.stats import load

    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing (run `alexcli prepare` again to write it)")
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load(path).items()}
