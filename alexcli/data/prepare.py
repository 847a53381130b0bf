"""`alexcli prepare`: a source image tree -> WebDataset shards + dataset.json + stats.safetensors.

How a run is organised, and why:
- The plan (which image goes in which shard, in which order) depends only on the source listing
  and the parameters, never on timing or worker count. Training images are shuffled with --seed
  before sharding; evaluation splits keep file-name order.
- Workers decode, resize and re-encode chunks of images and add the statistics of the JPEGs
  *as written* (the pixels the network will see). The main process receives the chunks in plan
  order and appends them to the shard being written, so shards are the same for 1 or N workers.
- A shard is written as NAME.tar.tmp and renamed when complete; its manifest entry and its part
  of the statistics go to .partial/NAME.safetensors first. A rerun after Ctrl-C or kill -9 keeps
  every shard that has both, redoes the rest, and ends with the same bytes as an uninterrupted run.
- dataset.json is written last: its presence means the data set is complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from alexcli import __version__
from alexcli.data import stats as S
from alexcli.data.config import ImageParams, PrepareConfig  # noqa: F401  (PrepareConfig: prepare()'s argument)
from alexcli.data.dataset import MANIFEST, shard_name
from alexcli.data.image import Reject, WrittenJpegDecoder, convert
from alexcli.data.scan import Item, Source, hold_out, scan
from alexcli.data.tar import ShardWriter, sample_key
from alexcli.env import cpu_cores, pil_info
from alexcli.errors import DataError, Interrupted, StrictRejectError, UsageError
from alexcli.events import Advance, Begin, Progress, ignore
from alexcli.io import TMP_SUFFIX, write_json, write_safetensors

PLAN_FILE = ".alexcli-prepare.json"
PARTIAL_DIR = ".partial"
REJECTED_FILE = "rejected.json"
CHUNK = 32  # images per worker task: small enough to balance 2 workers on a 500-image set


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
        for i, start in enumerate(range(0, len(order), cfg.shard_size)):
            shards.append(ShardPlan(split, i, start, tuple(order[start:start + cfg.shard_size])))
    return shards, digest.hexdigest()


# ---------------------------------------------------------------- worker side

_W: dict = {}


def _init_worker(root: str, params: ImageParams) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _setup_worker(root, params)


def _setup_worker(root: str, params: ImageParams) -> None:
    import torch

    torch.set_num_threads(1)
    _W.update(root=Path(root), params=params, sums=S.ImageSums(params.size), decode=WrittenJpegDecoder(params))


def _process_chunk(task: tuple[str, int, list[tuple[int, Item]]]):
    """Convert one chunk. Returns (samples, rejects, statistic sums or None)."""
    split, _shard, entries = task
    root, params, sums, decode = _W["root"], _W["params"], _W["sums"], _W["decode"]
    samples, rejects = [], []
    for index, item in entries:
        try:
            try:
                data = (root / item.relpath).read_bytes()
            except OSError as exc:
                raise Reject(f"unreadable: {exc.strerror or exc}") from None
            jpg, info = convert(data, params)
        except Reject as exc:
            rejects.append({"path": item.relpath, "split": split, "reason": str(exc)})
            continue
        if split == "train":
            sums.add(decode(jpg))  # the statistics are over the JPEG as written: what the network will see
        meta = {"path": item.relpath, "class": item.label, **info}
        samples.append((sample_key(index, item.relpath),
                        {"jpg": jpg, "cls": str(item.label).encode(), "json": json.dumps(meta).encode()}))
    return samples, rejects, (sums.take() if split == "train" else None)


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


def _save_partial(out: Path, sh: ShardPlan, fingerprint: str, entry: dict, rejects: list, sums) -> None:
    record = json.dumps({"fingerprint": fingerprint, "entry": entry, "rejected": rejects})
    write_safetensors(_partial_path(out, sh), sums or {"none": np.zeros(1)}, {"record": record})


def _check_out(out: Path, fingerprint: str, cfg: PrepareConfig) -> str:
    """Decide what to do with --out: 'new', 'resume' or 'done'. Refuses a different data set."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    for marker in (MANIFEST, PLAN_FILE):
        path = out / marker
        if path.is_file():
            try:
                theirs = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
            except ValueError:
                theirs = None
            if theirs == fingerprint and not cfg.overwrite:
                return "done" if marker == MANIFEST else "resume"
            break
    if not cfg.overwrite:
        what = "a different data set" if any((out / m).is_file() for m in (MANIFEST, PLAN_FILE)) \
            else "files that are not an alexcli data set"
        raise UsageError(f"--out {out}: holds {what}; choose another --out or pass --overwrite")
    _clear(out)
    return "new"


def _clear(out: Path) -> None:
    """Remove what prepare writes (and nothing else) from `out`."""
    for p in out.iterdir():
        if p.name in (MANIFEST, PLAN_FILE, REJECTED_FILE, S.STATS_FILE) or p.name.endswith((".tar", ".tar" + TMP_SUFFIX,
                                                                                           ".json" + TMP_SUFFIX)):
            p.unlink()
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)


def _results(shards, source: Source, cfg: PrepareConfig, workers: int):
    """Yield (split, shard index, chunk result) in plan order, with 1 worker in this process."""
    tasks = list(_tasks(shards))  # one list: handed to the pool and paired with its results
    if workers <= 1:
        _setup_worker(str(source.root), cfg.image_params())
        for t in tasks:
            yield t[0], t[1], _process_chunk(t)
        return
    # spawn, not fork: the parent may hold torch's thread pools, which do not survive fork.
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(source.root), cfg.image_params()))
    try:
        for t, res in zip(tasks, pool.imap(_process_chunk, tasks, chunksize=1)):
            yield t[0], t[1], res
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def prepare(src: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig,
            progress: Progress = ignore) -> dict:
    """Prepare `src` into `out`; returns the summary (also what `--json` prints)."""
    t0 = time.monotonic()
    if cfg.size < 8 or not 1 <= cfg.quality <= 100 or cfg.shard_size < 1:
        raise UsageError("--size must be >= 8, --quality 1..100 and --shard-size >= 1")
    source = scan(src)
    if cfg.holdout:
        source = hold_out(source, cfg.holdout, cfg.seed)
    if cfg.strict and source.rejected:
        first = source.rejected[0]
        raise StrictRejectError(f"--strict: {len(source.rejected)} files cannot be used, "
                                f"first {first['path']}: {first['reason']}")
    out = Path(out)
    shards, fingerprint = make_plan(source, cfg)
    state = _check_out(out, fingerprint, cfg)
    if state == "done":
        summary = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["summary"]
        return {**summary, "status": "up to date", "seconds": round(time.monotonic() - t0, 2), "images_per_s": None}

    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_DIR).mkdir(exist_ok=True)
    for stale in out.glob("*" + TMP_SUFFIX):  # left by a killed run
        stale.unlink()
    write_json(out / PLAN_FILE, {"fingerprint": fingerprint, "source": str(source.root.resolve()),
                                        "parameters": cfg.output_parameters()})
    records = {sh.name: _load_partial(out, sh, fingerprint) for sh in shards}
    todo = [sh for sh in shards if records[sh.name] is None]
    total = sum(len(sh.items) for sh in shards)
    progress(Begin("prepare", total))
    progress(Advance(total - sum(len(sh.items) for sh in todo)))
    n_todo = sum(len(sh.items) for sh in todo)
    workers = max(1, min(cfg.workers or cpu_cores(), -(-n_todo // CHUNK)))

    by_name = {sh.name: sh for sh in todo}
    remaining = {sh.name: -(-len(sh.items) // CHUNK) for sh in todo}
    writer, rejects, sums = None, [], None
    results = _results(todo, source, cfg, workers)
    try:
        for split, index, (samples, chunk_rejects, chunk_sums) in results:
            sh = by_name[shard_name(split, index)]
            if writer is None:
                writer, rejects, sums = ShardWriter(out / sh.name), [], (S.empty_sums(cfg.size) if split == "train" else None)
            for key, members in samples:
                writer.write(key, members)
            rejects.extend(chunk_rejects)
            if sums is not None:
                S.merge_into(sums, chunk_sums)
            progress(Advance(len(samples) + len(chunk_rejects)))
            remaining[sh.name] -= 1
            if remaining[sh.name] == 0:
                entry = writer.finish()
                _save_partial(out, sh, fingerprint, entry, rejects, sums)
                writer.publish()
                records[sh.name] = {"entry": entry, "rejected": rejects, "sums": sums}
                writer = None
    except KeyboardInterrupt:
        if writer is not None:
            writer.abort()
        kept = sum(r is not None for r in records.values())
        raise Interrupted(f"interrupted: {kept} of {len(shards)} shards are complete in {out}; "
                          "run the same command again to continue") from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, not when the generator is collected
    return _finish(out, source, cfg, shards, records, fingerprint, state, t0, n_todo)


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
        raise StrictRejectError(f"--strict: {len(rejected)} files rejected, listed in {out / REJECTED_FILE}; "
                                "the shards are kept, rerun without --strict to finish")
    if count == 0:
        raise DataError(f"{source.root}: none of the {splits['train']['found']} training files could be used "
                        f"(reasons in {out / REJECTED_FILE})")
    stats = S.finalize(image_sum, gram, count)
    S.save(out / S.STATS_FILE, stats, count)
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
        "notes": source.notes,
        "pil": pil_info(),
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 1) if seconds > 0 else None,
    }
    manifest = {
        "format": "alexcli-webdataset", "format_version": 1,
        "alexcli_version": __version__,
        "fingerprint": fingerprint,
        "source": str(source.root.resolve()),
        "parameters": cfg.output_parameters(),
        "classes": source.classes,
        "class_names": source.class_names,
        "splits": splits,
        "stats": {"file": S.STATS_FILE, "image_count": count, "scale": "0-1",
                  "rgb_mean": stats["rgb_mean"].tolist(), "rgb_std": stats["rgb_std"].tolist(),
                  "pca_eigval": stats["pca_eigval"].tolist()},
        "rejected_file": REJECTED_FILE,
        "sample": {"key": "NNNNNNNN_<source stem>", "jpg": "size x size RGB JPEG", "cls": "class index",
                   "json": "path, class, size [w, h] and mode of the source"},
        # What `prepare` printed, minus what differs between runs (so a resumed run's file is the same).
        "summary": {k: v for k, v in summary.items() if k not in ("status", "seconds", "images_per_s")},
    }
    write_json(out / MANIFEST, manifest)
    (out / PLAN_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
    return summary
