"""Where a prepared data set lives: a local folder, or a URL its files are read from.

`DataLocation` is the one place the rest of alexcli asks for a data set's files: `open_split`,
`read_manifest`, `load_stats`, `read_samples` and `alexcli verify` go through it, so no command
special-cases URLs. A `--data` value is one of:

- a local folder (a path): read as before, with its stat checks and the verified-shards cache
  (`alexcli.data.dataset`);
- `http://...` or `https://...`: read with the standard library (urllib), nothing to install;
- any other `SCHEME://...` (`s3://`, `gs://`, `file://`, `az://`, ...): read through fsspec and its
  backend for that scheme (s3fs, gcsfs, ...), when they are installed;
- `pipe:CMD`, webdataset's form: CMD contains `{}`, replaced by each file's name (dataset.json,
  stats.safetensors, train-000000.tar); the command's stdout is that file's bytes, and a command
  that exits non-zero is an error naming the command and the file.

A remote shard (`RemoteShard`) is streamed from its URL into memory (as a local shard is read into
memory whole by `read_samples`), hashed as the bytes arrive, and handed to the tar reader only after
its last byte: the byte count must be the manifest's `bytes` (a Content-Length or a listed size that
differs is refused before reading), and unless `--no-verify` its sha256 the manifest's. So no sample
of a damaged shard ever reaches a batch, and nothing is written to a local file. A read that fails
in a way that may pass (a refused or cut connection, a timeout, HTTP 5xx/408/429) is restarted from
the shard's first byte after a backoff (ALEXCLI_REMOTE_RETRIES, default 3 retries; waits of 1, 2,
4 s); `pipe:` commands are not retried. Every failure is one DataError naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import time
from pathlib import Path

from alexcli.errors import DataError, UsageError

MANIFEST = "dataset.json"
BLOCK = 1 << 20            # bytes per read from a stream
MAX_SMALL = 1 << 30        # dataset.json and stats.safetensors are small; refuse to hold more than this
RETRIES = 3                # ALEXCLI_REMOTE_RETRIES: restarts of a read after a transient failure
BACKOFF = 1.0              # ALEXCLI_REMOTE_BACKOFF: seconds before the first restart, doubled each time
TIMEOUT = 60.0             # ALEXCLI_REMOTE_TIMEOUT: seconds a connection may stay silent
SIZE_THREADS = 16          # concurrent HEAD requests when open_split checks the shards' sizes

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# fsspec's backends by scheme, for the one-line hint when one is missing
_BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
             "abfss": "adlfs", "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko",
             "hdfs": "pyarrow", "webhdfs": "requests", "oci": "ocifs", "ftp": "(none: fsspec has it)"}


def is_url(where) -> bool:
    """True for a URL or a `pipe:` command (anything alexcli does not read as a local path)."""
    if isinstance(where, DataLocation):
        return not where.is_local
    return isinstance(where, str) and (where.startswith("pipe:") or bool(_SCHEME.match(where)))


def join(base: str, name: str) -> str:
    """The URL of file NAME of the data set at BASE (for `pipe:`, the command that gives it)."""
    if base.startswith("pipe:"):
        return base.replace("{}", name)
    return base.rstrip("/") + "/" + name


def _setting(name: str, default: float) -> float:
    try:
        return type(default)(os.environ.get(name, default))
    except ValueError:
        raise UsageError(f"{name}={os.environ[name]!r}: expected a number") from None


def _why(exc: BaseException) -> str:
    """An exception as a short phrase on one line."""
    import socket

    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket's error
    if isinstance(reason, BaseException):
        return _why(reason)
    text = getattr(exc, "strerror", None) or str(reason or exc) or type(exc).__name__
    return " ".join(str(text).split())[:300]


class _Transient(Exception):
    """A failure that may pass: the read is restarted from the beginning."""


class _Reader:
    """An open stream of one file's bytes: `readinto`, then `finish()` after the last byte (a pipe's
    exit status) and `close()` in any case."""

    def __init__(self, f, url: str, length: int | None = None):
        self.f, self.url = f, url
        self.length = length  # the bytes the server said it would send (Content-Length), when it did

    def readinto(self, mv: memoryview) -> int:
        if hasattr(self.f, "readinto"):
            return self.f.readinto(mv) or 0
        chunk = self.f.read(len(mv))
        mv[:len(chunk)] = chunk
        return len(chunk)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.f.close()


class _PipeReader(_Reader):
    def __init__(self, proc, url: str, errors):
        super().__init__(proc.stdout, url)
        self.proc, self.errors = proc, errors

    def finish(self) -> None:
        code = self.proc.wait()
        if code != 0:
            self.errors.seek(0)
            tail = " ".join(self.errors.read()[-2000:].decode("utf-8", "replace").split())
            raise DataError(f"{self.url}: the command exited with status {code}" + (f" ({tail[-300:]})" if tail else ""))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait()
        with contextlib.suppress(Exception):
            self.errors.close()


class _RawStream(io.RawIOBase):
    """A _Reader as a raw binary stream (DataLocation.open)."""

    def __init__(self, reader: _Reader):
        self.reader, self.got, self.done = reader, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = _readinto(self.reader, memoryview(b).cast("B"), self.reader.url, self.got, None, transient=False)
        self.got += n
        if not n and not self.done:
            self.done = True
            self.reader.finish()
        return n

    def close(self) -> None:
        if not self.closed:
            self.reader.close()
        super().close()


def _fsspec():
    try:
        import fsspec
    except ImportError:
        return None
    return fsspec


class DataLocation:
    """A prepared data set's place: a local folder (`path`) or a URL (`url`), with one way to get at
    its files. Its str() is what the user gave (a local folder as a Path shows it); errors name
    `display(name)`, the file's path or URL."""

    def __init__(self, where):
        if isinstance(where, DataLocation):
            self.kind, self.path, self.url = where.kind, where.path, where.url
            return
        if is_url(where):
            self.path, self.url = None, where
            if where.startswith("pipe:"):
                self.kind = "pipe"
                if "{}" not in where:
                    raise UsageError(f"--data {where}: a pipe: command needs {{}} where the file name goes, e.g. "
                                     f"pipe:aws s3 cp s3://bucket/in1k/{{}} -")
            else:
                self.kind = "http" if _SCHEME.match(where).group(1).lower() in ("http", "https") else "fsspec"
        else:
            self.kind, self.path, self.url = "local", Path(where), None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    def __str__(self) -> str:
        return str(self.path) if self.is_local else self.url

    def __repr__(self) -> str:
        return f"DataLocation({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, DataLocation) and (self.kind, self.path, self.url) == (other.kind, other.path, other.url)

    def __hash__(self) -> int:
        return hash((self.kind, self.path, self.url))

    def display(self, name: str | None = None) -> str:
        """The path or URL of file NAME (None: of the data set) as errors name it."""
        if self.is_local:
            return str(self.path if name is None else self.path / name)
        return self.url if name is None else join(self.url, name)

    def recorded(self) -> str:
        """What a checkpoint records as the data it was trained on: a local folder's resolved path,
        a URL as given."""
        return str(self.path.resolve()) if self.is_local else self.url

    @property
    def name(self) -> str:
        """A short name for the data set (train's default run folder: runs/<name>)."""
        if self.is_local:
            return self.path.resolve().name
        text = self.url.split("{}")[0] if self.kind == "pipe" else self.url.split("?")[0].split("#")[0]
        parts = [p for p in re.split(r"[/\s]+", text.split("://", 1)[-1]) if p and p not in ("-",)]
        name = parts[-1] if parts else "data"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "data"

    # ------------------------------------------------------------ reading

    def _open(self, name: str, size: int | None = None) -> _Reader:
        """An open stream of file NAME. Raises DataError (for good) or _Transient (may pass)."""
        url = self.display(name)
        if self.is_local:
            try:
                return _Reader(open(self.path / name, "rb"), url)
            except OSError as exc:
                raise DataError(f"{url}: unreadable ({_why(exc)})") from None
        if self.kind == "http":
            return _open_http(url, size)
        if self.kind == "pipe":
            return _open_pipe(url, self.url[len("pipe:"):].replace("{}", name))
        return _open_fsspec(url, size)

    def open(self, name: str):
        """File NAME as a binary stream (a context manager), read as it arrives; not retried (a
        failure mid-stream is a DataError naming the URL). Shards go through `shard()` instead."""
        import io

        try:
            reader = self._open(name)
        except _Transient as exc:
            raise DataError(str(exc)) from None
        return io.BufferedReader(_RawStream(reader), BLOCK)

    def read(self, name: str, size: int | None = None) -> bytearray:
        """File NAME's bytes, streamed (and restarted from its first byte after a transient
        failure); with SIZE, any other byte count is a DataError."""
        url = self.display(name)
        return _retrying(url, lambda: _read_all(self._open(name, size), url, size))

    def read_bytes(self, name: str) -> bytes:
        """A small file of the data set (dataset.json, stats.safetensors) into memory."""
        return bytes(self.read(name))

    def sizes(self, names: list[str]) -> dict[str, int | None]:
        """The size of each of NAMES where it can be had without reading the file (-1: missing;
        None: unknown). http(s): a HEAD request each (in parallel); fsspec: one listing of the
        folder; pipe: unknown. A size found is remembered for the life of the process (train opens
        its splits several times)."""
        if self.is_local or self.kind == "pipe":
            return {n: None for n in names}
        got = {n: _SIZES[self.display(n)] for n in names if self.display(n) in _SIZES}
        todo = [n for n in names if n not in got]
        if todo and self.kind == "http":
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(SIZE_THREADS, len(todo))) as pool:
                got.update(zip(todo, pool.map(lambda n: _http_size(self.display(n)), todo)))
        elif todo:
            got.update(_fsspec_sizes(self, todo))
        _SIZES.update({self.display(n): s for n, s in got.items() if s is not None and s >= 0})
        return {n: got.get(n) for n in names}

    def shard(self, entry: dict, verify: bool = True, manifest: str = MANIFEST):
        """How read_samples gets at shard ENTRY: a local file's Path, or a RemoteShard."""
        if self.is_local:
            return self.path / entry["name"]
        return RemoteShard(self, entry, verify, manifest)


_SIZES: dict[str, int | None] = {}


def location(where) -> DataLocation:
    """WHERE (a path, a URL string or a DataLocation) as a DataLocation."""
    return where if isinstance(where, DataLocation) else DataLocation(where)


class RemoteShard:
    """One shard at a URL, as `alexcli.data.tar.read_samples` reads it: `read_bytes()` streams it
    into memory with its manifest entry's checks (bytes; sha256 with VERIFY). ENTRY None: a bare
    URL, read with no checks."""

    def __init__(self, where: DataLocation, entry: dict | None, verify: bool = True, manifest: str = MANIFEST):
        self.location, self.entry, self.verify, self.manifest = where, entry, verify, manifest

    @property
    def name(self) -> str:
        return self.entry["name"]

    def __str__(self) -> str:
        return self.location.display(self.name)

    def __repr__(self) -> str:
        return f"RemoteShard({str(self)!r})"

    def download(self, hash_it: bool) -> tuple[bytearray, str | None]:
        """The shard's bytes (their count checked against the manifest) and, with HASH_IT, their
        sha256 computed as they arrived."""
        h = hashlib.sha256() if hash_it else None
        size = self.entry["bytes"] if self.entry else None
        url = str(self)

        def attempt():
            hh = h.copy() if h is not None else None
            return _read_all(self.location._open(self.name, size), url, size, hh, self.manifest), hh

        data, hh = _retrying(url, attempt)
        return data, (hh.hexdigest() if hh is not None else None)

    def read_bytes(self) -> bytearray:
        data, digest = self.download(self.verify and self.entry is not None)
        if digest is not None and digest != self.entry["sha256"]:
            raise DataError(f"{self}: sha256 differs from {self.manifest} (corrupt or replaced); "
                            f"run `alexcli verify {self.location}`")
        return data


def shard_source(where):
    """What read_samples was given, as something with read_bytes(): a RemoteShard as it is, a bare
    URL string as an unchecked RemoteShard, anything else as a local Path."""
    if hasattr(where, "read_bytes"):
        return where
    if is_url(where):
        if where.startswith("pipe:"):  # a whole command: the "file name" is the command itself
            base, name = "pipe:{}", where[len("pipe:"):]
        else:
            base, _, name = where.rpartition("/")
        return RemoteShard(DataLocation(base), {"name": name, "bytes": None, "sha256": None}, verify=False)
    return Path(where)


# ---------------------------------------------------------------- the readers

def _retrying(url: str, attempt):
    tries = 1 + max(0, int(_setting("ALEXCLI_REMOTE_RETRIES", RETRIES)))
    wait = _setting("ALEXCLI_REMOTE_BACKOFF", BACKOFF)
    for i in range(tries):
        try:
            return attempt()
        except _Transient as exc:
            if i + 1 == tries:
                raise DataError(f"{exc}" + (f" (gave up after {tries} tries)" if tries > 1 else "")) from None
            time.sleep(wait * 2 ** i)


def _read_all(reader: _Reader, url: str, size: int | None, hasher=None, manifest: str = MANIFEST) -> bytearray:
    """Every byte of READER (SIZE of them when given: fewer or more is a DataError)."""
    try:
        if size is None:
            buf, chunk = bytearray(), bytearray(BLOCK)
            while True:
                n = _readinto(reader, memoryview(chunk), url, len(buf), None)
                if not n:
                    break
                buf += memoryview(chunk)[:n]
                if hasher is not None:
                    hasher.update(memoryview(chunk)[:n])
                if len(buf) > MAX_SMALL:
                    raise DataError(f"{url}: larger than {MAX_SMALL >> 20} MiB; not a file of a prepared data set")
            reader.finish()
            return buf
        buf = bytearray(size)
        mv = memoryview(buf)
        got = 0
        while got < size:
            n = _readinto(reader, mv[got:got + BLOCK], url, got, size)
            if not n:
                break
            if hasher is not None:
                hasher.update(mv[got:got + n])
            got += n
        if got == size and _readinto(reader, memoryview(bytearray(1)), url, got, size):
            raise DataError(f"{url}: more than the {size} bytes {manifest} says (replaced?)")
        reader.finish()  # a pipe's failure explains a short read better than its byte count
        if got < size and reader.length is not None and got < reader.length:  # (http.client: a 0-byte readinto)
            raise _Transient(f"{url}: connection cut after {got:,} of {size:,} bytes (the stream ended early)")
        if got < size:
            raise DataError(f"{url}: {got} bytes, but {manifest} says {size} (truncated or replaced)")
        return buf
    finally:
        reader.close()


def _readinto(reader: _Reader, mv: memoryview, url: str, got: int, size: int | None, transient: bool = True) -> int:
    import http.client

    try:
        return reader.readinto(mv)
    except DataError:
        raise
    except (http.client.HTTPException, OSError, ValueError) as exc:
        of = f" of {size:,}" if size is not None else ""
        text = f"{url}: connection cut after {got:,}{of} bytes ({_why(exc)})"
        raise (_Transient(text) if transient else DataError(text)) from None


def _open_http(url: str, size: int | None) -> _Reader:
    import http.client
    import urllib.error
    import urllib.request

    from alexcli import __version__

    req = urllib.request.Request(url, headers={"User-Agent": f"alexcli/{__version__}", "Accept-Encoding": "identity"})
    try:
        resp = urllib.request.urlopen(req, timeout=_setting("ALEXCLI_REMOTE_TIMEOUT", TIMEOUT))
    except urllib.error.HTTPError as exc:
        exc.close()
        text = f"{url}: HTTP {exc.code} {exc.reason}"
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Transient(text) from None
        raise DataError(text + (" (not found)" if exc.code == 404 else "")) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if isinstance(exc, ValueError):  # a URL urllib cannot parse
            raise DataError(f"{url}: not a URL alexcli can read ({_why(exc)})") from None
        raise _Transient(f"{url}: cannot connect ({_why(exc)})") from None
    length = resp.headers.get("Content-Length")
    if size is not None and length is not None and length.isdigit() and int(length) != size:
        resp.close()
        raise DataError(f"{url}: {int(length)} bytes (its Content-Length), but {MANIFEST} says {size} "
                        f"(truncated or replaced)")
    return _Reader(resp, url, int(length) if length is not None and length.isdigit() else None)


def _http_size(url: str) -> int | None:
    """A shard's size from a HEAD request (-1: not there; None: the server would not say)."""
    import urllib.error
    import urllib.request

    from alexcli import __version__

    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"alexcli/{__version__}",
                                                              "Accept-Encoding": "identity"})

    def attempt():
        try:
            with urllib.request.urlopen(req, timeout=_setting("ALEXCLI_REMOTE_TIMEOUT", TIMEOUT)) as resp:
                length = resp.headers.get("Content-Length")
                return int(length) if length is not None and length.isdigit() else None
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code in (404, 410):
                return -1
            if exc.code in (408, 425, 429) or exc.code >= 500 and exc.code not in (501,):
                raise _Transient(f"{url}: HTTP {exc.code} {exc.reason}") from None
            return None  # HEAD not allowed (405, 501) or refused: the read itself will tell
        except (urllib.error.URLError, OSError) as exc:
            raise _Transient(f"{url}: cannot connect ({_why(exc)})") from None

    return _retrying(url, attempt)


def _open_pipe(url: str, cmd: str) -> _Reader:
    import subprocess
    import tempfile

    errors = tempfile.TemporaryFile()  # the command's stderr (no name on disk), for its error line
    try:
        proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
    except OSError as exc:
        errors.close()
        raise DataError(f"{url}: cannot run the command ({_why(exc)})") from None
    return _PipeReader(proc, url, errors)


def _fsspec_missing(url: str) -> DataError:
    scheme = _SCHEME.match(url).group(1).lower()
    backend = _BACKENDS.get(scheme, "")
    backend = "" if backend.startswith("(") else backend
    also = f" and {backend}" if backend else " and its backend for that scheme"
    return DataError(f"{url}: reading {scheme}:// URLs needs fsspec{also}: pip install fsspec"
                      + (f" {backend}" if backend else ""))


def _fsspec_backend_error(url: str, exc: Exception) -> DataError:
    scheme = _SCHEME.match(url).group(1).lower()
    backend = _BACKENDS.get(scheme, "")
    hint = f": pip install {backend}" if backend and not backend.startswith("(") else ""
    return DataError(f"{url}: fsspec cannot read {scheme}:// here ({_why(exc)}){hint}")


def _open_fsspec(url: str, size: int | None) -> _Reader:
    fsspec = _fsspec()
    if fsspec is None:
        raise _fsspec_missing(url)
    try:
        f = fsspec.open(url, "rb").open()
    except ImportError as exc:  # the scheme's backend is not installed
        raise _fsspec_backend_error(url, exc) from None
    except ValueError as exc:  # "Protocol not known"
        raise _fsspec_backend_error(url, exc) from None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise DataError(f"{url}: not found") from None
    except PermissionError as exc:
        raise DataError(f"{url}: permission denied ({_why(exc)})") from None
    except OSError as exc:
        raise _Transient(f"{url}: cannot open ({_why(exc)})") from None
    listed = getattr(f, "size", None)
    if size is not None and isinstance(listed, int) and listed != size:
        f.close()
        raise DataError(f"{url}: {listed} bytes, but {MANIFEST} says {size} (truncated or replaced)")
    return _Reader(f, url, listed if isinstance(listed, int) else None)


def _fsspec_sizes(where: DataLocation, names: list[str]) -> dict[str, int | None]:
    """Sizes of NAMES from one listing of the data set's folder (unknown where it cannot be listed)."""
    fsspec = _fsspec()
    if fsspec is None:
        raise _fsspec_missing(where.url)
    try:
        fs, root = fsspec.core.url_to_fs(where.url)
        listed = {Path(e["name"]).name: e.get("size") for e in fs.ls(root, detail=True)
                  if isinstance(e, dict) and e.get("type", "file") == "file"}
    except ImportError as exc:
        raise _fsspec_backend_error(where.url, exc) from None
    except ValueError as exc:
        raise _fsspec_backend_error(where.url, exc) from None
    except Exception:  # noqa: BLE001 - a store that cannot be listed: each read checks its size
        return {n: None for n in names}
    return {n: (listed[n] if isinstance(listed.get(n), int) else None) if n in listed else -1 for n in names}
