"""WebDataset shards: written under a temporary name and renamed when complete, hashed as written,
and checked against dataset.json when read.

A sample is the tar members `KEY.cls`, `KEY.jpg`, `KEY.json`. webdataset splits a member name at
its first dot into key and extension, so keys never contain dots (see `sample_key`).
Tar headers carry fixed times and owners, so the same samples always give the same bytes
(a resumed run's shards are byte-identical to an uninterrupted run's).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from pathlib import Path

from alexcli.errors import DataError

MANIFEST = "dataset.json"
FIXED_MTIME = 1_356_998_400  # 2013-01-01, a fixed date so archives are reproducible
_PAD = [tarfile.NUL * (-n % tarfile.BLOCKSIZE) for n in range(tarfile.BLOCKSIZE)]  # by len(data) % 512


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(index: int, relpath: str) -> str:
    stem = Path(relpath).stem
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:60]}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, FIXED_MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _tobuf(name: str, size: int) -> bytes:
    return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


# A member header is this template with the name, the size and the checksum filled in.
_TEMPLATE = _tobuf("", 0)
_SIZE, _CHKSUM = slice(124, 136), slice(148, 155)  # USTAR field offsets (size: 11 octal digits + NUL)
_TEMPLATE_SUM = 256 + sum(_TEMPLATE[:148]) + sum(_TEMPLATE[156:]) - sum(_TEMPLATE[_SIZE])  # chksum field as spaces


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile.TarInfo.tobuf` makes for a regular file with our fixed
    owner, mode and time, built from a template: about 2 us against tarfile's 20 us (a sample has
    three members)."""
    raw = name.encode("ascii", "ignore")
    if len(raw) != len(name) or len(raw) > 100 or size >= 8 ** 11:
        return _tobuf(name, size)  # non-ASCII or long names, huge members: let tarfile decide
    digits = b"%011o\0" % size
    h = bytearray(_TEMPLATE)
    h[:len(raw)] = raw
    h[_SIZE] = digits
    h[_CHKSUM] = b"%06o\0" % (_TEMPLATE_SUM + sum(raw) + sum(digits))
    return bytes(h)


class ShardWriter:
    """Writes one shard to `FINAL.tmp`; `finish()` closes and fsyncs it, `publish()` renames it.

    Members are written as USTAR header + data + padding directly (headers equal to tarfile's own
    `TarInfo.tobuf`, see `member_header`): tarfile's `addfile` costs about 4x more per sample
    through its file copying.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._sha = hashlib.sha256()
        self.nbytes = 0
        self.samples = 0

    def _put(self, b: bytes) -> None:
        self._sha.update(b)
        self._file.write(b)
        self.nbytes += len(b)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key:
            raise ValueError(f"webdataset key must not contain dots: {key!r}")
        parts = []
        for ext in sorted(members):
            data = members[ext]
            parts += (member_header(f"{key}.{ext}", len(data)), data, _PAD[len(data) % tarfile.BLOCKSIZE])
        self._put(b"".join(parts))  # one hash update and one write per sample
        self.samples += 1

    def finish(self) -> dict:
        """End the archive (still under the temporary name); returns its manifest entry."""
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then pad to a whole record as tar does
        end += -(self.nbytes + end) % tarfile.RECORDSIZE
        self._put(tarfile.NUL * end)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"name": self.final.name, "samples": self.samples, "bytes": self.nbytes,
                "sha256": self._sha.hexdigest()}

    def publish(self) -> None:
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(f"{folder}: no {MANIFEST} (prepare a data set with `alexcli prepare SRC --out {folder}`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(folder: Path, entry: dict, *, full: bool = False) -> None:
    """Raise DataError if the shard's size (and with `full`, its sha256 and sample count)
    disagree with its manifest entry. A tar cut at a 512-byte boundary reads back short with no
    error from tarfile or webdataset, so the manifest is the only guard."""
    path = Path(folder) / entry["name"]
    if not path.is_file():
        raise DataError(f"{path}: missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"{path}: {size} bytes, but {MANIFEST} says {entry['bytes']} (truncated or replaced)")
    if full:
        if sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced)")
        keys = set()
        with tarfile.open(path) as tar:
            for m in tar:
                keys.add(m.name.split(".", 1)[0])
        if len(keys) != entry["samples"]:
            raise DataError(f"{path}: {len(keys)} samples, but {MANIFEST} says {entry['samples']}")
