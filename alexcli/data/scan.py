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
import io
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from alexcli.errors import DataError, UsageError

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class Item:
    relpath: str  # relative to SRC, with forward slashes; inside an archive: "ARCHIVE/member/path"
    label: int
    nbytes: int
    # How a worker reads it (alexcli.data.archives.ItemReader): () is the file SRC/relpath; an
    # archive member carries its place in the archive (see archives.py for the forms).
    where: tuple = ()


@dataclass
class Source:
    root: Path
    classes: list[str]
    class_names: list[str]
    splits: dict[str, list[Item]]
    rejected: list[dict] = field(default_factory=list)  # {"path", "split", "reason"}
    notes: list[str] = field(default_factory=list)  # things a user should know (skipped splits)
    names_from: str = "the class folders' names"  # where class_names came from, in words
    skipped: dict[str, int] = field(default_factory=dict)  # split -> hidden files passed over (.DS_Store, ._*)
    warnings: list[str] = field(default_factory=list)  # things that are probably not what the user wants

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


# Files and folders that operating systems and tools leave in photo trees: macOS's .DS_Store and
# ._* (AppleDouble), Windows' Thumbs.db and desktop.ini, and every other dot-name (.git,
# .ipynb_checkpoints, ...). They are passed over and counted as skipped, not rejected.
_OS_FILES = ("thumbs.db", "desktop.ini")


def hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in _OS_FILES


def _list(folder: Path, skipped: list[int] | None = None) -> list[tuple[str, os.stat_result | str]] | str:
    """(name, stat or reason) of each entry of FOLDER sorted by name, or why it cannot be listed.
    Hidden entries are left out and counted in skipped[0].

    Names and string paths, not a Path per entry: pathlib's joins, str() and relative_to() took
    two thirds of a listing's time (20-28 us a file here; ImageNet's 1.28M files are listed before
    any worker starts)."""
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        return f"unreadable folder: {exc.strerror or exc}"
    shown = [n for n in names if not hidden(n)]
    if skipped is not None:
        skipped[0] += len(names) - len(shown)
    base = os.path.join(folder, "")
    return [(n, _stat(base + n)) for n in shown]


def _record(rel: str) -> str:
    """A relative path as recorded in rejected.json: undecodable bytes become U+FFFD, so it is valid UTF-8."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


class _Lister:
    """Lists the folders of one split under the module's rules; odd entries go to `rejected`."""

    def __init__(self, root: Path, split: str, rejected: list[dict], split_folder: Path):
        self.root, self.split, self.rejected = root, split, rejected
        self.skipped = [0]  # hidden entries passed over
        self.seen: dict[tuple[int, int], str] = {}  # real folder -> the path it was first listed at
        self.above: tuple = ()  # SRC and the split's folder: above every folder listed
        for folder, rel in ((root, "the source folder"), (split_folder, _record(_rel(root, split_folder)))):
            st = os.stat(folder)
            self.seen[(st.st_dev, st.st_ino)] = rel
            self.above += ((st.st_dev, st.st_ino),)

    def reject(self, path: Path, reason: str) -> None:
        self.rejected.append({"path": _record(_rel(self.root, path)), "split": self.split, "reason": reason})

    def entries(self, folder: Path) -> list[tuple[str, os.stat_result | str]] | None:
        """FOLDER's entries; None (and a reject) if it cannot be listed."""
        listing = _list(folder, self.skipped)
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

    def files(self, folder: Path, st: os.stat_result) -> list[tuple[str, int]]:
        """(path relative to the root, with forward slashes; size) of the regular files under
        FOLDER, in the order os.walk gives (each folder's files by name, then its subfolders by name)."""
        out: list[tuple[str, int]] = []
        if not self.enter(folder, st, self.above):
            return out
        stack = [(folder, _rel(self.root, folder), self.above + ((st.st_dev, st.st_ino),))]
        while stack:
            d, rel, above = stack.pop()
            listing = self.entries(d)
            subdirs = []
            for name, est in listing or ():
                kind = self.classify(d, name, est)
                if kind == "folder" and self.enter(sub := d / name, est, above):
                    subdirs.append((sub, f"{rel}/{name}", above + ((est.st_dev, est.st_ino),)))
                elif kind == "file":
                    out.append((f"{rel}/{name}", est.st_size))
            stack.extend(reversed(subdirs))
        return out

    def top(self, folder: Path) -> tuple[list[tuple[Path, os.stat_result]], list[tuple[Path, int]]] | None:
        """A split folder's (subfolders with their stat, regular files with their size); its other
        entries are rejected. None (and a reject) if it cannot be listed."""
        listing = self.entries(folder)
        if listing is None:
            return None
        subdirs, loose = [], []
        for name, est in listing:
            kind = self.classify(folder, name, est)
            if kind == "folder":
                subdirs.append((folder / name, est))
            elif kind == "file":
                loose.append((folder / name, est.st_size))
        return subdirs, loose

    def classify(self, folder: Path, name: str, est: os.stat_result | str) -> str | None:
        """"folder", "file" (a regular file with a UTF-8 name), or None after rejecting the entry
        NAME of FOLDER."""
        if isinstance(est, str):
            self.reject(folder / name, est)
        elif stat.S_ISDIR(est.st_mode):
            return "folder"
        elif not stat.S_ISREG(est.st_mode):
            self.reject(folder / name, f"not a regular file ({file_kind(est.st_mode)})")
        elif not _utf8(name):
            self.reject(folder / name, "file name is not valid UTF-8")
        else:
            return "file"
        return None


def read_text(path: Path) -> str:
    """A small text file beside the images (a class mapping, a val solution, a ground truth), read
    as images are (`image.read_source`: only a regular file, with a size limit): a FIFO or a device
    under such a name is a DataError naming it, never a hang."""
    from alexcli.data.image import Reject, read_source

    try:
        return read_source(path).decode("utf-8", errors="replace")
    except Reject as why:
        raise DataError(f"{path}: {why}") from None


def synset_mapping(text: str) -> dict[str, str]:
    """wnid -> readable name from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line)."""
    names = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def val_solution(text: str) -> dict[str, str]:
    """image id -> wnid from LOC_val_solution.csv (the first word of each PredictionString)."""
    labels = {}
    for row in csv.DictReader(io.StringIO(text, newline="")):
        pred = (row.get("PredictionString") or "").split()
        if row.get("ImageId") and pred:
            labels[row["ImageId"]] = pred[0]
    return labels


def name_classes(classes: list[str], names: dict[str, str], where: str) -> tuple[list[str], str]:
    """(the names of CLASSES, WHERE) if NAMES knows any of them, else the ids and the default."""
    if not any(c in names for c in classes):
        return list(classes), Source.names_from  # the default: the class folders' names
    return [names.get(c, c) for c in classes], where


def _read_class_names(root: Path, classes: list[str], find_devkit=lambda: None) -> tuple[list[str], str]:
    """(readable names of CLASSES, where they came from in words): LOC_synset_mapping.txt (Kaggle),
    words.txt (the ILSVRC synset list), the devkit's meta.mat, else the class ids themselves."""
    names: dict[str, str] = {}
    mapping = root / "LOC_synset_mapping.txt"
    words = root / "words.txt"
    where = Source.names_from
    if mapping.is_file():
        names, where = synset_mapping(read_text(mapping)), mapping.name
    elif words.is_file():
        for line in read_text(words).splitlines():
            wnid, _, name = line.partition("\t")
            if wnid:
                names[wnid.strip()] = name.strip()
        where = words.name
    elif (kit := find_devkit()) is not None and kit.names:
        names, where = kit.names, kit.where
    return name_classes(classes, names, where)


def _find(root: Path, name: str, depth: int = 3) -> Path | None:
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) != root and len(Path(dirpath).relative_to(root).parts) >= depth:
            dirnames[:] = []
        dirnames[:] = sorted(d for d in dirnames if d not in ("train", "val", "test") and not hidden(d))
        if name in filenames:
            return Path(dirpath) / name
    return None


def not_training_classes(where, split: str, names) -> DataError:
    """A val/ or test/ whose class folders train/ does not have: the split cannot be scored against
    the classes the network learns, so it is an error (not a reject per image)."""
    names = sorted(set(names))
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return DataError(f"{where}: {split}/ has class folder(s) that train/ does not have: {shown}; a {split} split's "
                     "folders must be training classes (rename or remove them)")


def val_label(wnid: str | None, index: dict[str, int]) -> tuple[int | None, str | None]:
    """A flat validation image's class from its ground-truth label WNID: (class, None), or (None,
    the reason it is a reject). Folders and archives label their val images through this."""
    if wnid is None:
        return None, "no label in the ground truth"
    if wnid not in index:
        return None, f"label {wnid!r} is not a training class"
    return index[wnid], None


def _flat_val_labels(root: Path, files: list[Path], devkit) -> dict[str, str] | None:
    """image stem -> wnid for ImageNet's flat validation folder, or None if no ground truth."""
    loc = _find(root, "LOC_val_solution.csv")
    if loc is not None:
        return val_solution(read_text(loc))
    if devkit is not None and devkit.val_wnids is not None:
        # The ground truth lists the 50,000 images in file-name order.
        names = sorted(p.stem for p in files)
        if len(devkit.val_wnids) != len(names):
            raise DataError(f"{devkit.where}: has {len(devkit.val_wnids)} validation labels but the flat val "
                            f"folder has {len(names)} files")
        return dict(zip(names, devkit.val_wnids))
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
    none: list[int] = []  # sizes of the classes that hold out nothing
    for it in source.splits["train"]:
        by_class.setdefault(it.label, []).append(it)
    train, val = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda it: it.relpath)
        random.Random(f"{seed}/holdout/{label}").shuffle(items)
        n = round(len(items) * fraction)
        if n == 0:
            none.append(len(items))
        val += items[:n]
        train += items[n:]
    val.sort(key=lambda it: it.relpath)
    train.sort(key=lambda it: it.relpath)
    notes = source.notes + [f"val: {len(val):,} training files held out ({fraction:g} of each class, seed {seed})"]
    warnings = list(source.warnings)
    if none:
        # round(n * fraction) is 0 below n = 0.5 / fraction (Python rounds 0.5 to even: 0)
        warnings.append(f"--holdout {fraction:g}: {len(none)} of {len(by_class)} classes have too few training files "
                        f"to hold any out (at most {max(none)}); those classes are not in val")
    return replace(source, splits={**source.splits, "train": train, "val": val}, notes=notes, warnings=warnings)


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


# Where the Kaggle download (imagenet-object-localization-challenge) keeps its split folders; its
# LOC_val_solution.csv and LOC_synset_mapping.txt lie at the top.
KAGGLE_BASE = ("ILSVRC", "Data", "CLS-LOC")


def scan(src: str | os.PathLike) -> Source:
    """The source at SRC: an image tree (SRC/train/<class>/..., or the Kaggle tree under
    SRC/ILSVRC/Data/CLS-LOC), or the archives users download (alexcli.data.archives)."""
    from alexcli.data import archives

    root = Path(src)
    st = _stat(root)
    if st in ("dangling symlink", "vanished while listing"):
        raise UsageError(f"{root}: no such file or directory")
    if isinstance(st, str):
        raise UsageError(f"{root}: {st}")
    if not stat.S_ISDIR(st.st_mode):
        found = archives.scan_archive(root)
        if found is None:
            raise UsageError(f"{root}: not a directory, nor an archive alexcli reads ({archives.KNOWN})")
        return found
    base = root
    if _split_folder(root, "train") is None:
        kaggle = root.joinpath(*KAGGLE_BASE)
        if isinstance(_split_folder(kaggle, "train"), os.stat_result):
            base = kaggle
        else:
            found = archives.scan_archive(root)
            if found is not None:
                return found
    return _scan_tree(root, base)


def _scan_tree(root: Path, base: Path) -> Source:
    """An image tree whose split folders are in BASE (ROOT itself, or the Kaggle tree's); paths
    are recorded relative to ROOT."""
    from alexcli.data import archives

    train = base / "train"
    tst = _split_folder(base, "train")
    if tst is None:
        raise DataError(f"{root}: no training split (expected {train}/<class>/<image>, or an archive alexcli "
                        f"reads: {archives.KNOWN})")
    if isinstance(tst, str):
        raise DataError(f"{train}: {tst}")
    rejected: list[dict] = []
    notes: list[str] = []
    skipped: dict[str, int] = {}
    lister = _Lister(root, "train", rejected, train)
    listing = _list(train, lister.skipped)
    if isinstance(listing, str):
        raise DataError(f"{train}: {listing}")
    class_dirs: list[tuple[Path, os.stat_result]] = []
    for name, est in listing:
        p = train / name
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

    def add(split: str, relpath: str, nbytes: int, label: int) -> None:
        splits[split].append(Item(relpath, label, nbytes))

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
    skipped["train"] = lister.skipped[0]
    devkit: list = []  # found on first need: reading meta.mat takes a moment

    def find_devkit():
        if not devkit:
            devkit.append(archives.find_devkit(root))
        return devkit[0]

    for split in EVAL_SPLITS:
        name = split
        if split == "val" and _split_folder(base, "val") is None and isinstance(
                _split_folder(base, "validation"), os.stat_result):
            name = "validation"
        folder = base / name
        fst = _split_folder(base, name)
        if fst is None:
            continue
        splits[split] = []
        if isinstance(fst, str):
            rejected.append({"path": _rel(root, folder), "split": split, "reason": fst})
            continue
        own: list[dict] = []  # this split's rejects, kept apart until we know the split is kept
        lister = _Lister(root, split, own, folder)
        top = lister.top(folder)
        if top is None:
            rejected.extend(own)
            continue
        subdirs, loose = top
        if subdirs:
            unknown = [d.name for d, _ in subdirs if d.name not in index]
            if unknown:
                raise not_training_classes(root, split, unknown)
            for d, dst in subdirs:
                for f, nbytes in lister.files(d, dst):
                    add(split, f, nbytes, index[d.name])
            for f, _ in loose:
                lister.reject(f, "not in a class folder")
        elif loose:
            labels = _flat_val_labels(root, [f for f, _ in loose], find_devkit()) if split == "val" else None
            if labels is None:
                del splits[split]
                other = f" (and {len(own)} entries that are not regular files)" if own else ""
                notes.append(f"{split}/ skipped: {len(loose)} files in a flat folder{other} with no labels "
                             "(no LOC_val_solution.csv, nor the devkit's ILSVRC2012_validation_ground_truth.txt "
                             "and meta.mat, found)")
                continue
            for f, nbytes in loose:
                label, why = val_label(labels.get(f.stem), index)
                if why:
                    lister.reject(f, why)
                else:
                    add(split, _rel(root, f), nbytes, label)
        rejected.extend(own)
        skipped[split] = lister.skipped[0]
    names, names_from = _read_class_names(root, classes, find_devkit)
    return Source(root, classes, names, splits, rejected, notes, names_from,
                  {k: v for k, v in skipped.items() if v})
