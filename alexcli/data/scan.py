"""Find the splits, classes and files of a source image tree.

Layouts read:
  SRC/train/<class>/**/*                      required
  SRC/val/<class>/**/* , SRC/test/<class>/**/*  labelled by folder
  SRC/val/*  (flat, ImageNet)                 labelled by LOC_val_solution.csv, or by the devkit's
                                              ILSVRC2012_validation_ground_truth.txt + meta.mat
Class names come from LOC_synset_mapping.txt or words.txt when present, else the folder names.
Every file found ends up either in a split's item list or in `rejected` with a reason.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from alexcli.errors import DataError, UsageError

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Item:
    relpath: str  # relative to SRC, with forward slashes
    label: int
    nbytes: int


@dataclass
class Source:
    root: Path
    classes: list[str]
    class_names: list[str]
    splits: dict[str, list[Item]]
    rejected: list[dict] = field(default_factory=list)  # {"path", "split", "reason"}
    notes: list[str] = field(default_factory=list)  # things a user should know (skipped splits)

    def found(self, split: str) -> int:
        return len(self.splits.get(split, [])) + sum(r["split"] == split for r in self.rejected)


def _files_under(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


def _read_class_names(root: Path, classes: list[str]) -> list[str]:
    names: dict[str, str] = {}
    mapping = root / "LOC_synset_mapping.txt"
    words = root / "words.txt"
    if mapping.is_file():
        for line in mapping.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name.strip()
    elif words.is_file():
        for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, name = line.partition("\t")
            if wnid:
                names[wnid.strip()] = name.strip()
    return [names.get(c, c) for c in classes]


def _find(root: Path, name: str, depth: int = 3) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) != root and len(Path(dirpath).relative_to(root).parts) >= depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if d not in ("train", "val", "test"))
        if name in filenames:
            return Path(dirpath) / name
    return None


def _flat_val_labels(root: Path, files: list[Path]) -> dict[str, str] | None:
    """image stem -> wnid for ImageNet's flat validation folder, or None if no ground truth."""
    loc = _find(root, "LOC_val_solution.csv")
    if loc is not None:
        labels = {}
        with open(loc, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                pred = (row.get("PredictionString") or "").split()
                if row.get("ImageId") and pred:
                    labels[row["ImageId"]] = pred[0]
        return labels
    gt = _find(root, "ILSVRC2012_validation_ground_truth.txt")
    if gt is not None:
        meta = gt.parent / "meta.mat"
        if not meta.is_file():
            raise DataError(f"{gt}: needs the devkit's meta.mat beside it to map ILSVRC2012_IDs to classes")
        try:
            import scipy.io
        except ImportError as exc:
            raise DataError(f"{meta}: reading meta.mat needs scipy (pip install scipy)") from exc
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = [int(x) for x in gt.read_text().split()]
        # The ground truth lists the 50,000 images in file-name order.
        names = sorted(p.stem for p in files)
        if len(ids) != len(names):
            raise DataError(f"{gt}: has {len(ids)} labels but the flat val folder has {len(names)} files")
        return {stem: id_to_wnid[i] for stem, i in zip(names, ids)}
    return None


def hold_out(source: Source, fraction: float, seed: int) -> Source:
    """Move FRACTION of each class's training files (drawn with SEED) into a `val` split, for a
    source that has none (CIFAR-10's training folder, say): a held-out split to test on."""
    import random

    if not 0 < fraction < 1:
        raise UsageError(f"--holdout must be between 0 and 1, not {fraction}")
    if source.splits.get("val"):
        raise UsageError(f"--holdout: {source.root} already has a val split; hold out only from a source without one")
    by_class: dict[int, list[Item]] = {}
    for it in source.splits["train"]:
        by_class.setdefault(it.label, []).append(it)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda it: it.relpath)
        random.Random(f"{seed}/holdout/{label}").shuffle(items)
        n = round(len(items) * fraction)
        val += items[:n]
        train += items[n:]
    val.sort(key=lambda it: it.relpath)
    train.sort(key=lambda it: it.relpath)
    notes = source.notes + [f"val: {len(val):,} training files held out ({fraction:g} of each class, seed {seed})"]
    return Source(source.root, source.classes, source.class_names, {**source.splits, "train": train, "val": val},
                  source.rejected, notes)


def scan(src: str | os.PathLike) -> Source:
    root = Path(src)
    if not root.exists():
        raise UsageError(f"{root}: no such directory")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    train = root / "train"
    if not train.is_dir():
        raise DataError(f"{root}: no training split (expected {train}/<class>/<image>)")
    class_dirs = sorted(p for p in train.iterdir() if p.is_dir())
    classes = [p.name for p in class_dirs]
    if not classes:
        raise DataError(f"{train}: no class folders (expected {train}/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    rejected: list[dict] = []
    notes: list[str] = []
    splits: dict[str, list[Item]] = {"train": []}

    def add(split: str, path: Path, label: int) -> None:
        splits[split].append(Item(_rel(root, path), label, path.stat().st_size))

    for p in sorted(train.iterdir()):
        if p.is_file():
            rejected.append({"path": _rel(root, p), "split": "train", "reason": "not in a class folder"})
    for c in class_dirs:
        for f in _files_under(c):
            add("train", f, index[c.name])
    if not splits["train"]:
        raise DataError(f"{train}: no files in its class folders")

    for split in EVAL_SPLITS:
        folder = root / split
        if split == "val" and not folder.is_dir() and (root / "validation").is_dir():
            folder = root / "validation"
        if not folder.is_dir():
            continue
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
        loose = sorted(p for p in folder.iterdir() if p.is_file())
        splits[split] = []
        if subdirs:
            for d in subdirs:
                for f in _files_under(d):
                    if d.name in index:
                        add(split, f, index[d.name])
                    else:
                        rejected.append({"path": _rel(root, f), "split": split,
                                         "reason": f"class folder {d.name!r} is not a training class"})
            for f in loose:
                rejected.append({"path": _rel(root, f), "split": split, "reason": "not in a class folder"})
        elif loose:
            labels = _flat_val_labels(root, loose) if split == "val" else None
            if labels is None:
                del splits[split]
                notes.append(f"{split}/ skipped: {len(loose)} files in a flat folder with no labels "
                             "(no LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt found)")
                continue
            for f in loose:
                wnid = labels.get(f.stem)
                if wnid is None:
                    rejected.append({"path": _rel(root, f), "split": split, "reason": "no label in the ground truth"})
                elif wnid not in index:
                    rejected.append({"path": _rel(root, f), "split": split,
                                     "reason": f"label {wnid!r} is not a training class"})
                else:
                    add(split, f, index[wnid])
    return Source(root, classes, _read_class_names(root, classes), splits, rejected, notes)
