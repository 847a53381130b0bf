"""The archives users download, read in place: nothing is extracted to disk.

(Being written: ILSVRC-2012's tars, the Kaggle zip, CIFAR-10/100 python and binary batches.)

The contract with scan and prepare:
- `scan_archive(root)` -> a scan.Source, or None when ROOT is not an archive layout this module reads.
- `find_devkit(root)` -> Devkit or None: ILSVRC-2012's class names and validation labels.
- `ItemReader(root).read(item)` -> the item's bytes (an encoded image file) or a PIL image (pixels
  held in the item, CIFAR), or raises image.Reject. Item.where says where the item is:
    ()                                   the file ROOT/item.relpath
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alexcli.errors import DataError

# What scan_archive reads, for messages.
KNOWN = "ILSVRC2012_img_train.tar, cifar-10-python.tar.gz, ..."


@dataclass(frozen=True)
class Devkit:
    where: str                      # what the names and labels were read from, for the summary
    names: dict[str, str]           # wnid -> readable name ("tench, Tinca tinca")
    val_wnids: list[str] | None     # the validation images' wnids in file-name order, if given


def scan_archive(root: Path):
    return None


def _find(root: Path, name: str) -> Path | None:
    from alexcli.data.scan import _find as find

    return find(root, name)


def find_devkit(root: Path) -> Devkit | None:
    """The extracted devkit's data/meta.mat (+ ILSVRC2012_validation_ground_truth.txt) under ROOT."""
    gt = _find(root, "ILSVRC2012_validation_ground_truth.txt")
    meta = gt.parent / "meta.mat" if gt is not None else _find(root, "meta.mat")
    if meta is None or not meta.is_file():
        if gt is not None:
            raise DataError(f"{gt}: needs the devkit's meta.mat beside it to map ILSVRC2012_IDs to classes")
        return None
    try:
        import scipy.io
    except ImportError as exc:
        raise DataError(f"{meta}: reading meta.mat needs scipy (pip install scipy)") from exc
    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    names = {str(s["WNID"]): str(s["words"]) for s in synsets if "words" in s.dtype.names}
    wnids = [id_to_wnid[int(x)] for x in gt.read_text().split()] if gt is not None else None
    return Devkit(str(meta.relative_to(root)), names, wnids)


class ItemReader:
    """Reads items in a worker; one per worker process (it may keep archives open)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def read(self, item):
        from alexcli.data.image import MAX_SOURCE_BYTES, read_source

        if not item.where:
            return read_source(self.root / item.relpath, MAX_SOURCE_BYTES)
        raise ValueError(f"unknown item location {item.where[0]!r}")

    def close(self) -> None:
        pass
