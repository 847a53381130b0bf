"""The one way alexcli writes a file: atomically, with one file-mode rule.

Every file goes to `NAME.tmp` beside its final name, is flushed and fsynced, and is then renamed
over `NAME`: a crash, a full disk or a kill leaves either the old file or the new one under the
final name, never half of one. A write that fails removes its `.tmp`. Files are created by
`open()`, so their mode is 0666 minus the umask like any file a user's program writes (safetensors'
own `save_file` makes 0600 files; that is why tensors are serialised to bytes here and written like
everything else).

`AtomicFile` is the streaming form (shards, the feature cache: written piece by piece, published
when complete); `atomic_write` writes bytes, text or whatever a callback puts into the open file.
A full disk (ENOSPC, EDQUOT) becomes `DiskFull`, one line naming the file and the space free.

`FolderLock` is the one lock: prepare holds it on its --out, train on its run folder (both through
`locked_folder`), so a second run into the same folder is refused in one line naming the first
one's pid.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

from alexcli.errors import Busy, DiskFull

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".alexcli.lock"
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} TB"


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free to unprivileged users on the file system holding PATH (None if unknown)."""
    p = Path(path)
    for folder in (p, *p.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full(path: str | os.PathLike, needed: int | None = None, written: int | None = None,
              more: str = "") -> DiskFull:
    """The one-line error for a write to PATH that ran out of space (MORE: what the job still has to
    write, from a caller that knows)."""
    free = free_space(path)
    parts = [f"{size_text(free) if free else 'nothing'} free"]
    if needed:
        parts.append(f"this file needs {size_text(needed)}")
    elif written:
        parts.append(f"{size_text(written)} of it written before the disk filled")
    if more:
        parts.append(more)
    err = DiskFull(f"{path}: no space left on device ({'; '.join(parts)}); nothing is left half-written: "
                   "free some space and run the same command again")
    err.path, err.needed, err.written = Path(path), needed, written
    return err


def tmp_path(path: str | os.PathLike) -> Path:
    """Where PATH is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


class AtomicFile:
    """An open binary file under PATH.tmp. `finish()` flushes, fsyncs and closes it; `publish()`
    renames it to PATH; `abort()` closes and removes it. As a context manager it publishes on a
    normal exit and aborts on an exception."""

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.size = size  # the final size when known (named in a disk-full error)
        self.written = 0
        try:
            self.file: BinaryIO = open(self.tmp, "wb")
        except OSError as exc:  # no inode left is a full disk too
            if is_disk_full(exc):
                raise disk_full(self.path, size) from None
            raise

    def write(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            self._failed(exc)
        self.written += len(data)

    def _failed(self, exc: OSError):
        """Remove the temporary file; a full disk becomes one DiskFull line naming the final path."""
        self.abort()
        if is_disk_full(exc):
            raise disk_full(self.path, self.size, self.written) from None
        raise exc

    def finish(self) -> None:
        if not self.file.closed:
            try:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            except OSError as exc:
                self._failed(exc)

    def publish(self) -> Path:
        self.finish()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # closing flushes: on a full disk that fails again, and the file goes anyway
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.publish()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
            if is_disk_full(exc):
                raise disk_full(self.path, self.size) from None


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write DATA (bytes, UTF-8 text, or a callback that writes into the open binary file) to
    PATH atomically; returns PATH. The parent folder must exist."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with AtomicFile(path, None if callable(data) else len(data)) as f:
        if callable(data):
            data(f.file)
        else:
            f.write(data)
    return Path(path)


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """DST as another name of the file SRC, atomically: a hard link made under DST's temporary name
    and renamed over DST (no second copy of the bytes); where the file system has no hard links
    (or SRC is on another one), a copy written as atomic_write writes. Returns "link" or "copy"."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + TMP_SUFFIX)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))
        return "copy"
    os.replace(tmp, dst)
    return "link"


def write_json(path: str | os.PathLike, obj, indent: int = 1) -> Path:
    """OBJ as JSON (with a final newline), atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list) -> Path:
    """One JSON object per line, the whole file rewritten atomically."""
    return atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_safetensors(path: str | os.PathLike, tensors: Mapping, metadata: Mapping[str, str] | None = None) -> Path:
    """torch tensors (any device; made contiguous on the CPU) or numpy arrays as a safetensors
    file, atomically."""
    import numpy as np

    if any(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save
    else:
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, save(dict(tensors), metadata=dict(metadata) if metadata else None))


class FolderLock:
    """An exclusive lock on FOLDER for one alexcli COMMAND, held while the command works in it: a
    second prepare or train into the same folder is refused with the first one's pid. It is an
    flock on FOLDER/.alexcli.lock, so the kernel releases it when its holder dies, even by kill -9;
    the file is removed on release. A system without fcntl (Windows) runs unlocked."""

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                h = _holder(fd)
                os.close(fd)
                who = (f"alexcli {h.get('command')} (pid {h.get('pid')} on {h.get('host')})" if h.get("command")
                       else "another alexcli process")
                raise Busy(f"{self.folder}: in use by {who}; wait for it to finish or choose another folder") from None
            try:  # the holder before us may have removed the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"command": self.command, "pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> dict:
    """{"command", "pid", "host"} as the lock's holder wrote them into the file open as FD ({} when
    it wrote nothing readable)."""
    try:
        h = json.loads(os.read(fd, 4096).decode("utf-8", "replace"))
    except ValueError:
        return {}
    return {k: h.get(k) for k in ("command", "pid", "host")} if isinstance(h, dict) else {}


def lock_holder(folder: str | os.PathLike) -> dict | None:
    """Who holds FOLDER's lock ({"command", "pid", "host"}, each None if unknown), or None when
    nobody does, for a reader such as `alexcli runs`: a non-blocking shared flock on the existing
    lock file, released at once. No lock file is made, and one left by a killed process reads as
    free. (A `FolderLock` taken in the same microseconds would be refused as busy.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: FolderLock does not lock there either
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: free (an unreadable one cannot be tested)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return dict.fromkeys(("command", "pid", "host")) | _holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, command: str):
    """FOLDER, made if it is missing and locked for COMMAND while the block runs. A folder made here
    is removed again if the block leaves it empty: a run refused before it wrote anything leaves no
    empty --out behind."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(folder, command):
            yield folder
    finally:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
