"""`alexcli prepare`: a source image tree -> WebDataset shards + dataset.json + stats.safetensors.

How a run is organised, and why:
- The plan (which image goes in which shard, in which order) depends only on the source listing
  and the parameters, never on timing or worker count. Training images are shuffled with --seed
  before sharding; evaluation splits keep file-name order.
- Workers read (from files or in place from archives: alexcli.data.archives), decode, resize and
  re-encode chunks of images and add their statistics: of the pixels just before encoding, or with
  --exact-stats of the JPEGs as written (alexcli.data.stats says why the default is enough). The
  main process is one of the workers (it converts whenever the chunk it must write next is not
  ready) and appends the chunks in plan order to the shard being written, so shards are the same
  for 1 or N workers.
- No torch here (its import costs over a second per process); only --exact-stats' fast decoder of
  the written JPEGs loads it.
- A shard is written as NAME.tar.tmp and renamed when complete; its manifest entry and its part
  of the statistics go to .partial/NAME.safetensors first. A rerun after Ctrl-C or kill -9 keeps
  every shard that has both, redoes the rest, and ends with the same bytes as an uninterrupted run.
- dataset.json is written last: its presence means the data set is complete.
- prepare only ever removes files it wrote: the shards, .partial records and its own JSON files that
  its manifest or plan (.alexcli-prepare.json) names. Anything else in --out is left alone, and
  --out is locked (alexcli.io.locked_folder) while a run works in it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from alexcli import __version__
from alexcli.data import stats as S
from alexcli.data.config import ImageParams, PrepareConfig  # noqa: F401  (PrepareConfig: prepare()'s argument)
from alexcli.data.dataset import MANIFEST, shard_name
from alexcli.data.archives import ItemReader
from alexcli.data.image import Reject, convert_pixels
from alexcli.data.scan import Item, Source, hold_out, scan
from alexcli.data.tar import ShardWriter, sample_key
from alexcli.env import cpu_cores, die_with_parent, pil_info, start_method
from alexcli.errors import AlexcliError, DataError, DiskFull, Interrupted, StrictRejectError, UsageError
from alexcli.events import Advance, Begin, Progress, ignore
from alexcli.io import LOCK_NAME, TMP_SUFFIX, disk_full, locked_folder, size_text, write_json, write_safetensors

PLAN_FILE = ".alexcli-prepare.json"
MANIFEST_FORMAT = "alexcli-webdataset"  # dataset.json's "format"
PARTIAL_DIR = ".partial"
REJECTED_FILE = "rejected.json"
CHUNK = 32  # images per worker task: small enough to balance 2 workers on a 500-image set
RESULTS_AHEAD = 4  # chunks handed out past the one being written, per worker (~0.6 MB each when done)


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    start: int  # index of its first sample within the split
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def make_plan(source: Source, cfg: PrepareConfig) -> tuple[list[ShardPlan], str]:
    shards: list[ShardPlan] = []
    digest = hashlib.sha256()
    digest.update(json.dumps({"params": cfg.output_parameters(), "classes": source.classes,
                              "rejected": source.rejected}, sort_keys=True).encode())
    for split, items in source.splits.items():
        order = list(items)
        if split == "train":
            random.Random(cfg.seed).shuffle(order)
        for it in order:
            digest.update(f"{split}\0{it.relpath}\0{it.label}\0{it.nbytes}\n".encode())
            if it.where:  # an archive member: its place (CIFAR's: its pixels), so a new download is a new plan
                digest.update(repr(it.where).encode())
        for i, start in enumerate(range(0, len(order), cfg.shard_size)):
            shards.append(ShardPlan(split, i, start, tuple(order[start:start + cfg.shard_size])))
    return shards, digest.hexdigest()


# ---------------------------------------------------------------- worker side

_W: dict = {}


def _init_worker(root: str, params: ImageParams, exact: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    die_with_parent()
    if exact:  # one decode thread per worker process (never set in the main process: a library
        import torch  # caller's training there would then run on one thread)

        torch.set_num_threads(1)
    _setup_worker(root, params, exact)


def _setup_worker(root: str, params: ImageParams, exact: bool) -> None:
    decode = None
    if exact:  # the JPEGs as written, decoded again: torchvision's libjpeg-turbo op, checked against PIL
        from alexcli.data.image import WrittenJpegDecoder

        decode = WrittenJpegDecoder(params)
    _W.update(reader=ItemReader(Path(root)), params=params, sums=S.ImageSums(params.size), decode=decode)


def _process_chunk(task: tuple[str, int, list[tuple[int, Item]]]):
    """Convert one chunk. Returns (samples, rejects, statistic sums or None, images upscaled)."""
    split, _shard, entries = task
    reader, params, sums, decode = _W["reader"], _W["params"], _W["sums"], _W["decode"]
    samples, rejects, upscaled = [], [], 0
    for index, item in entries:
        try:
            done = convert_pixels(reader.read(item), params)
        except Reject as exc:
            rejects.append({"path": item.relpath, "split": split, "reason": str(exc)})
            continue
        if split == "train":
            sums.add(done.image if decode is None else decode(done.jpg))
        upscaled += bool(done.info.get("upscaled"))
        meta = {"path": item.relpath, "class": item.label, **done.info}
        samples.append((sample_key(index, item.relpath),
                        {"jpg": done.jpg, "cls": str(item.label).encode(), "json": json.dumps(meta).encode()}))
    return samples, rejects, (sums.take() if split == "train" else None), upscaled


# ---------------------------------------------------------------- main side

def _tasks(shards: list[ShardPlan]) -> Iterator[tuple[str, int, list[tuple[int, Item]]]]:
    for sh in shards:
        for off in range(0, len(sh.items), CHUNK):
            chunk = sh.items[off:off + CHUNK]
            yield sh.split, sh.index, [(sh.start + off + k, it) for k, it in enumerate(chunk)]


def _partial_path(out: Path, sh: ShardPlan) -> Path:
    return out / PARTIAL_DIR / (sh.name.removesuffix(".tar") + ".safetensors")


def _load_partial(out: Path, sh: ShardPlan, fingerprint: str) -> dict | None:
    """The finished shard's record, or None if it has to be (re)done."""
    from safetensors import safe_open

    path = _partial_path(out, sh)
    if not path.is_file() or not (out / sh.name).is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["record"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None
    if meta.get("fingerprint") != fingerprint or (out / sh.name).stat().st_size != meta["entry"]["bytes"]:
        return None
    meta["sums"] = tensors if "gram" in tensors else None
    return meta


def _save_partial(out: Path, sh: ShardPlan, fingerprint: str, entry: dict, rejects: list, sums,
                  upscaled: int) -> None:
    record = json.dumps({"fingerprint": fingerprint, "entry": entry, "rejected": rejects, "upscaled": upscaled})
    write_safetensors(_partial_path(out, sh), sums or {"none": np.zeros(1)}, {"record": record})


OWN_FILES = (MANIFEST, PLAN_FILE, REJECTED_FILE, S.STATS_FILE)


def _marker(out: Path) -> tuple[str, dict] | None:
    """(file name, contents) of what says --out holds an alexcli data set: its finished manifest or
    a run's plan, each recognised by its own fields (format, fingerprint, shards); None if neither
    is there. A dataset.json that is not one prepare wrote (not JSON, another tool's) is not a
    marker: it is a file alexcli did not write, never replaced or removed."""
    for marker in (MANIFEST, PLAN_FILE):
        path = out / marker
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(found, dict) or not isinstance(found.get("fingerprint"), str):
                continue
            if marker == MANIFEST and found.get("format") != MANIFEST_FORMAT:
                continue
            if marker == PLAN_FILE and not isinstance(found.get("shards"), list):
                continue
            return marker, found
    return None


def _listed_shards(found: dict) -> list[str]:
    """The shard names a manifest or plan lists (names only of the form prepare writes)."""
    if "shards" in found:  # a plan
        names = found.get("shards") or []
    else:
        names = [e.get("name") for sp in (found.get("splits") or {}).values() for e in sp.get("shards", [])]
    return [n for n in names if isinstance(n, str) and "/" not in n and n.endswith(".tar")]


def _own_names(shards: list[str]) -> set[str]:
    """Every name in --out that a prepare run listing SHARDS may have written."""
    names = {*OWN_FILES, *shards}
    return names | {n + TMP_SUFFIX for n in names}


def _check_out(out: Path, fingerprint: str, cfg: PrepareConfig, shards: list[ShardPlan]) -> str:
    """Decide what to do with --out: 'new', 'resume' or 'done'. Refuses a different data set unless
    --overwrite, and anything that prepare did not write."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return "new"
    found = _marker(out)
    if found is not None and found[1].get("fingerprint") == fingerprint and not cfg.overwrite:
        return "done" if found[0] == MANIFEST else "resume"
    if not cfg.overwrite:
        if found is None:
            other = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)[0]
            raise UsageError(f"--out {out}: holds files that are not an alexcli data set (e.g. {other}); choose an "
                             "empty or new --out, or pass --overwrite to write the data set beside them")
        raise UsageError(f"--out {out}: holds a different data set; choose another --out or pass --overwrite "
                         "to replace it")
    if found is not None:  # remove the data set there, by the names its manifest or plan lists
        for name in sorted(_own_names(_listed_shards(found[1]))):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    clash = sorted(set(_own_names([sh.name for sh in shards])) & {p.name for p in out.iterdir()})
    if clash:
        raise UsageError(f"--out {out}: holds {clash[0]}, which alexcli did not write there (or not for the data "
                         "set it held); move it or choose another --out")
    return "new"


def _inside_source(src: Path, where: Path) -> bool:
    """Whether WHERE (resolved) is the source folder or lies in one of its image folders, followed
    through symlinks as the scan follows them (a linked train/ or class folder)."""
    root = src.resolve()
    if where == root:
        return True
    folders = []
    for d in ("train", "val", "validation", "test"):
        split = root / d
        folders.append(split.resolve())
        try:
            folders += [c.resolve() for c in split.iterdir() if c.is_symlink()]
        except OSError:  # not there, or not a folder (an archive source): nothing to follow
            pass
    return any(where.is_relative_to(f) for f in folders)


def _pool_worker(tasks, results, root: str, params: ImageParams, exact: bool, inherited=()) -> None:
    """A worker process: (index, chunk) from its own task pipe, (index, result) into its own result
    pipe. INHERITED: a forked worker's copies of the parent's ends of the pipes, closed here, so
    that each pipe has one process at either end (a worker left without its parent sees an EOF)."""
    for conn in inherited:
        conn.close()
    _init_worker(root, params, exact)
    try:
        while (task := tasks.recv()) is not None:
            results.send((task[0], _process_chunk(task[1])))
    except (EOFError, BrokenPipeError):  # the parent is gone: nothing to report, and nobody to tell
        pass


class _Board:
    """Which chunk goes to whom, and the finished ones waiting to be written: shared by the main
    thread and each worker process's feed and drain threads, under one condition variable.

    Chunks are handed out in plan order to whoever is free: a worker process keeps IN_FLIGHT of them
    queued, so it never waits for the next, and the main thread takes the next one itself whenever
    the result it has to write next is not there yet. The last CONVERTERS chunks (the processes
    converting, this one included) go one at a time, so that none sits queued behind a worker's
    current chunk while another process has nothing to do: the run ends when the last chunk does.
    Nothing is handed out more than WINDOW chunks past the one being written, which bounds the
    finished results held in memory. When a worker process dies, nothing new is handed out, what
    is finished is written in order, and the run stops at the first chunk that is not (see lost)."""

    IN_FLIGHT = 2

    def __init__(self, n_tasks: int, window: int, converters: int = 1):
        self.cv = threading.Condition()
        self.n, self.window, self.converters = n_tasks, window, converters
        self.next = 0           # the first chunk not handed out yet
        self.writing = 0        # the chunk the main thread yields next
        self.done: dict[int, object] = {}
        self.busy: dict[int, int] = {}   # worker process -> chunks it holds
        self.dead: set[int] = set()
        self.released: set[int] = set()  # workers told that nothing more comes: their end is no loss
        self.stop = False

    def _free(self) -> bool:  # caller holds cv
        return self.next < min(self.n, self.writing + self.window)

    def claim(self, worker: int) -> int | None:
        """The next chunk for worker process WORKER, waiting while it holds IN_FLIGHT or the window is
        full; None when every chunk is handed out (or the run stops)."""
        with self.cv:
            while not self.stop and self.next < self.n and not self.dead and (
                    self.busy.get(worker, 0) >= (self.IN_FLIGHT if self.n - self.next > self.converters else 1)
                    or not self._free()):
                self.cv.wait()
            if self.stop or self.next >= self.n or self.dead:  # after a death nothing new is started
                self.released.add(worker)
                return None
            i, self.next = self.next, self.next + 1
            self.busy[worker] = self.busy.get(worker, 0) + 1
            return i

    def finished(self, worker: int, i: int, result) -> None:
        with self.cv:
            self.done[i] = result
            self.busy[worker] -= 1
            self.cv.notify_all()

    def lost(self, worker: int) -> None:
        """WORKER's result pipe ended: a death unless it had been released and had delivered every
        chunk it held. A death stops the run even when the worker held no chunk, so that a run
        never goes on quietly with fewer processes than it was given (the cause, usually the OOM
        killer, is still there), and whether it stops does not depend on the moment of the death."""
        with self.cv:
            if worker not in self.released or self.busy.get(worker, 0):
                self.dead.add(worker)
            self.cv.notify_all()

    def next_step(self) -> tuple[str, int]:
        """What the main thread does now: ("write", i) the result of chunk i = `writing`,
        ("convert", j) chunk j itself (nobody else is converting what it must write next), or
        ("died", worker)."""
        with self.cv:
            while True:
                i = self.writing
                if i in self.done:
                    return "write", i
                if self.dead:  # after writing what is finished: the shards done are kept
                    return "died", min(self.dead)
                if self._free():
                    j, self.next = self.next, self.next + 1
                    self.cv.notify_all()
                    return "convert", j
                self.cv.wait(timeout=0.5)  # with a timeout: Ctrl-C reaches the main thread

    def take(self, i: int):
        with self.cv:
            self.writing = i + 1
            self.cv.notify_all()  # the window moved on
            return self.done.pop(i)

    def put(self, i: int, result) -> None:
        with self.cv:
            self.done[i] = result

    def close(self) -> None:
        with self.cv:
            self.stop = True
            self.cv.notify_all()


def _feed(conn, board: _Board, worker: int, tasks: list) -> None:
    """Hand worker process WORKER its chunks as it gets through them (a thread)."""
    try:
        while (i := board.claim(worker)) is not None:
            conn.send((i, tasks[i]))
        conn.send(None)
    except OSError:  # the worker is gone: its drain thread tells the board
        pass


def _drain(conn, board: _Board, worker: int) -> None:
    """Move WORKER's results from its pipe onto the board as they come (a thread), so that a worker
    never waits on the main thread: a chunk's result (~0.6 MB) is ten times a pipe's buffer, and
    the main thread writes shards and fsyncs them between reads."""
    while True:
        try:
            i, res = conn.recv()
        except (EOFError, OSError):
            board.lost(worker)  # a normal end once it was released and delivered all it held
            return
        board.finished(worker, i, res)


class _Pool:
    """Results of TASKS in order, converted by WORKERS processes: this one and WORKERS - 1 started
    here. Iterate for (split, shard index, chunk result); close() stops the workers.

    This process converts whenever the result it has to write next is not ready, so with 1 worker
    it converts everything (no process is started), with 2 on two cores it converts about half
    while the other worker does the rest, and with many it mostly writes. Chunks go to whoever is
    free, so a slow chunk (large photos) does not hold up the rest; the output does not depend on
    who converted what.

    The workers are forked where that is safe (alexcli.env.start_method: on Linux, before the
    progress display starts its thread, so create the pool first) and start at once; spawned ones
    import for a quarter of a second first, while this process converts. Each has a pipe of its own
    for tasks and one for results, and nothing is shared, so a worker that dies (the kernel's OOM
    killer, a kill -9) is an end of file on its result pipe and the run stops with WorkerDied at
    once. (multiprocessing.Pool starts a new worker and waits for the lost chunk for ever, and its
    terminate() can block on the queue lock the dead worker held; concurrent.futures' pool was seen
    to hang in its clean-up too.)"""

    def __init__(self, tasks: list, workers: int, args: tuple, method: str | None = None):
        self.tasks, self.args = tasks, args
        converters = min(workers, len(tasks))  # this process and the ones started here
        self.board = _Board(len(tasks), RESULTS_AHEAD * max(1, workers), converters)
        self.procs, self.threads, self.conns = [], [], []
        self.local = False  # whether this process has set up to convert
        ctx = mp.get_context(method or start_method())
        try:
            for _ in range(converters - 1):
                self._start(ctx)
            # their threads after every fork: a forked worker gets no thread's locks
            for w, (task_w, res_r) in enumerate(zip(self.conns[::2], self.conns[1::2])):
                for target, conn_args in ((_feed, (task_w, self.board, w, tasks)), (_drain, (res_r, self.board, w))):
                    self.threads.append(threading.Thread(target=target, args=conn_args, daemon=True))
                    self.threads[-1].start()
        except BaseException:
            self.close()
            raise

    def _start(self, ctx) -> None:
        task_r, task_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        # a forked child has a copy of every fd: the parent's ends of its own pipes and the other
        # workers', closed there first (spawn passes the child only what it is given)
        inherited = [*self.conns, task_w, res_r] if ctx.get_start_method() == "fork" else []
        proc = ctx.Process(target=_pool_worker, args=(task_r, res_w, *self.args, inherited), daemon=True)
        sys.stdout.flush()  # a forked child would flush what this process has buffered a second time
        sys.stderr.flush()
        with _sigint_ignored():  # inherited: Ctrl-C before the worker's own setup is not its traceback
            proc.start()
        task_r.close()  # the child's ends: closed here, so a dead child is an EOF or EPIPE
        res_w.close()
        self.procs.append(proc)
        self.conns += [task_w, res_r]

    def __iter__(self):
        board = self.board
        for i, task in enumerate(self.tasks):
            while (step := board.next_step())[0] != "write":
                if step[0] == "died":
                    raise WorkerDied("a prepare worker process died (killed by the system: out of memory?)")
                if not self.local:
                    _setup_worker(*self.args)
                    self.local = True
                board.put(step[1], _process_chunk(self.tasks[step[1]]))
            yield task[0], task[1], board.take(i)

    def close(self) -> None:
        self.board.close()
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join()
        for thread in self.threads:  # the workers are gone: their pipes end, and each thread with them
            thread.join(timeout=5)
        for conn in self.conns:
            conn.close()
        if self.local:
            _W["reader"].close()
            self.local = False
        self.procs, self.threads, self.conns = [], [], []


@contextmanager
def _sigint_ignored():
    """SIGINT ignored while a worker process starts (it inherits that, through exec too, and sets
    its own), where this is the main thread: only it can set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class WorkerDied(AlexcliError):
    """A worker process ended without a result; _prepare adds what is kept."""


_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_KNOWN_NAMES = {"cifar-10-python": "cifar10", "cifar-10-binary": "cifar10", "cifar-10-batches-py": "cifar10",
                "cifar-10-batches-bin": "cifar10", "cifar-100-python": "cifar100", "cifar-100-binary": "cifar100",
                "imagenet-object-localization-challenge": "imagenet", "ILSVRC2012_img_train": "imagenet"}


def default_out(src: str | os.PathLike) -> Path:
    """prepare's --out when none is given: shards/<name of SRC>, an archive's name without its
    suffix, CIFAR's downloads as cifar10 / cifar100."""
    name = Path(src).resolve().name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path("shards") / _KNOWN_NAMES.get(name, name)


def prepare(src: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig,
            progress: Progress = ignore) -> dict:
    """Prepare `src` into `out`; returns the summary (also what `--json` prints)."""
    t0 = time.monotonic()
    cfg.validate()
    out = Path(out)
    if _inside_source(Path(src), out.resolve()):
        raise UsageError(f"--out {out}: inside the source's image folders ({src}); the next prepare would read "
                         "its shards as images: choose an --out outside them")
    source = scan(src)
    if cfg.holdout:
        source = hold_out(source, cfg.holdout, cfg.seed)
    # --strict does not stop at the listing's rejects: its message counts every file that cannot be
    # used, so the images are converted first (the shards are kept: a rerun without --strict resumes).
    shards, fingerprint = make_plan(source, cfg)
    with locked_folder(out, "prepare"):
        return _prepare(source, out, cfg, shards, fingerprint, progress, t0)


def _prepare(source: Source, out: Path, cfg: PrepareConfig, shards: list[ShardPlan], fingerprint: str,
             progress: Progress, t0: float) -> dict:
    """prepare(), with --out locked."""
    state = _check_out(out, fingerprint, cfg, shards)
    if state == "done":
        _clean_up(out)  # a run killed after writing dataset.json, before its clean-up: finish that
        summary = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["summary"]
        return {**summary, "status": "up to date", "seconds": round(time.monotonic() - t0, 2), "images_per_s": None}

    (out / PARTIAL_DIR).mkdir(exist_ok=True)
    names = [sh.name for sh in shards]
    for name in _own_names(names):  # temporary files left by a killed run (ours only)
        if name.endswith(TMP_SUFFIX):
            (out / name).unlink(missing_ok=True)
    write_json(out / PLAN_FILE, {"fingerprint": fingerprint, "source": str(source.root.resolve()),
                                 "parameters": cfg.output_parameters(), "shards": names})
    records = {sh.name: _load_partial(out, sh, fingerprint) for sh in shards}
    todo = [sh for sh in shards if records[sh.name] is None]
    total = sum(len(sh.items) for sh in shards)
    n_todo = sum(len(sh.items) for sh in todo)
    workers = max(1, min(cfg.workers or cpu_cores(), -(-n_todo // CHUNK)))

    by_name = {sh.name: sh for sh in todo}
    remaining = {sh.name: -(-len(sh.items) // CHUNK) for sh in todo}
    writer, rejects, sums, upscaled = None, [], None, 0
    # the pool first: before the progress display starts a thread, its workers can be forked
    results = _Pool(list(_tasks(todo)), workers, (str(source.root), cfg.image_params(), cfg.exact_stats))
    try:
        progress(Begin("prepare", total))
        progress(Advance(total - n_todo))
        for split, index, (samples, chunk_rejects, chunk_sums, chunk_upscaled) in results:
            sh = by_name[shard_name(split, index)]
            if writer is None:
                writer, rejects, upscaled = ShardWriter(out / sh.name), [], 0
                sums = S.empty_sums(cfg.size) if split == "train" else None
            for key, members in samples:
                writer.write(key, members)
            rejects.extend(chunk_rejects)
            upscaled += chunk_upscaled
            if sums is not None:
                S.merge_into(sums, chunk_sums)
            progress(Advance(len(samples) + len(chunk_rejects)))
            remaining[sh.name] -= 1
            if remaining[sh.name] == 0:
                entry = writer.finish()
                _save_partial(out, sh, fingerprint, entry, rejects, sums, upscaled)
                writer.publish()
                records[sh.name] = {"entry": entry, "rejected": rejects, "sums": sums, "upscaled": upscaled}
                writer = None
    except (KeyboardInterrupt, WorkerDied) as exc:
        if writer is not None:
            writer.abort()
        kept = sum(r is not None for r in records.values())
        error, what = (Interrupted, "interrupted") if isinstance(exc, KeyboardInterrupt) else (AlexcliError, exc)
        raise error(f"{what}: {kept} of {len(shards)} shards are complete in {out}; "
                    "run the same command again to continue") from None
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if isinstance(exc, DiskFull):  # alexcli.io names the file; add what is still to write
            left = sum(len(sh.items) for sh in todo if records[sh.name] is None)
            per = _bytes_per_image(records)
            more = f"about {left:,} images still to write" + (f", about {size_text(left * per)}" if per else "")
            raise disk_full(exc.path, exc.needed, exc.written, more) from None
        raise
    finally:
        results.close()
    return _finish(out, source, cfg, shards, records, fingerprint, state, t0, n_todo)


def _bytes_per_image(records: dict) -> float | None:
    done = [r["entry"] for r in records.values() if r is not None and r["entry"]["samples"]]
    return sum(e["bytes"] for e in done) / sum(e["samples"] for e in done) if done else None


def _finish(out: Path, source: Source, cfg: PrepareConfig, shards: list[ShardPlan], records: dict,
            fingerprint: str, state: str, t0: float, processed: int) -> dict:
    rejected = list(source.rejected)
    splits: dict[str, dict] = {}
    image_sum, count = np.zeros((cfg.size, cfg.size, 3), np.float64), 0
    gram = [[0] * 3 for _ in range(3)]  # Python ints: ImageNet's Gram sum exceeds float64's 2^53
    for split in source.splits:
        splits[split] = {"found": source.found(split), "written": 0, "rejected": 0, "shards": []}
    for sh in shards:
        rec = records[sh.name]
        splits[sh.split]["shards"].append(rec["entry"])
        splits[sh.split]["written"] += rec["entry"]["samples"]
        rejected.extend(rec["rejected"])
        if rec["sums"] is not None:
            image_sum += rec["sums"]["image_sum"]
            count += int(rec["sums"]["count"][0])
            for i in range(3):
                for j in range(3):
                    gram[i][j] += int(rec["sums"]["gram"][i][j])
    for r in rejected:
        splits[r["split"]]["rejected"] += 1
    for split, s in splits.items():
        assert s["found"] == s["written"] + s["rejected"], (split, s)  # nothing silently lost
    rejected.sort(key=lambda r: (r["split"], r["path"]))
    write_json(out / REJECTED_FILE, rejected)
    if cfg.strict and rejected:
        listed = len(source.rejected)
        raise StrictRejectError(f"--strict: {len(rejected)} files cannot be used ({listed} found while listing, "
                                f"{len(rejected) - listed} failed to convert), listed in {out / REJECTED_FILE}; "
                                "the shards are kept: rerun without --strict to finish")
    if count == 0:
        raise DataError(f"{source.root}: none of the {splits['train']['found']} training files could be used "
                        f"(reasons in {out / REJECTED_FILE})")
    stats = S.finalize(image_sum, gram, count)
    pixels = S.AS_WRITTEN if cfg.exact_stats else S.BEFORE_ENCODING
    S.save(out / S.STATS_FILE, stats, count, pixels)
    upscaled = sum(records[sh.name].get("upscaled", 0) for sh in shards)
    seconds = time.monotonic() - t0
    summary = {
        "out": str(out),
        "status": "resumed" if state == "resume" else "prepared",
        "classes": len(source.classes),
        "splits": {k: {kk: vv for kk, vv in v.items() if kk != "shards"} | {"shards": len(v["shards"])}
                   for k, v in splits.items()},
        "found": sum(s["found"] for s in splits.values()),
        "written": sum(s["written"] for s in splits.values()),
        "rejected": len(rejected),
        "rejected_file": str(out / REJECTED_FILE),
        "skipped": sum(source.skipped.values()),  # hidden files passed over (.DS_Store, ._*): not in found
        "class_names_from": source.names_from,
        "upscaled": upscaled,
        "size": cfg.size,
        "stats": {"pixels": pixels, "rgb_mean": stats["rgb_mean"].tolist(), "pca_eigval": stats["pca_eigval"].tolist()},
        "notes": source.notes,
        "warnings": source.warnings,
        "pil": pil_info(),
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 1) if seconds > 0 else None,
    }
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": 1,
        "alexcli_version": __version__,
        "fingerprint": fingerprint,
        "source": str(source.root.resolve()),
        "parameters": cfg.output_parameters(),
        "classes": source.classes,
        "class_names": source.class_names,
        "splits": splits,
        "stats": {"file": S.STATS_FILE, "image_count": count, "scale": "0-1", "pixels": pixels,
                  "rgb_mean": stats["rgb_mean"].tolist(), "rgb_std": stats["rgb_std"].tolist(),
                  "pca_eigval": stats["pca_eigval"].tolist()},
        "rejected_file": REJECTED_FILE,
        "sample": {"key": "NNNNNNNN_<source stem>", "jpg": "size x size RGB JPEG", "cls": "class index",
                   "json": "path, class, size [w, h] and mode of the source"},
        # What `prepare` printed, minus what differs between runs (so a resumed run's file is the same).
        "summary": {k: v for k, v in summary.items() if k not in ("status", "seconds", "images_per_s")},
    }
    write_json(out / MANIFEST, manifest)
    _clean_up(out)
    return summary


def _clean_up(out: Path) -> None:
    """Once dataset.json is written: the plan and the partial records are no longer needed."""
    (out / PLAN_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
