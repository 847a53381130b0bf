"""A prepared data set as every stage sees it: dataset.json, its splits and shards, the statistics.

`open_split` is how train, eval, experiment and the figures get at shards: it reads the manifest,
checks that every shard of the split exists with the size the manifest gives (a stat per shard)
and, unless told not to (`verify=False`, the commands' `--no-verify`), that each shard's sha256 is
the manifest's. The reader (`alexcli.data.tar.read_samples`) then checks each shard's sample count
as it reads it.

Hashing is paid once per shard, not once per run: a shard found good is remembered by its
(size, mtime_ns, ctime_ns, inode, the manifest's sha256) in `.alexcli-verified.json` in the data
folder, or, where that folder is not writable (a shared read-only data set), in
`$XDG_CACHE_HOME/alexcli/verified/<sha256 of the folder's resolved path>.json` (default
~/.cache). A shard whose stat differs in any of these is hashed again; one written less than
`RACY_NS` before it was hashed is not remembered (a change within the clock's granularity would
keep its mtime: git's "racy clean" rule). A cache that cannot be read or written is ignored.
Hashing reads 1 MiB blocks in a few threads (hashlib releases the GIL).

`check_data` is `alexcli verify`: every shard hashed and read, every JPEG decoded, the statistics
and the class lists checked, all problems listed.

A data set at a URL (`https://`, any fsspec URL such as `s3://`, or `pipe:CMD`) goes through the same
functions by way of `alexcli.data.remote.DataLocation`: `open_split` reads dataset.json from it and
checks each shard's size where the store tells it without a read (a HEAD request, a listing); each
shard is then streamed into memory when the loader reaches it and checked against its manifest
entry's bytes and (unless `verify=False`) sha256 before its first sample is used
(`alexcli.data.remote.RemoteShard`). Nothing is remembered for a URL: its shards are hashed as they
stream, every time (CPU, not an extra read).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from alexcli.data.remote import DataLocation, RemoteShard, location
from alexcli.data.stats import STATS_FILE
from alexcli.data.tar import count_samples
from alexcli.errors import DataError
from alexcli.events import Advance, Begin, Progress, ignore
from alexcli.io import write_json

MANIFEST = "dataset.json"
VERIFIED_FILE = ".alexcli-verified.json"
VERIFIED_FORMAT = "alexcli-verified"
RACY_NS = 3 * 10 ** 9     # a shard changed less than this before it was hashed is not remembered
HASH_BLOCK = 1 << 20
HASH_THREADS = 4


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def read_manifest(folder: str | os.PathLike | DataLocation) -> dict:
    """dataset.json of the data set in FOLDER (a path, a URL or a DataLocation), as a dict."""
    loc = location(folder)
    if not loc.is_local:
        url = loc.display(MANIFEST)
        raw = loc.read_bytes(MANIFEST)  # a missing file or a failed read: one DataError naming the URL
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise DataError(f"{url}: unreadable ({exc})") from None
        if not isinstance(manifest, dict):
            raise DataError(f"{url}: damaged (not a JSON object)")
        return manifest
    if isinstance(folder, DataLocation):
        folder = loc.path
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DataError(_not_prepared(Path(folder)))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: damaged (not a JSON object)")
    return manifest


def has_split(manifest: dict, split: str) -> bool:
    return bool(manifest.get("splits", {}).get(split, {}).get("shards"))


def class_names(meta: dict) -> list[str]:
    """Readable class names of a manifest or a checkpoint's metadata (the class ids where none)."""
    return list(meta.get("class_names") or meta["classes"])


def sha256_file(path: Path, block: int = HASH_BLOCK) -> str:
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

    folder: DataLocation      # where the data set is: str() is the folder (or URL) as given
    name: str
    shards: list[dict]        # {"name", "samples", "bytes", "sha256"}
    classes: list[str]
    size: int                 # side of the stored images
    verify: bool = True       # a remote shard's sha256 is checked as it streams (local ones: in open_split)

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def path(self, entry: dict):
        """What `read_samples` reads the shard ENTRY from: its local Path, or for a data set at a URL
        a RemoteShard (str(): its URL), checked against ENTRY as it streams."""
        return self.folder.shard(entry, self.verify, MANIFEST)


def _not_prepared(path: Path) -> str:
    """The one line for a --data that exists but is not a prepared data set: photos or downloads
    get the two commands that make one (never a prepare into the photos' own folder)."""
    from alexcli.data.archives import holds_downloads
    from alexcli.data.prepare import default_out

    if path.is_file() or (path / "train").is_dir() or holds_downloads(path):
        what = "a file" if path.is_file() else "photos or downloads"
        return (f"{path}: {what}, not a prepared data set: prepare it with `alexcli prepare {path}`, then use "
                f"--data {default_out(path)}")
    return (f"{path}: no {MANIFEST}, so not a prepared data set (`alexcli prepare SRC` writes one, to shards/NAME "
            f"unless --out says otherwise)")


def open_split(folder: str | os.PathLike, split: str, *, verify: bool = True,
               progress: Progress = ignore) -> Split:
    """The split's shards, each checked to exist with the size dataset.json gives (a stat) and, with
    VERIFY, to have its sha256 (hashed once, then remembered: `verify_hashes`). PROGRESS gets a
    Begin("verify <split>", shards to hash, unit="shards") and an Advance per shard when any has to
    be hashed; nothing when all are remembered."""
    loc = location(folder)
    if loc.is_local and not loc.path.is_dir():
        raise DataError(_not_prepared(loc.path) if loc.path.exists() else
                        f"{loc}: no such data folder (prepare one with `alexcli prepare SRC --out {loc}`)")
    folder = loc.path if loc.is_local else loc
    manifest = read_manifest(loc)
    problems = _check_manifest(folder, manifest)[0]
    if problems:  # an edited or damaged manifest: one line here, every problem from `alexcli verify`
        raise DataError(f"{problems[0]}; run `alexcli verify {folder}`")
    splits = manifest.get("splits", {})
    if not has_split(manifest, split):
        have = ", ".join(k for k, v in splits.items() if v.get("shards")) or "none"
        raise DataError(f"{folder}: no {split!r} split in {MANIFEST} (splits: {have})")
    entries = splits[split]["shards"]
    if loc.is_local:
        for entry in entries:
            verify_shard(folder, entry)
    else:  # sizes where the store tells them; each shard's sha256 as it streams (RemoteShard)
        check_remote_sizes(loc, entries)
    opened = Split(loc, split, entries, list(manifest["classes"]), int(manifest["parameters"]["size"]), verify=False)
    return verified(opened, progress) if verify else opened


def verified(split: Split, progress: Progress = ignore) -> Split:
    """SPLIT (opened with verify=False: its manifest and sizes checked) with every shard's sha256
    checked too: local shards hashed now, once and remembered (`verify_hashes`); a URL's as they
    stream. A caller that must check other things first opens without, then calls this."""
    from dataclasses import replace

    if split.folder.is_local:
        verify_hashes(split.folder.path, split.shards, label=f"verify {split.name}", progress=progress)
    return replace(split, verify=True)


def check_remote_sizes(loc: DataLocation, entries: list[dict]) -> None:
    """Each shard of a data set at a URL is there with its manifest size, where that is known
    without reading it (http(s): a HEAD request each; fsspec: a listing; pipe: not known): the
    stat check of a local folder. Reading checks the size again in any case."""
    sizes = loc.sizes([e["name"] for e in entries])
    for e in entries:
        got = sizes.get(e["name"])
        if got == -1:
            raise DataError(f"{loc.display(e['name'])}: missing (listed in {MANIFEST})")
        if got is not None and got != e["bytes"]:
            raise DataError(f"{loc.display(e['name'])}: {got} bytes, but {MANIFEST} says {e['bytes']} "
                            f"(truncated or replaced)")


# ---------------------------------------------------------------- shards verified once, remembered

def _now_ns() -> int:
    return time.time_ns()


def user_cache_path(folder: str | os.PathLike) -> Path | None:
    """Where a data folder that is not writable has its verified shards remembered (None when there
    is no home folder to put it in)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    try:
        root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # XDG: a relative path is ignored
    except RuntimeError:  # no HOME and no password entry
        return None
    key = hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()
    return root / "alexcli" / "verified" / f"{key}.json"


def _stat_record(st: os.stat_result, sha256: str) -> dict:
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sha256": sha256}


def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != VERIFIED_FORMAT or not isinstance(doc.get("shards"), dict):
        return {}
    return doc["shards"]


class VerifiedShards:
    """The shards of FOLDER whose sha256 was found to be the manifest's, by their stat (both caches)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.places = [p for p in (self.folder / VERIFIED_FILE, user_cache_path(self.folder)) if p is not None]
        self.known = [_read_cache(p) for p in self.places]
        self.new: dict[str, dict] = {}

    def remembered(self, entry: dict, st: os.stat_result) -> bool:
        want = _stat_record(st, entry["sha256"])
        return any(k.get(entry["name"]) == want for k in self.known)

    def add(self, entry: dict, st: os.stat_result, started_ns: int) -> None:
        if max(st.st_mtime_ns, st.st_ctime_ns) < started_ns - RACY_NS:
            self.new[entry["name"]] = _stat_record(st, entry["sha256"])

    def save(self) -> None:
        """Into the data folder, else the user's cache; a failure of both only costs time next run."""
        if not self.new:
            return
        for i, place in enumerate(self.places):
            shards = {**_read_cache(place), **self.new}  # re-read: another process may have added some
            try:
                if i:
                    place.parent.mkdir(parents=True, exist_ok=True)
                write_json(place, {"format": VERIFIED_FORMAT, "version": 1, "folder": str(self.folder.resolve()),
                                   "shards": shards})
                return
            except OSError:
                continue


def verify_hashes(folder: Path, entries: list[dict], *, label: str = "verify", progress: Progress = ignore) -> None:
    """Raise DataError naming the first shard (in manifest order) whose sha256 is not the
    manifest's; shards remembered as verified with their current stat are not read."""
    from concurrent.futures import ThreadPoolExecutor

    from alexcli.env import cpu_cores

    folder = Path(folder)
    cache = VerifiedShards(folder)
    todo = []
    for entry in entries:
        st = (folder / entry["name"]).stat()  # taken before hashing: a change during it shows next time
        if not cache.remembered(entry, st):
            todo.append((entry, st))
    if not todo:
        return
    progress(Begin(label, len(todo), unit="shards"))
    started = _now_ns()
    bad = None
    threads = max(1, min(HASH_THREADS, cpu_cores(), len(todo)))
    try:
        with ThreadPoolExecutor(threads) as pool:
            for (entry, st), digest in zip(todo, pool.map(lambda t: sha256_file(folder / t[0]["name"]), todo)):
                if digest == entry["sha256"]:
                    cache.add(entry, st, started)
                elif bad is None:
                    bad = entry
                progress(Advance(1))
    finally:
        cache.save()
    if bad is not None:
        raise DataError(f"{folder / bad['name']}: sha256 differs from {MANIFEST} (corrupt or replaced); "
                        f"run `alexcli verify {folder}`")


def _stats_from_bytes(raw: bytes) -> dict:
    import numpy as np
    import torch
    from safetensors.numpy import load

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load(raw).items()}


def load_stats(folder: str | os.PathLike | DataLocation) -> dict:
    """The data set's stats.safetensors as float64 torch tensors (mean image, RGB PCA, ...), checked:
    a missing, damaged or inconsistent file is one DataError naming it."""
    stats, problems = _check_stats(location(folder), None)
    if problems:
        raise DataError(problems[0])
    return stats


# ---------------------------------------------------------------- alexcli verify: everything, every problem

STATS_SHAPES = {"mean_image": None, "rgb_mean": (3,), "rgb_std": (3,), "rgb_cov": (3, 3), "pca_eigval": (3,),
                "pca_eigvec": (3, 3)}
MAX_SAMPLE_PROBLEMS = 5  # per shard; the rest are counted
POOL_BYTES = 64 << 20    # check_data's default: worker processes only for data sets larger than this


def check_shard(path, entry: dict, size: int, num_classes: int) -> dict:
    """Everything about one shard (run in a worker process by `check_data`): it exists with its
    manifest size and sha256, holds its sample count, and every sample's JPEG decodes to a size x
    size RGB image with a label below NUM_CLASSES. PATH: a local path, or a RemoteShard (read once,
    hashed as it streams). Returns {"problems", "samples", "bytes", "ok_hash"}."""
    import io

    import numpy as np
    from PIL import Image

    from alexcli.data.image import decode_rgb
    from alexcli.data.tar import read_samples

    problems, n, per_sample = [], 0, 0
    result = {"problems": problems, "samples": 0, "bytes": 0, "ok_hash": False}
    if isinstance(path, RemoteShard):  # a data set at a URL: one streamed read, hashed as it arrives
        try:
            data, digest = path.download(hash_it=True)
        except DataError as exc:
            problems.append(str(exc))
            return result
        result["bytes"] = len(data)
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced)")
        else:
            result["ok_hash"] = True
        path = _Fetched(str(path), data)
    else:
        path = Path(path)
        if not path.is_file():
            problems.append(f"{path}: missing (listed in {MANIFEST})")
            return result
        nbytes = path.stat().st_size
        result["bytes"] = nbytes
        if nbytes != entry["bytes"]:
            problems.append(f"{path}: {nbytes} bytes, but {MANIFEST} says {entry['bytes']} (truncated or replaced)")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced)")
        else:
            result["ok_hash"] = True

    def sample_problem(text):
        nonlocal per_sample
        per_sample += 1
        if per_sample <= MAX_SAMPLE_PROBLEMS:
            problems.append(text)

    try:
        for sample in read_samples(path, entry["samples"]):
            n += 1
            where = f"{path}: sample {sample.key}"
            if not 0 <= sample.label < num_classes:
                sample_problem(f"{where}: label {sample.label}, but there are {num_classes} classes")
            try:
                with Image.open(io.BytesIO(sample.jpg)) as im:
                    fmt = im.format
                a = decode_rgb(sample.jpg)
            except Exception as exc:  # noqa: BLE001 - whatever PIL raises for bytes that are not an image
                from alexcli.data.stream import _undecodable

                sample_problem(f"{where}: undecodable JPEG ({_undecodable(exc)})")
                continue
            if fmt != "JPEG":
                sample_problem(f"{where}: a {fmt} image, not a JPEG")
            elif a.shape != (size, size, 3) or a.dtype != np.uint8:
                sample_problem(f"{where}: a {a.shape[1]}x{a.shape[0]} image, but the data set's are {size}x{size}")
    except DataError as exc:
        problems.append(str(exc))
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: unreadable ({exc})")
    if per_sample > MAX_SAMPLE_PROBLEMS:
        problems.append(f"{path}: {per_sample - MAX_SAMPLE_PROBLEMS} more samples with problems")
    result["samples"] = n
    return result


class _Fetched:
    """A remote shard's bytes, already read: what read_samples reads (str(): its URL)."""

    def __init__(self, url: str, data):
        self.url, self.data = url, data

    def __str__(self) -> str:
        return self.url

    def read_bytes(self):
        return self.data


def _check_shard_task(task):
    return check_shard(*task)


def _entry_ok(e) -> bool:
    """A shard entry as prepare writes it: a plain file name in the data set's folder (never a path
    such as ../../etc/passwd), its size, sample count and sha256."""
    return (isinstance(e, dict) and isinstance(e.get("name"), str) and isinstance(e.get("sha256"), str)
            and "/" not in e["name"] and "\\" not in e["name"] and e["name"] not in ("", ".", "..")
            and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool) and e[k] >= 0
                    for k in ("bytes", "samples")))


def _check_manifest(folder: Path, manifest: dict) -> tuple[list[str], int | None, list]:
    problems = []
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        problems.append(f"{folder}: {MANIFEST} has no list of classes")
        classes = []
    names = manifest.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(classes)):
        n = len(names) if isinstance(names, list) else "no"
        problems.append(f"{folder}: class_names lists {n} names, but classes lists {len(classes)}")
    size = manifest.get("parameters", {}).get("size") if isinstance(manifest.get("parameters"), dict) else None
    if not isinstance(size, int) or size < 1:
        problems.append(f"{folder}: {MANIFEST} gives no image size (parameters.size)")
        size = None
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not any(isinstance(v, dict) and v.get("shards") for v in splits.values()):
        problems.append(f"{folder}: {MANIFEST} lists no shards")
    for name, v in (splits.items() if isinstance(splits, dict) else ()):
        entries = v.get("shards") if isinstance(v, dict) else None
        if entries is not None and not isinstance(entries, list):
            problems.append(f"{folder}: the {name} split of {MANIFEST} has no list of shards")
        elif entries and not all(_entry_ok(e) for e in entries):
            bad = sum(not _entry_ok(e) for e in entries)
            problems.append(f"{folder}: {bad} {name} shard entries of {MANIFEST} lack a plain file name, bytes, "
                            "samples or sha256")
    return problems, size, classes


def _check_stats(folder: Path | DataLocation, size: int | None) -> tuple[dict | None, list[str]]:
    """The data set's statistics (read once) and every problem with them; SIZE: the side the mean
    image must have (None: any square)."""
    loc = location(folder)
    path = loc.display(STATS_FILE)
    if loc.is_local and not (loc.path / STATS_FILE).is_file():
        return None, [f"{path}: missing (run `alexcli prepare` again to write it)"]
    try:  # one read, local or remote (a local file that cannot be read: "PATH: unreadable (why)")
        raw = loc.read_bytes(STATS_FILE)
    except DataError as exc:
        return None, [str(exc)]
    try:
        stats = _stats_from_bytes(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors' errors for a damaged file
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, [f"{path}: unreadable ({text})"]
    problems = []
    for name, shape in STATS_SHAPES.items():
        t = stats.get(name)
        if name == "mean_image":
            side = size or (t.shape[-1] if t is not None and t.dim() else 0)
            shape = (3, side, side)
        if t is None:
            problems.append(f"{path}: no {name} tensor")
        elif shape is not None and tuple(t.shape) != shape:
            problems.append(f"{path}: {name} has shape {tuple(t.shape)}, expected {shape}")
        elif not bool(t.isfinite().all()):
            problems.append(f"{path}: {name} has values that are not finite")
    return stats, problems


def check_data(folder: str | os.PathLike, *, workers: int = 0, progress: Progress = ignore) -> dict:
    """`alexcli verify FOLDER`: the manifest, the statistics and every shard of every split
    (`check_shard`, in WORKERS processes; 0: in this one; -1: all cores when the shards hold more
    than POOL_BYTES, else this one). Shards found good are remembered as
    verified (open_split then skips hashing them). Returns {"path", "kind": "data", "ok",
    "problems", "shards", "samples", "bytes", "splits"}."""
    loc = location(folder)
    folder = loc.path if loc.is_local else loc
    manifest = read_manifest(loc)
    problems, size, classes = _check_manifest(folder, manifest)
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    splits = {k: v["shards"] for k, v in splits.items()
              if isinstance(v, dict) and isinstance(v.get("shards"), list) and v["shards"]}
    for name, entries in splits.items():  # (_check_manifest named the entries that are not)
        splits[name] = [e for e in entries if _entry_ok(e)]
    tasks = [(str(folder / e["name"]) if loc.is_local else loc.shard(e, True, MANIFEST), e, size or 0, len(classes))
             for entries in splits.values() for e in entries]
    stats_problems = _check_stats(folder, size)[1]
    progress(Begin("verify", len(tasks), unit="shards"))
    cache = VerifiedShards(folder) if loc.is_local else None  # (nothing is remembered for a URL)
    started = _now_ns()
    stats = [os.stat(t[0]) if loc.is_local and os.path.isfile(t[0]) else None for t in tasks]
    results = []
    if workers < 0:
        from alexcli.env import cpu_cores

        workers = cpu_cores() if sum(int(t[1].get("bytes", 0)) for t in tasks) > POOL_BYTES else 0
        if not loc.is_local:  # a remote read waits on the network: more processes than cores pay
            workers = min(2 * workers, 16) if workers else 0
    if workers > 1 and len(tasks) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            for r in pool.imap(_check_shard_task, tasks):
                results.append(r)
                progress(Advance(1, images=r["samples"]))
    else:
        for t in tasks:
            results.append(check_shard(*t))
            progress(Advance(1, images=results[-1]["samples"]))
    for (path, entry, _, _), st, r in zip(tasks, stats, results):
        problems += r["problems"]
        try:
            unchanged = st is not None and _stat_record(os.stat(path), "") == _stat_record(st, "")
        except OSError:
            unchanged = False
        if r["ok_hash"] and unchanged:  # not changed while it was being checked
            cache.add(entry, st, started)
    if cache is not None:
        cache.save()
    problems += stats_problems
    per_split = {}
    it = iter(results)
    for name, entries in splits.items():
        rs = [next(it) for _ in entries]
        per_split[name] = {"shards": len(entries), "samples": sum(r["samples"] for r in rs)}
    return {"path": str(folder), "kind": "data", "ok": not problems, "problems": problems,
            "shards": len(tasks), "samples": sum(r["samples"] for r in results),
            "bytes": sum(r["bytes"] for r in results), "splits": per_split}
