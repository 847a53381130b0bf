"""The archives users download, read in place: nothing is extracted to disk.

What is read (KNOWN says it in one line):
- ILSVRC-2012 as distributed: a folder holding ILSVRC2012_img_train.tar (a tar of 1,000 per-class
  tars n01440764.tar, each a flat tar of JPEGs), optionally ILSVRC2012_img_val.tar (a flat tar of
  ILSVRC2012_val_%08d.JPEG) and ILSVRC2012_devkit_t12.tar.gz (class names and validation labels from
  data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt), or the train tar itself as SRC (the
  val tar and devkit are then looked for beside it).
- Kaggle's imagenet-object-localization-challenge.zip (ILSVRC/Data/CLS-LOC/{train,val,test}/ with
  LOC_val_solution.csv and LOC_synset_mapping.txt at the top), or a folder holding it.
- CIFAR-10/100 in both distributed forms, python pickles and binary records: cifar-10-python.tar.gz,
  cifar-100-python.tar.gz, cifar-10-binary.tar.gz, cifar-100-binary.tar.gz, their extracted folders
  (cifar-10-batches-py/, cifar-100-python/, cifar-10-batches-bin/, cifar-100-binary/), as SRC or
  directly inside SRC. The batches become split "train", the test batch split "test".

The contract with scan and prepare:
- `scan_archive(root)` -> a scan.Source, or None when ROOT is not an archive layout this module reads.
  A damaged archive (not what its name says, cut short) is a one-line DataError.
- `find_devkit(root)` -> Devkit or None: ILSVRC-2012's class names and validation labels.
- `ItemReader(root).read(item)` -> the item's bytes (an encoded image file) or a PIL image (pixels
  held in the item, CIFAR), or raises image.Reject: whatever goes wrong with one item is a Reject
  with its reason. Item.where says where the item is:
    ()                                   the file ROOT/item.relpath
    ("tar", archive, offset)             item.nbytes bytes at byte OFFSET of the plain (uncompressed)
                                         tar ARCHIVE; a member of an inner tar (ILSVRC's class tars)
                                         has the offset in the outer file: inner tar's data offset +
                                         the member's data offset inside it
    ("zip", archive, header_offset, compressed_size, compress_type, crc32)
                                         a zip member: its local file header is at HEADER_OFFSET;
                                         stored (0) or deflated (8); item.nbytes is its uncompressed
                                         size; the CRC is checked
    ("rgb", width, height, pixels)       the pixels themselves: HWC RGB uint8 bytes (CIFAR, 3 KB each)
  ARCHIVE is a path relative to ROOT, or to ROOT's folder when ROOT is the archive file itself;
  item.relpath starts with the same ARCHIVE ("ILSVRC2012_img_train.tar/n01440764.tar/x.JPEG").

Why offsets, not extraction: ImageNet's train tar is 138 GB; extracting it needs as much space again
and hours of writing 1.28 M small files, only for prepare to read them once. A tar stores each
member's bytes contiguously and uncompressed, so the listing (headers only: 512 bytes a member, read
by seeking) gives every image's byte range, and each worker reads its images with os.pread on one
file descriptor it keeps open: the same bytes the extracted file would hold, a little faster than
opening each file (100 classes x 200 small JPEGs, one worker: 1,100-1,700 images/s from the tar,
930-1,440 from the extracted tree). Zip members are read the same way from their local headers and
inflated in memory. The listing walks tar headers itself (`walk_tar`: ustar, GNU long names and
links, pax extended and global headers, base-256 numbers, as tarfile reads them; checked against
tarfile by the tests): about 10 us a member against tarfile's 58 us (0.3 s for the 20,000 members
above, from the page cache). Each class tar is a unit of work: where reads wait on storage (a cold
disk, a network file system; simulated with a 0.2 ms sleep before each read) 16 threads list in
1.6 s what one thread lists in 8.2 s, but from the page cache threads only contend for the GIL
(0.69 s instead of 0.34 on 2 cores), so the first class tar is timed and the threads used only
when its headers came slowly (_list_class_tars).

Order: items come in the order scan would list the extracted tree (class by class, sorted; within a
class os.walk's order: a folder's files by name, then its subfolders), so prepare's shuffled plan,
and every shard's samples, are those of the extracted tree. Hidden members (.DS_Store, ._*, ...:
scan.hidden) are passed over and counted as skipped, as in a folder; other odd members (symlinks,
devices, sparse files) are rejects with a reason. A cut or corrupt tar gives one reject for what
cannot be listed; what was listed before the damage stays usable.

CIFAR's python batches are pickles, and unpickling runs whatever code a pickle names. They are read
with a restricted unpickler: its find_class allows only numpy's array reconstruction
(numpy[._]core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) and, for pickles written by
Python 3 at protocol 2, a latin-1-only stand-in for _codecs.encode (how such pickles spell bytes);
anything else refuses the file with a one-line DataError naming what it asked for, before any of it
runs. The result's structure is then checked (a dict with uint8 data N x 3072, labels in range,
file names).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from alexcli.data.scan import (Item, Source, _find as _scan_find, _read_class_names, _record, _utf8, file_kind,
                               hidden, name_classes, not_training_classes, read_text, synset_mapping, val_label,
                               val_solution)
from alexcli.errors import DataError

# What scan_archive reads, for messages.
KNOWN = ("ILSVRC2012_img_train.tar (+ _img_val.tar, _devkit_t12.tar.gz beside it), "
         "imagenet-object-localization-challenge.zip, cifar-10-python.tar.gz, cifar-100-python.tar.gz, "
         "cifar-10-binary.tar.gz, cifar-100-binary.tar.gz (or extracted)")

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_TGZ = DEVKIT + ".tar.gz"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_ZIP = "imagenet-object-localization-challenge.zip"
KAGGLE_BASE = "ILSVRC/Data/CLS-LOC/"
LISTING_THREADS = 16  # class tars listed at once where reads wait on storage (_list_class_tars)
SLOW_HEADER_S = 40e-6  # a member's header taking longer than this (parsing takes about 10 us) waits on storage


@dataclass(frozen=True)
class Devkit:
    where: str                      # what the names and labels were read from, for the summary
    names: dict[str, str]           # wnid -> readable name ("tench, Tinca tinca")
    val_wnids: list[str] | None     # the validation images' wnids in file-name order, if given


# ---------------------------------------------------------------- tar headers

class TarMember(NamedTuple):
    name: str     # as tarfile gives it (surrogate escapes for bytes that are not UTF-8)
    kind: str     # "file", "directory", or what else it is ("symbolic link to x", "FIFO", ...)
    offset: int   # of its data, in the file
    size: int
    complete: bool  # all its data is in the file (False: the file is cut short inside it)


_ZERO = bytes(512)
_REGULAR = (b"0", b"\0", b"7", b"S")  # tarfile's REGULAR_TYPES (S: GNU sparse)
_SUPPORTED = frozenset(b"0\x001234567LKS")  # tarfile's SUPPORTED_TYPES, as byte values
_OTHER_KINDS = {b"3": "character device", b"4": "block device", b"6": "FIFO", b"5": "directory"}


class _Damage(Exception):
    """Where walk_tar stopped: str() is the reason."""


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _nti(b: bytes) -> int:
    """A tar number field: octal text, or GNU's base-256 (first byte 0x80 or 0xff), as tarfile.nti."""
    if b[0] in (0o200, 0o377):
        n = int.from_bytes(b[1:], "big")
        return n - 256 ** (len(b) - 1) if b[0] == 0o377 else n
    return int(b.split(b"\0", 1)[0].strip() or b"0", 8)  # ValueError: not a number


def _checksum_ok(hdr: bytes) -> bool:
    try:
        want = _nti(hdr[148:156])
    except ValueError:
        return False
    unsigned = 256 + sum(hdr) - sum(hdr[148:156])
    if want == unsigned:
        return True
    return want == 256 + sum(struct.unpack_from("148b8x356b", hdr))


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header ("%d key=value\\n")."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        sp = data.find(b" ", pos)
        length = int(data[pos:sp])  # ValueError: not a pax header
        record = data[sp + 1:pos + length]
        if sp < 0 or length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError("invalid pax header")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def walk_tar(fd: int, start: int, size: int, avail: int, need_end: bool = False
             ) -> tuple[list[TarMember], str | None]:
    """The members of the plain tar occupying bytes START..START+SIZE of the open file FD, of which
    the first AVAIL are present (less than SIZE when the file is cut), and why the listing stopped
    early (None: it reached the end). Members are those tarfile lists, with the same names, kinds,
    data offsets and sizes; where tarfile stops silently at a bad header, this says so. NEED_END: a
    tar that ends without its end-of-archive block counts as cut (an outer file, whose size is not
    given by a header)."""
    members: list[TarMember] = []
    pos = 0
    glob: dict[str, str] = {}  # pax global headers: apply to every later member

    def cut(at: int) -> _Damage:
        inside = f", inside {members[-1].name}" if members and not members[-1].complete else ""
        return _Damage(f"truncated archive: the file ends at byte {start + at}{inside}")

    def block(at: int, n: int = 512) -> bytes:
        if at + n > avail:
            raise cut(avail)
        got = os.pread(fd, n, start + at)
        if len(got) < n:
            raise cut(at + len(got))
        return got

    try:
        while True:
            if pos > avail:
                raise cut(avail)
            if pos + 512 > size:
                if pos < size and any(os.pread(fd, size - pos, start + pos)):
                    raise _Damage(f"damaged tar: {size - pos} stray bytes at its end")
                if need_end or pos > size:
                    raise _Damage(f"truncated archive: the file ends at byte {start + min(pos, avail)} without "
                                  "tar's end-of-archive block")
                return members, None
            hdr = block(pos)
            if hdr == _ZERO:
                return members, None
            at = pos
            long_name = long_link = None
            pax: dict[str, str] = {}
            while True:
                if not _checksum_ok(hdr):
                    raise _Damage("not a tar archive" if pos == 0 else f"damaged tar: no valid header at byte "
                                  f"{start + pos}")
                t = hdr[156:157]
                if t not in (b"L", b"K", b"x", b"g"):
                    break
                n = _nti(hdr[124:136])
                if not 0 <= n <= 1 << 20:
                    raise ValueError(n)
                data = block(pos + 512, n) if n else b""
                pos += 512 + -(-n // 512) * 512
                if t == b"L":
                    long_name = _nts(data)
                elif t == b"K":
                    long_link = _nts(data)
                elif t == b"x":
                    pax.update(_pax(data))
                else:
                    glob.update(_pax(data))
                hdr = block(pos)
                if hdr == _ZERO:
                    raise _Damage(f"damaged tar: an extended header at byte {start + at} with no member after it")
            name = _nts(hdr[0:100])
            if t == b"\0" and name.endswith("/"):
                t = b"5"  # old V7 tar: a directory is a regular file whose name ends with a slash
            if hdr[345] and t != b"S":  # ustar's prefix: the start of a name over 100 bytes
                name = _nts(hdr[345:500]) + "/" + name
            link = _nts(hdr[157:257]) if t in (b"1", b"2") else ""
            n = _nti(hdr[124:136])
            data_at = pos + 512
            if t == b"S":  # old GNU sparse: its map may continue in extension blocks before the data
                ext = hdr[482]
                while ext:
                    ext = block(data_at)[504]
                    data_at += 512
            if long_name is not None:
                name = long_name
            if long_link is not None:
                link = long_link
            sparse = t == b"S"
            if glob or pax:
                info = {**glob, **pax}
                name = info.get("path", name)
                link = info.get("linkpath", link)
                if "size" in info:
                    n = int(info["size"])
                sparse = sparse or any(k.startswith("GNU.sparse.") for k in info)
            if t == b"5":
                name = name.rstrip("/")
            if sparse:
                kind = "sparse file"
            elif t in _REGULAR:
                kind = "file"
            elif t == b"1":
                kind = f"hard link to {link}"
            elif t == b"2":
                kind = f"symbolic link to {link}"
            elif t in _OTHER_KINDS:
                kind = _OTHER_KINDS[t]
            else:
                kind = f"tar member type {t.decode('latin-1')!r}"
            if n < 0:
                raise ValueError(n)
            members.append(TarMember(name, kind, start + data_at, n, data_at + n <= avail))
            skip = t in _REGULAR or t[0] not in _SUPPORTED
            pos = data_at + (-(-n // 512) * 512 if skip else 0)
    except _Damage as exc:
        return members, str(exc)
    except ValueError:  # a number field that is not one
        return members, f"damaged tar: invalid header at byte {start + pos}"


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


# ---------------------------------------------------------------- helpers shared by the layouts

def _walk_key(parts: tuple[str, ...]) -> tuple:
    """Sort key giving os.walk's order as scan lists a folder: its files by name, then its subfolders."""
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def _hidden_prefix(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path up to the first hidden component (what scan would count as one skipped entry)."""
    for i, p in enumerate(parts):
        if hidden(p):
            return parts[:i + 1]
    return None


class _Split:
    """What one split's listing gathers: items, rejects and hidden entries passed over."""

    def __init__(self, name: str):
        self.name = name
        self.items: list[Item] = []
        self.rejected: list[dict] = []
        self.hidden: set = set()

    def reject(self, path: str, reason: str) -> None:
        self.rejected.append({"path": _record(path), "split": self.name, "reason": reason})


def _split_parts(name: str) -> tuple[str, ...]:
    if "/" not in name:
        return (name,) if name not in ("", ".") else ()
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _open_fd(path: Path) -> int:
    from alexcli.data.image import Reject, open_regular

    try:
        return open_regular(path)[0]
    except Reject as why:
        raise DataError(f"{path}: {why}") from None


# ---------------------------------------------------------------- ILSVRC-2012 tars

def _list_class_tar(fd: int, m: TarMember, file_size: int) -> tuple[list[TarMember], str | None]:
    return walk_tar(fd, m.offset, m.size, max(0, min(m.size, file_size - m.offset)))


def _list_class_tars(fd: int, todo: list[TarMember], file_size: int) -> list:
    """walk_tar of each class tar. Each is a unit of work: the first is listed here, timed, and if
    its headers came slower than parsing them takes (storage that makes each read wait: a cold
    disk, a network file system) the rest are listed by LISTING_THREADS threads, which overlap the
    waits; from the page cache, threads only contend for the GIL (twice as slow on 2 cores)."""
    t0 = time.perf_counter()
    first = _list_class_tar(fd, todo[0], file_size)
    per_member = (time.perf_counter() - t0) / max(1, len(first[0]))
    rest = todo[1:]
    if per_member < SLOW_HEADER_S or len(rest) < 2:
        return [first] + [_list_class_tar(fd, m, file_size) for m in rest]
    with ThreadPoolExecutor(min(LISTING_THREADS, len(rest))) as pool:
        return [first] + list(pool.map(lambda m: _list_class_tar(fd, m, file_size), rest))


def _ilsvrc(src: Path, folder: Path, train: Path) -> Source:
    """ILSVRC2012_img_train.tar in FOLDER (and the val tar and devkit beside it)."""
    train_rel = train.name
    fd = _open_fd(train)
    try:
        size = _file_size(fd)
        if size == 0:
            raise DataError(f"{train}: empty file")
        outer, damage = walk_tar(fd, 0, size, size, need_end=True)
        if not outer and damage:
            raise DataError(f"{train}: {damage}")
        sp = _Split("train")
        warnings: list[str] = []
        class_tars: dict[str, TarMember] = {}
        # a cut class tar is listed as far as it goes (_list_class_tars), so it is not refused here
        for parts, m in _usable_members(sp, outer, train_rel, train_rel, whole=False).items():
            if len(parts) != 1 or not parts[0].endswith(".tar") or parts[0] == ".tar":
                sp.reject(f"{train_rel}/{'/'.join(parts)}", "not a class tar (expected <wnid>.tar)")
            else:
                class_tars[parts[0]] = m
        if damage:
            last = outer[-1].name if outer else "its start"
            sp.reject(train_rel, f"{damage}; classes after {last}, if any, cannot be listed")
            warnings.append(f"{train_rel} is damaged ({damage}): only the {len(class_tars)} classes listed before "
                            "the damage are prepared, so class indices will not match a complete copy; "
                            "download it again")
        if not class_tars:
            raise DataError(f"{train}: no class tars (<wnid>.tar) in it")
        classes = sorted(n[:-4] for n in class_tars)
        index = {c: i for i, c in enumerate(classes)}
        listings = _list_class_tars(fd, [class_tars[c + ".tar"] for c in classes], size)
        notes: list[str] = []
        for c, (members, inner_damage) in zip(classes, listings):
            tar_path = f"{train_rel}/{c}.tar"
            before = len(sp.items)
            _add_members(sp, members, tar_path, train_rel, index[c])
            if inner_damage:
                sp.reject(tar_path, f"{inner_damage}; {len(members)} members listed before it")
            if len(sp.items) == before:
                notes.append(f"{tar_path}: no usable files: a class with no training images, whose output the "
                             "network is never trained on")
    finally:
        os.close(fd)
    splits = {"train": sp.items}
    rejected = list(sp.rejected)
    skipped = {"train": len(sp.hidden)}
    kit = find_devkit(folder)
    val = folder / VAL_TAR
    if val.is_file():
        vs = _ilsvrc_val(val, kit, index)
        if vs is None:
            notes.append(f"{VAL_TAR} skipped: no labels for it (no {DEVKIT_TGZ}, nor an extracted devkit with "
                         f"{GROUND_TRUTH}, found beside it)")
        else:
            splits["val"] = vs.items
            rejected += vs.rejected
            skipped["val"] = len(vs.hidden)
    else:
        notes.append(f"no {VAL_TAR} beside {train_rel}: no val split")
    names, names_from = _read_class_names(folder, classes, lambda: kit)
    if names_from == Source.names_from:
        names_from = "the class tars' names (no devkit found)"
    return Source(src, classes, names, splits, rejected, notes, names_from,
                  {k: v for k, v in skipped.items() if v}, warnings)


def _usable_members(sp: _Split, members: list[TarMember], prefix: str, archive: str,
                    whole: bool = True) -> dict[tuple, TarMember]:
    """The regular (with WHOLE, complete) members of a tar by their path parts; hidden ones
    counted, the rest rejected into SP (display paths PREFIX/...)."""
    found: dict[tuple, TarMember] = {}
    for m in members:
        parts = _split_parts(m.name)
        if not parts:
            continue
        if (h := _hidden_prefix(parts)) is not None:
            sp.hidden.add(h)
            continue
        path = f"{prefix}/{'/'.join(parts)}"
        if m.kind == "directory":
            continue
        if m.kind != "file":
            sp.reject(path, f"not a regular file ({m.kind})")
        elif not _utf8(m.name):
            sp.reject(path, "file name is not valid UTF-8")
        elif whole and not m.complete:
            sp.reject(path, f"truncated archive: its data runs past the end of {archive}")
        else:
            if parts in found:
                sp.reject(path, "a later member of the same name replaces it (as extracting would)")
            found[parts] = m
    return found


def _add_members(sp: _Split, members: list[TarMember], prefix: str, archive: str, label: int) -> None:
    """The regular members of one class tar as items of LABEL, in os.walk order; the rest rejected."""
    found = _usable_members(sp, members, prefix, archive)
    flat = all(len(parts) == 1 for parts in found)  # as ILSVRC's class tars are: sort by name
    for parts in sorted(found) if flat else sorted(found, key=_walk_key):
        m = found[parts]
        sp.items.append(Item(f"{prefix}/{'/'.join(parts)}", label, m.size, ("tar", archive, m.offset)))


_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})")


def _ilsvrc_val(val: Path, kit: Devkit | None, index: dict[str, int]) -> _Split | None:
    """ILSVRC2012_img_val.tar's items labelled by the devkit's ground truth; None without one."""
    if kit is None or kit.val_wnids is None:
        return None
    vs = _Split("val")
    fd = _open_fd(val)
    try:
        size = _file_size(fd)
        members, damage = walk_tar(fd, 0, size, size, need_end=True)
    finally:
        os.close(fd)
    if not members and damage:
        raise DataError(f"{val}: {damage}")
    files = {"/".join(parts): m for parts, m in _usable_members(vs, members, val.name, val.name).items()}
    if damage:
        vs.reject(val.name, f"{damage}; {len(members)} members listed before it")
    names = sorted(files)
    stems = [Path(n).stem for n in names]
    wnids = kit.val_wnids
    numbered = [_VAL_NAME.fullmatch(s) for s in stems]
    if all(numbered):  # ILSVRC2012_val_00000001 is the ground truth's first line: a cut tar keeps its labels
        labels = [wnids[int(x.group(1)) - 1] if 0 < int(x.group(1)) <= len(wnids) else None for x in numbered]
    elif len(names) == len(wnids):  # the ground truth lists the images in file-name order
        labels = list(wnids)
    else:
        raise DataError(f"{kit.where}: has {len(wnids)} validation labels but {val.name} has {len(names)} files")
    for n, wnid in zip(names, labels):
        path = f"{val.name}/{n}"
        label, why = val_label(wnid, index)
        if why:
            vs.reject(path, why)
        else:
            vs.items.append(Item(path, label, files[n].size, ("tar", val.name, files[n].offset)))
    return vs


# ---------------------------------------------------------------- the devkit

def _find(root: Path, name: str) -> Path | None:
    return _scan_find(root, name)


def _devkit_from(meta: bytes | Path, gt: str | None, where: str) -> Devkit:
    """Devkit from meta.mat (a path or its bytes) and the ground truth's text."""
    try:
        import scipy.io
    except ImportError:
        raise DataError(f"{where}: reading meta.mat needs scipy (pip install scipy)") from None
    import numpy as np

    try:
        mat = scipy.io.loadmat(io.BytesIO(meta) if isinstance(meta, bytes) else str(meta), squeeze_me=True)
        synsets = np.atleast_1d(mat["synsets"])
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        names = {str(s["WNID"]): str(s["words"]) for s in synsets} if "words" in synsets.dtype.names else {}
    except KeyError as exc:
        raise DataError(f"{where}: not the devkit's meta.mat (no {exc} in it)") from None
    except Exception as exc:  # scipy's errors for a file that is not a MATLAB file, or not this one
        raise DataError(f"{where}: cannot read meta.mat: {type(exc).__name__}: {exc}") from None
    wnids = None
    if gt is not None:
        try:
            wnids = [id_to_wnid[int(x)] for x in gt.split()]
        except (KeyError, ValueError) as exc:
            raise DataError(f"{where}: the validation ground truth names class {exc}, which meta.mat does not "
                            "have") from None
    return Devkit(where, names, wnids)


def _devkit_tgz(tgz: Path) -> Devkit:
    """The devkit read from its .tar.gz in memory."""
    meta = gt = None
    try:
        with tarfile.open(tgz, "r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.name.endswith("data/meta.mat") and meta is None:
                    meta = tar.extractfile(m).read()
                elif m.name.endswith("data/" + GROUND_TRUTH) and gt is None:
                    gt = tar.extractfile(m).read().decode("ascii", "replace")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{tgz}: damaged archive: {exc or type(exc).__name__}") from None
    if meta is None:
        raise DataError(f"{tgz}: no data/meta.mat in it (not the ILSVRC-2012 devkit?)")
    return _devkit_from(meta, gt, f"the devkit's meta.mat in {tgz.name}")


def find_devkit(root: Path) -> Devkit | None:
    """ILSVRC-2012's devkit for the source at ROOT: an extracted devkit's data/meta.mat (+
    ILSVRC2012_validation_ground_truth.txt) under ROOT, or ILSVRC2012_devkit_t12.tar.gz in ROOT (in
    ROOT's folder when ROOT is a file)."""
    root = Path(root)
    if not root.is_dir():
        root = root.parent
    gt = _find(root, GROUND_TRUTH)
    meta = gt.parent / "meta.mat" if gt is not None else _find(root, "meta.mat")
    if meta is not None and meta.is_file():
        text = None
        if gt is not None:
            text = read_text(gt)
        try:
            return _devkit_from(meta, text, str(meta.relative_to(root)))
        except DataError:
            if gt is not None:
                raise
            # a meta.mat found by its name alone, that is not the devkit's: not ours to complain about
    if (root / DEVKIT_TGZ).is_file():
        return _devkit_tgz(root / DEVKIT_TGZ)
    if gt is not None:
        raise DataError(f"{gt}: needs the devkit's meta.mat beside it to map ILSVRC2012_IDs to classes")
    return None


# ---------------------------------------------------------------- the Kaggle zip

def _zip_name(info: zipfile.ZipInfo) -> str:
    """A member's name: zipfile decodes names without the UTF-8 flag as cp437, but most tools
    write UTF-8 without setting it."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


_METHODS = {9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard", 95: "xz", 98: "ppmd"}


def _zip_kind(info: zipfile.ZipInfo) -> str | None:
    """Why this member cannot be read as a file, or None."""
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        what = "symbolic link" if stat.S_ISLNK(mode) else file_kind(mode)
        return f"not a regular file ({what})"
    if info.flag_bits & 0x1:
        return "encrypted zip member"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        return f"zip compression {method} is not supported (only stored and deflated)"
    return None


def _kaggle(src: Path, folder: Path, zpath: Path, named: bool) -> Source | None:
    """imagenet-object-localization-challenge.zip (or any zip of that layout) in FOLDER; None if
    the zip is not that layout (NAMED: it has the Kaggle name, so it is an error instead)."""
    zrel = zpath.name
    try:
        with zipfile.ZipFile(zpath) as zf:
            infos = zf.infolist()
            top = {i.filename: i for i in infos if "/" not in i.filename.rstrip("/")}

            def text(name: str) -> str | None:
                if name in top:
                    return zf.read(top[name]).decode("utf-8", "replace")
                if (folder / name).is_file():
                    return read_text(folder / name)
                return None

            by_split: dict[str, list[tuple[tuple[str, ...], zipfile.ZipInfo]]] = {}
            for info in infos:
                name = _zip_name(info)
                if not name.startswith(KAGGLE_BASE):
                    continue
                parts = _split_parts(name[len(KAGGLE_BASE):])
                if len(parts) >= 2 and parts[0] in ("train", "val", "test"):
                    by_split.setdefault(parts[0], []).append((parts[1:], info))
            if "train" not in by_split:
                if named:
                    raise DataError(f"{zpath}: no {KAGGLE_BASE}train/ in it (not the Kaggle ImageNet zip?)")
                return None
            solution = text("LOC_val_solution.csv") if "val" in by_split else None
            mapping = text("LOC_synset_mapping.txt")
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zpath}: not a zip, or cut short ({exc})") from None
    except (OSError, EOFError, zlib.error, NotImplementedError) as exc:
        raise DataError(f"{zpath}: damaged archive: {exc or type(exc).__name__}") from None
    prefix = f"{zrel}/{KAGGLE_BASE}"
    tr = _Split("train")
    classes: set[str] = set()
    train_files: dict[str, list] = {}
    for parts, info in by_split["train"]:
        if (h := _hidden_prefix(parts)) is not None:
            tr.hidden.add(h)
            continue
        if info.is_dir():
            classes.add(parts[0])
        elif len(parts) == 1:
            tr.reject(prefix + "train/" + parts[0], "not in a class folder")
        else:
            classes.add(parts[0])
            train_files.setdefault(parts[0], []).append((parts, info))
    if not classes:
        raise DataError(f"{zpath}: no class folders in {KAGGLE_BASE}train/")
    order = sorted(classes)
    index = {c: i for i, c in enumerate(order)}
    notes: list[str] = []

    def item(sp: _Split, split: str, parts: tuple[str, ...], info: zipfile.ZipInfo, label: int) -> None:
        path = prefix + split + "/" + "/".join(parts)
        why = _zip_kind(info)
        if why:
            sp.reject(path, why)
        else:
            sp.items.append(Item(path, label, info.file_size, ("zip", zrel, info.header_offset, info.compress_size,
                                                               info.compress_type, info.CRC)))

    for c in order:
        before = len(tr.items)
        for parts, info in sorted(train_files.get(c, ()), key=lambda e: _walk_key(e[0])):
            item(tr, "train", parts, info, index[c])
        if len(tr.items) == before:
            notes.append(f"train/{c}: no usable files: a class with no training images, whose output the network "
                         "is never trained on")
    splits = {"train": tr.items}
    rejected = list(tr.rejected)
    skipped = {"train": len(tr.hidden)}
    val_labels = val_solution(solution) if solution is not None else None
    for split in ("val", "test"):
        if split not in by_split:
            continue
        sp = _Split(split)
        loose, sub = [], []
        for parts, info in by_split[split]:
            if (h := _hidden_prefix(parts)) is not None:
                sp.hidden.add(h)
            elif info.is_dir():
                continue
            elif len(parts) == 1:
                loose.append((parts, info))
            else:
                sub.append((parts, info))
        if sub:
            unknown = [parts[0] for parts, _ in sub if parts[0] not in index]
            if unknown:
                raise not_training_classes(zpath, split, unknown)
            for parts, info in sorted(sub, key=lambda e: _walk_key(e[0])):
                item(sp, split, parts, info, index[parts[0]])
            for parts, _ in loose:
                sp.reject(prefix + split + "/" + parts[0], "not in a class folder")
        elif loose:
            labels = val_labels if split == "val" else None
            if labels is None:
                notes.append(f"{split}/ skipped: {len(loose)} files in a flat folder with no labels"
                             + (" (no LOC_val_solution.csv in the zip or beside it)" if split == "val" else ""))
                continue
            for parts, info in sorted(loose, key=lambda e: e[0]):
                wnid = labels.get(Path(parts[0]).stem)
                path = prefix + split + "/" + parts[0]
                if wnid is None:
                    sp.reject(path, "no label in the ground truth")
                elif wnid not in index:
                    sp.reject(path, f"label {wnid!r} is not a training class")
                else:
                    item(sp, split, parts, info, index[wnid])
        else:
            continue
        splits[split] = sp.items
        rejected += sp.rejected
        skipped[split] = len(sp.hidden)
    if mapping is not None:
        names, names_from = name_classes(order, synset_mapping(mapping), "LOC_synset_mapping.txt in " + zrel
                                  if "LOC_synset_mapping.txt" in top else "LOC_synset_mapping.txt")
    else:
        names, names_from = _read_class_names(folder, order)
    return Source(src, order, names, splits, rejected, notes, names_from, {k: v for k, v in skipped.items() if v})


# ---------------------------------------------------------------- CIFAR

@dataclass(frozen=True)
class _Cifar:
    folder: str                  # the folder inside the archive, and the extracted folder's usual name
    binary: bool
    train: tuple[str, ...]
    test: str
    meta: str
    names_key: bytes | None      # in the python meta pickle
    labels_key: bytes | None     # in the python batches
    record: int = 0              # binary: bytes per image
    label_at: int = 0            # binary: offset of the (fine) label byte


_CIFARS = {
    "cifar-10-python.tar.gz": _Cifar("cifar-10-batches-py", False, tuple(f"data_batch_{i}" for i in range(1, 6)),
                                     "test_batch", "batches.meta", b"label_names", b"labels"),
    "cifar-100-python.tar.gz": _Cifar("cifar-100-python", False, ("train",), "test", "meta", b"fine_label_names",
                                      b"fine_labels"),
    "cifar-10-binary.tar.gz": _Cifar("cifar-10-batches-bin", True, tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                                     "test_batch.bin", "batches.meta.txt", None, None, 3073, 0),
    "cifar-100-binary.tar.gz": _Cifar("cifar-100-binary", True, ("train.bin",), "test.bin", "fine_label_names.txt",
                                      None, None, 3074, 1),
}
_CIFAR_FOLDERS = {c.folder: c for c in _CIFARS.values()}


class _Refused(Exception):
    """A pickle asked for something the CIFAR unpickler does not allow."""


def _latin1(s, encoding="latin1", errors="strict"):
    """_codecs.encode as Python 3 protocol-2 pickles use it for bytes (str -> latin-1), and nothing else."""
    if not isinstance(s, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise _Refused("_codecs.encode")
    return s.encode("latin-1", errors="strict")


def _allowed() -> dict[tuple[str, str], object]:
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's batches and nothing that names other code (module docstring)."""

    def __init__(self, file):
        super().__init__(file, encoding="bytes")
        self._ok = _allowed()

    def find_class(self, module, name):
        found = self._ok.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def load_cifar_pickle(data: bytes, where: str):
    """The object in one CIFAR python file, or a one-line DataError."""
    try:
        return CifarUnpickler(io.BytesIO(data)).load()
    except _Refused as exc:
        raise DataError(f"{where}: not a CIFAR batch (pickle asks for {exc})") from None
    except Exception as exc:  # UnpicklingError, EOFError, a numpy state that does not fit, ...
        raise DataError(f"{where}: not a CIFAR batch ({type(exc).__name__}: {exc})") from None


def _get(d: dict, key: bytes):
    return d[key] if key in d else d.get(key.decode())


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _python_batch(data: bytes, where: str, spec: _Cifar, n_classes: int):
    """(pixels N x 3072 uint8, labels, file names) of a python batch, checked."""
    import numpy as np

    obj = load_cifar_pickle(data, where)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    pixels, labels, files = _get(obj, b"data"), _get(obj, spec.labels_key), _get(obj, b"filenames")
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        raise DataError(f"{where}: not a CIFAR batch (no uint8 data of N x 3072 pixels)")
    n = pixels.shape[0]
    if (not isinstance(labels, list) or len(labels) != n
            or not all(type(v) is int and 0 <= v < n_classes for v in labels)):
        raise DataError(f"{where}: not a CIFAR batch ({spec.labels_key.decode()} is not {n} labels in 0..{n_classes - 1})")
    if not isinstance(files, list) or len(files) != n or not all(isinstance(f, (bytes, str)) for f in files):
        raise DataError(f"{where}: not a CIFAR batch (no list of {n} file names)")
    names = [_text(f) for f in files]
    if any("/" in f or f in ("", ".", "..") for f in names):
        raise DataError(f"{where}: not a CIFAR batch (a file name with a slash, or empty)")
    return pixels, labels, names


def _cifar_names(data: bytes, where: str, spec: _Cifar) -> list[str]:
    if spec.binary:
        names = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    else:
        meta = load_cifar_pickle(data, where)
        got = _get(meta, spec.names_key) if isinstance(meta, dict) else None
        if not isinstance(got, list) or not all(isinstance(v, (bytes, str)) for v in got):
            raise DataError(f"{where}: not CIFAR's meta file (no {spec.names_key.decode()} list)")
        names = [_text(v) for v in got]
    if not names or len(set(names)) != len(names):
        raise DataError(f"{where}: no class names, or the same name twice")
    return names


def _cifar(src: Path, spec: _Cifar, files: dict[str, bytes], prefix: str, where: str, names_from: str,
           skipped: int) -> Source:
    """A Source of CIFAR items from the batches' bytes (FILES: name in spec.folder -> bytes); item
    paths start with PREFIX, messages name WHERE (the archive or folder)."""
    import numpy as np

    def need(name: str) -> bytes:
        if name not in files:
            raise DataError(f"{where}: no {name} in it (incomplete, or not {spec.folder})")
        return files[name]

    def rel(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    classes = _cifar_names(need(spec.meta), f"{where}/{spec.meta}", spec)
    splits: dict[str, list[Item]] = {}
    for split, batches in (("train", spec.train), ("test", (spec.test,))):
        rows = []  # (label, name, relpath, pixels)
        for batch in batches:
            data = need(batch)
            what = f"{where}/{batch}"
            if spec.binary:
                if len(data) % spec.record or not data:
                    raise DataError(f"{what}: not a CIFAR batch ({len(data)} bytes is not a whole number of "
                                    f"{spec.record}-byte records)")
                recs = np.frombuffer(data, np.uint8).reshape(-1, spec.record)
                labels = recs[:, spec.label_at].tolist()
                if max(labels) >= len(classes):
                    raise DataError(f"{what}: not a CIFAR batch (label {max(labels)} but {len(classes)} classes)")
                pixels = recs[:, spec.record - 3072:]
                names = [f"{batch}/{i:05d}" for i in range(len(recs))]
            else:
                pixels, labels, names = _python_batch(data, what, spec, len(classes))
                names = [f"{batch}/{n}" for n in names]
            hwc = np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            for i, (label, name) in enumerate(zip(labels, names)):
                key = name if spec.binary else name.split("/", 1)[1]
                rows.append((label, key, rel(name), hwc[i].tobytes()))
        rows.sort(key=lambda r: r[:3])  # the order scan lists a tree <split>/<class>/<name>
        splits[split] = [Item(rel, label, 3072, ("rgb", 32, 32, px)) for label, _, rel, px in rows]
    return Source(src, list(classes), list(classes), splits, [], [], names_from,
                  {"train": skipped} if skipped else {})


def _cifar_tar(src: Path, tgz: Path, spec: _Cifar) -> Source:
    """CIFAR from its (gzipped) tar, read in one pass in memory."""
    wanted = {*spec.train, spec.test, spec.meta}
    files: dict[str, bytes] = {}
    skipped = 0
    try:
        with tarfile.open(tgz, "r|*") as tar:
            for m in tar:
                parts = _split_parts(m.name)
                if _hidden_prefix(parts) is not None:
                    skipped += 1
                elif m.isfile() and len(parts) == 2 and parts[0] == spec.folder and parts[1] in wanted:
                    files[parts[1]] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{tgz}: damaged archive: {exc or type(exc).__name__} (cut short? download it again)") from None
    return _cifar(src, spec, files, f"{tgz.name}/{spec.folder}", f"{tgz}/{spec.folder}", f"{spec.meta} in {tgz.name}",
                  skipped)


def _cifar_folder(src: Path, folder: Path, spec: _Cifar, prefix: str) -> Source:
    """CIFAR's extracted folder."""
    files = {}
    for name in (*spec.train, spec.test, spec.meta):
        p = folder / name
        if p.is_file():
            try:
                files[name] = p.read_bytes()
            except OSError as exc:
                raise DataError(f"{p}: cannot be read: {exc.strerror or exc}") from None
    skipped = sum(hidden(n) for n in os.listdir(folder))
    return _cifar(src, spec, files, prefix, str(folder), f"{spec.meta} in {folder.name}", skipped)


def _cifar_spec_of_folder(folder: Path) -> _Cifar | None:
    """Which CIFAR an extracted folder is, by its files."""
    for spec in _CIFARS.values():
        if (folder / spec.meta).is_file() and (folder / spec.train[0]).is_file():
            return spec
    return None


# ---------------------------------------------------------------- which layout

_GZIP, _BZ2, _XZ = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")


def _first_member(path: Path) -> str | None:
    """The name of the first member (not a hidden one, unless all of the first few are) of the
    (possibly compressed) tar at PATH; "" for an empty tar, None if it is not a tar."""
    first = None
    try:
        with tarfile.open(path, "r|*") as tar:
            for k, m in enumerate(tar):
                first = m.name if first is None else first
                if not hidden(Path(m.name).name):
                    return m.name
                if k == 8:
                    break
            return first or ""
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return first


def _scan_file(src: Path) -> Source | None:
    """SRC is a file: the train tar, the Kaggle zip or a CIFAR tar(.gz) (or None)."""
    name = src.name.lower()
    try:
        with open(src, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise DataError(f"{src}: cannot be read: {exc.strerror or exc}") from None
    if name.endswith(".zip") or (head.startswith(b"PK") and zipfile.is_zipfile(src)):
        return _kaggle(src, src.parent, src, src.name == KAGGLE_ZIP)
    compressed = head.startswith((_GZIP, _BZ2, _XZ))
    first = _first_member(src)
    if first is None:
        if not name.endswith(_ARCHIVE_SUFFIXES):
            return None
        if not head:
            reason = "empty file"
        elif name.endswith((".gz", ".tgz")) and not head.startswith(_GZIP):
            reason = "damaged archive: not a gzip file"
        elif compressed:
            reason = "damaged archive: its compressed data is cut short or corrupt"
        else:
            reason = "damaged archive: not a tar archive"
        raise DataError(f"{src}: {reason}")
    parts = _split_parts(first)
    spec = _CIFAR_FOLDERS.get(parts[0]) if parts else None
    if spec is not None:
        return _cifar_tar(src, src, spec)
    if not compressed and (first.endswith(".tar") or src.name == TRAIN_TAR):
        return _ilsvrc(src, src.parent, src)
    if src.name == VAL_TAR:
        raise DataError(f"{src}: holds only the validation images; prepare needs {TRAIN_TAR}: give the folder "
                        "holding both")
    return None


def _scan_folder(root: Path) -> Source | None:
    """ROOT is a folder (without train/): one holding the downloads, or CIFAR's extracted folder."""
    spec = _cifar_spec_of_folder(root)
    if spec is not None:
        return _cifar_folder(root, root, spec, "")
    found = []  # (data set, preference: an extracted folder reads faster, how to read it)
    if (root / TRAIN_TAR).is_file():
        found.append(("ILSVRC-2012", 0, lambda: _ilsvrc(root, root, root / TRAIN_TAR)))
    if (root / KAGGLE_ZIP).is_file():
        found.append(("ILSVRC-2012 (Kaggle)", 0, lambda: _kaggle(root, root, root / KAGGLE_ZIP, True)))
    for k, (tgz, spec) in enumerate(_CIFARS.items()):
        dataset = "CIFAR-100" if "100" in spec.folder else "CIFAR-10"
        sub = root / spec.folder
        if sub.is_dir() and _cifar_spec_of_folder(sub) is spec:
            found.append((dataset, k, lambda sub=sub, spec=spec: _cifar_folder(root, sub, spec, spec.folder)))
        if (root / tgz).is_file():
            found.append((dataset, 10 + k, lambda tgz=tgz, spec=spec: _cifar_tar(root, root / tgz, spec)))
    datasets = sorted({d for d, _, _ in found})
    if len(datasets) > 1:
        raise DataError(f"{root}: holds several data sets alexcli reads ({', '.join(datasets)}); give the one to "
                        "prepare as SRC")
    return min(found, key=lambda f: f[1])[2]() if found else None


def holds_downloads(root: Path) -> bool:
    """Whether folder ROOT holds one of the downloads KNOWN lists, by name alone (nothing is read):
    for the hint given when such a folder is passed where a prepared data set belongs."""
    names = (TRAIN_TAR, KAGGLE_ZIP, KAGGLE_BASE.split("/")[0], *_CIFARS, *_CIFAR_FOLDERS)
    return any((root / name).exists() for name in names)


def scan_archive(root: Path) -> Source | None:
    """The Source of the archive at ROOT (a file), or of the downloads in ROOT (a folder without
    train/); None if ROOT is none of the layouts KNOWN lists."""
    root = Path(root)
    if root.is_dir():
        return _scan_folder(root)
    return _scan_file(root)


# ---------------------------------------------------------------- reading items (workers)

def _pread(fd: int, n: int, offset: int) -> bytes:
    """Up to N bytes at OFFSET (fewer only at the end of the file)."""
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ItemReader:
    """Reads items in a worker; one per worker process. Archives are opened once and kept open."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.base = self.root if self.root.is_dir() else self.root.parent  # archive paths are relative to it
        self._fds: dict[str, int] = {}

    def _fd(self, archive: str) -> int:
        from alexcli.data.image import Reject, open_regular

        fd = self._fds.get(archive)
        if fd is None:
            try:
                fd = open_regular(self.base / archive)[0]
            except Reject as why:
                raise Reject(f"archive {archive}: {why}") from None
            self._fds[archive] = fd
        return fd

    def read(self, item):
        from alexcli.data.image import MAX_SOURCE_BYTES, Reject, read_source

        where = item.where
        if not where:
            return read_source(self.root / item.relpath, MAX_SOURCE_BYTES)
        kind = where[0]
        try:
            if kind == "rgb":
                from PIL import Image

                _, w, h, pixels = where
                if len(pixels) != w * h * 3:
                    raise Reject(f"{len(pixels)} bytes of pixels for a {w}x{h} RGB image")
                return Image.frombytes("RGB", (w, h), pixels)
            if kind not in ("tar", "zip"):
                raise Reject(f"unknown item location {kind!r}")
            if item.nbytes > MAX_SOURCE_BYTES:
                raise Reject(f"file too large: {item.nbytes} bytes exceeds the limit of {MAX_SOURCE_BYTES}")
            if kind == "tar":
                _, archive, offset = where
                data = _pread(self._fd(archive), item.nbytes, offset)
                if len(data) != item.nbytes:
                    raise Reject(f"truncated archive: {archive} ends {item.nbytes - len(data)} bytes before the end "
                                 f"of this member (byte {offset + item.nbytes})")
                return data
            return self._zip(item, *where[1:])
        except OSError as exc:
            raise Reject(f"unreadable: {exc.strerror or exc}") from None

    def _zip(self, item, archive: str, offset: int, csize: int, method: int, crc: int) -> bytes:
        from alexcli.data.image import Reject

        fd = self._fd(archive)
        header = _pread(fd, 30, offset)
        if len(header) < 30:
            raise Reject(f"truncated archive: {archive} ends before this member's header (byte {offset})")
        if header[:4] != b"PK\x03\x04":
            raise Reject(f"corrupt zip member: no local file header at byte {offset} of {archive}")
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        start = offset + 30 + name_len + extra_len
        data = _pread(fd, csize, start)
        if len(data) != csize:
            raise Reject(f"truncated archive: {archive} ends {csize - len(data)} bytes before the end of this member")
        if method == zipfile.ZIP_STORED:
            raw = data
        elif method == zipfile.ZIP_DEFLATED:
            d = zlib.decompressobj(-15)
            try:
                raw = d.decompress(data, item.nbytes + 1)
            except zlib.error as exc:
                raise Reject(f"corrupt zip member: {exc}") from None
            if len(raw) > item.nbytes:
                raise Reject(f"corrupt zip member: inflates to more than its recorded {item.nbytes} bytes")
            if not d.eof:
                raise Reject("corrupt zip member: its compressed data ends early")
        else:
            raise Reject(f"zip compression method {method} is not supported")
        if len(raw) != item.nbytes:
            raise Reject(f"corrupt zip member: {len(raw)} bytes, not its recorded {item.nbytes}")
        if zlib.crc32(raw) != crc:
            raise Reject("zip member CRC mismatch: its data is corrupt")
        return raw

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()
