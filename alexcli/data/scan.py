"""Find the splits, classes and files of a source image tree.

Layouts read:
  SRC/train/<class>/**/*                      required
  SRC/val/<class>/**/* , SRC/test/<class>/**/*  labelled by folder
  SRC/val/*  (flat, ImageNet)                 labelled by LOC_val_solution.csv, or by the devkit's
                                              ILSVRC2012_validation_ground_truth.txt + meta.mat
Class names come from LOC_synset_mapping.txt or words.txt when present, else the folder names.
Every file found ends up either in a split's item list or in `rejected` with a reason.

What is listed, and the rules for odd entries (scan only stats; it never opens a file, so a FIFO
cannot block it):
- Symlinks are followed at every depth, for class folders and the folders and files inside them
  alike (a tree assembled from links to other disks is common). Each split lists a real folder,
  known by (st_dev, st_ino), once: a link back to a folder above it is a "symlink loop" reject, a
  second link to a folder already listed is a reject that names the first path.
- Only regular files (after following links) become items. Anything else is a reject with its
  reason: "dangling symlink", "symlink loop", "not a regular file (FIFO)" (or socket, character
  device: a link to /dev/zero), "unreadable: ..." when even stat fails.
- A folder that cannot be listed is one reject entry: "unreadable folder: Permission denied".
  An unreadable train/ is a DataError: without it there is nothing to prepare.
- Names that are not valid UTF-8 are rejects ("file name is not valid UTF-8"): they could not be
  written in the manifest. Their recorded path has U+FFFD for the undecodable bytes.
- A class folder with no usable file stays a class (the labels of the others do not shift) and
  gets a note: its output unit would never be trained.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
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


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def file_kind(mode: int) -> str:
    """What a non-regular st_mode is, in the words of a reject reason."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def _stat(path: Path) -> os.stat_result | str:
    """os.stat following symlinks, or the reason it failed."""
    try:
        return os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            return "dangling symlink"
        if exc.errno == errno.ENOENT:
            return "vanished while listing"
        return f"unreadable: {exc.strerror or exc}"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes of bytes that are not UTF-8
        return False


def _list(folder: Path) -> list[tuple[Path, os.stat_result | str]] | str:
    """(path, stat or reason) of each entry of FOLDER sorted by name, or why it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        return f"unreadable folder: {exc.strerror or exc}"
    return [(folder / n, _stat(folder / n)) for n in names]


def _record(rel: str) -> str:
    """A relative path as recorded in rejected.json: undecodable bytes become U+FFFD, so it is valid UTF-8."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


class _Lister:
    """Lists the folders of one split under the module's rules; odd entries go to `rejected`."""

    def __init__(self, root: Path, split: str, rejected: list[dict], split_folder: Path):
        self.root, self.split, self.rejected = root, split, rejected
        self.seen: dict[tuple[int, int], str] = {}  # real folder -> the path it was first listed at
        self.above: tuple = ()  # SRC and the split's folder: above every folder listed
        for folder, rel in ((root, "the source folder"), (split_folder, _record(_rel(root, split_folder)))):
            st = os.stat(folder)
            self.seen[(st.st_dev, st.st_ino)] = rel
            self.above += ((st.st_dev, st.st_ino),)

    def reject(self, path: Path, reason: str) -> None:
        self.rejected.append({"path": _record(_rel(self.root, path)), "split": self.split, "reason": reason})

    def entries(self, folder: Path) -> list[tuple[Path, os.stat_result | str]] | None:
        """FOLDER's entries; None (and a reject) if it cannot be listed."""
        listing = _list(folder)
        if isinstance(listing, str):
            self.reject(folder, listing)
            return None
        return listing

    def enter(self, folder: Path, st: os.stat_result, above: tuple) -> bool:
        """Whether FOLDER is to be listed: not a loop back to a folder ABOVE it, nor one already listed."""
        key = (st.st_dev, st.st_ino)
        first = self.seen.get(key)
        if first is not None:
            self.reject(folder, f"symlink loop: leads back to {first}" if key in above
                        else f"folder already listed as {first}")
            return False
        if not _utf8(folder.name):
            self.reject(folder, "folder name is not valid UTF-8")
            return False
        self.seen[key] = _record(_rel(self.root, folder))
        return True

    def files(self, folder: Path, st: os.stat_result) -> list[tuple[Path, int]]:
        """(path, size) of the regular files under FOLDER, in the order os.walk gives (each folder's
        files by name, then its subfolders by name)."""
        out: list[tuple[Path, int]] = []
        if not self.enter(folder, st, self.above):
            return out
        stack = [(folder, self.above + ((st.st_dev, st.st_ino),))]
        while stack:
            d, above = stack.pop()
            listing = self.entries(d)
            subdirs = []
            for p, est in listing or ():
                kind = self.classify(p, est)
                if kind == "folder" and self.enter(p, est, above):
                    subdirs.append((p, above + ((est.st_dev, est.st_ino),)))
                elif kind == "file":
                    out.append((p, est.st_size))
            stack.extend(reversed(subdirs))
        return out

    def top(self, folder: Path) -> tuple[list[tuple[Path, os.stat_result]], list[tuple[Path, int]]] | None:
        """A split folder's (subfolders with their stat, regular files with their size); its other
        entries are rejected. None (and a reject) if it cannot be listed."""
        listing = self.entries(folder)
        if listing is None:
            return None
        subdirs, loose = [], []
        for p, est in listing:
            kind = self.classify(p, est)
            if kind == "folder":
                subdirs.append((p, est))
            elif kind == "file":
                loose.append((p, est.st_size))
        return subdirs, loose

    def classify(self, p: Path, est: os.stat_result | str) -> str | None:
        """"folder", "file" (a regular file with a UTF-8 name), or None after rejecting the entry."""
        if isinstance(est, str):
            self.reject(p, est)
        elif stat.S_ISDIR(est.st_mode):
            return "folder"
        elif not stat.S_ISREG(est.st_mode):
            self.reject(p, f"not a regular file ({file_kind(est.st_mode)})")
        elif not _utf8(p.name):
            self.reject(p, "file name is not valid UTF-8")
        else:
            return "file"
        return None


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


def _split_folder(root: Path, name: str) -> os.stat_result | str | None:
    """The stat of SRC/NAME if it is a folder, None if there is none (or a plain file of that
    name), else why it cannot be used."""
    path = root / name
    if not os.path.lexists(path):
        return None
    st = _stat(path)
    if isinstance(st, os.stat_result) and not stat.S_ISDIR(st.st_mode):
        return None if stat.S_ISREG(st.st_mode) else f"not a folder ({file_kind(st.st_mode)})"
    return st


def scan(src: str | os.PathLike) -> Source:
    root = Path(src)
    st = _stat(root)
    if st in ("dangling symlink", "vanished while listing"):
        raise UsageError(f"{root}: no such directory")
    if isinstance(st, str):
        raise UsageError(f"{root}: {st}")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{root}: not a directory")
    train = root / "train"
    tst = _split_folder(root, "train")
    if tst is None:
        raise DataError(f"{root}: no training split (expected {train}/<class>/<image>)")
    if isinstance(tst, str):
        raise DataError(f"{train}: {tst}")
    rejected: list[dict] = []
    notes: list[str] = []
    lister = _Lister(root, "train", rejected, train)
    listing = _list(train)
    if isinstance(listing, str):
        raise DataError(f"{train}: {listing}")
    class_dirs: list[tuple[Path, os.stat_result]] = []
    for p, est in listing:
        if isinstance(est, str):
            lister.reject(p, est)
        elif stat.S_ISDIR(est.st_mode):
            if _utf8(p.name):
                class_dirs.append((p, est))
            else:
                lister.reject(p, "folder name is not valid UTF-8")
        elif stat.S_ISREG(est.st_mode):
            lister.reject(p, "not in a class folder")
        else:
            lister.reject(p, f"not a regular file ({file_kind(est.st_mode)})")
    classes = [p.name for p, _ in class_dirs]
    if not classes:
        raise DataError(f"{train}: no class folders (expected {train}/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[Item]] = {"train": []}

    def add(split: str, path: Path, nbytes: int, label: int) -> None:
        splits[split].append(Item(_rel(root, path), label, nbytes))

    for c, cst in class_dirs:
        before = len(rejected)
        files = lister.files(c, cst)
        for f, nbytes in files:
            add("train", f, nbytes, index[c.name])
        if not files:
            odd = len(rejected) - before
            what = f"no usable files ({odd} rejected)" if odd else "empty class folder"
            notes.append(f"train/{c.name}: {what}: a class with no training images, "
                         "whose output the network is never trained on")
    if not splits["train"]:
        raise DataError(f"{train}: no files in its class folders")

    for split in EVAL_SPLITS:
        name = split
        if split == "val" and _split_folder(root, "val") is None and isinstance(
                _split_folder(root, "validation"), os.stat_result):
            name = "validation"
        folder = root / name
        fst = _split_folder(root, name)
        if fst is None:
            continue
        splits[split] = []
        if isinstance(fst, str):
            rejected.append({"path": name, "split": split, "reason": fst})
            continue
        own: list[dict] = []  # this split's rejects, kept apart until we know the split is kept
        lister = _Lister(root, split, own, folder)
        top = lister.top(folder)
        if top is None:
            rejected.extend(own)
            continue
        subdirs, loose = top
        if subdirs:
            for d, dst in subdirs:
                for f, nbytes in lister.files(d, dst):
                    if d.name in index:
                        add(split, f, nbytes, index[d.name])
                    else:
                        lister.reject(f, f"class folder {d.name!r} is not a training class")
            for f, _ in loose:
                lister.reject(f, "not in a class folder")
        elif loose:
            labels = _flat_val_labels(root, [f for f, _ in loose]) if split == "val" else None
            if labels is None:
                del splits[split]
                other = f" (and {len(own)} entries that are not regular files)" if own else ""
                notes.append(f"{split}/ skipped: {len(loose)} files in a flat folder{other} with no labels "
                             "(no LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt found)")
                continue
            for f, nbytes in loose:
                wnid = labels.get(f.stem)
                if wnid is None:
                    lister.reject(f, "no label in the ground truth")
                elif wnid not in index:
                    lister.reject(f, f"label {wnid!r} is not a training class")
                else:
                    add(split, f, nbytes, index[wnid])
        rejected.extend(own)
    return Source(root, classes, _read_class_names(root, classes), splits, rejected, notes)
