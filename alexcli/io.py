"""The one way alexcli writes a file: atomically, with one file-mode rule.

Every file goes to `NAME.tmp` beside its final name, is flushed and fsynced, and is then renamed
over `NAME`: a crash, a full disk or a kill leaves either the old file or the new one under the
final name, never half of one. A write that fails removes its `.tmp`. Files are created by
`open()`, so their mode is 0666 minus the umask like any file a user's program writes (safetensors'
own `save_file` makes 0600 files; that is why tensors are serialised to bytes here and written like
everything else).

`AtomicFile` is the streaming form (shards, the feature cache: written piece by piece, published
when complete); `atomic_write` writes bytes, text or whatever a callback puts into the open file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

TMP_SUFFIX = ".tmp"


def tmp_path(path: str | os.PathLike) -> Path:
    """Where PATH is written before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


class AtomicFile:
    """An open binary file under PATH.tmp. `finish()` flushes, fsyncs and closes it; `publish()`
    renames it to PATH; `abort()` closes and removes it. As a context manager it publishes on a
    normal exit and aborts on an exception."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = tmp_path(self.path)
        self.file: BinaryIO = open(self.tmp, "wb")

    def finish(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def publish(self) -> Path:
        self.finish()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
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


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write DATA (bytes, UTF-8 text, or a callback that writes into the open binary file) to
    PATH atomically; returns PATH. The parent folder must exist."""
    with AtomicFile(path) as f:
        if callable(data):
            data(f.file)
        else:
            f.file.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


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
