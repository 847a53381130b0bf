"""The runs in a folder (`alexcli runs`): each training run and experiment under it, read as it is.

A training run is a folder holding metrics.jsonl, checkpoints (ckpt-eNNN.safetensors, snapshots
ckpt-eEEE-sSSSSSS.safetensors) or trainer state (state-eNNN.json); an experiment folder holds
results.json or fits/. Each becomes one dict (`RUN_FIELDS`): how many epochs are done of how many
configured, the best validation error, the last training loss, the network, and a status:

  finished     every configured epoch is complete (its trainer state written)
  running      an alexcli process holds the folder's lock (`alexcli.io.FolderLock`)
  interrupted  fewer epochs than configured; `stopped_at` names a mid-epoch snapshot if there is one
  empty        nothing was saved yet (an empty metrics.jsonl, no checkpoint)
  unreadable   a file could not be read; `reason` says which and why (the other fields hold what could)
  diverged     its loss became NaN or infinite (train writes diverged.json; the next complete epoch of a
               resumed run removes it)
  unknown      nothing in the folder says how many epochs the run was to train

Nothing here imports torch (`alexcli.checkpoint` and `alexcli.train.preempt`, whose names and
readers this uses, import it only to handle tensors), so listing a folder of runs takes a fraction
of a second. Nothing is printed, and nothing in a folder is written: the lock is only tested
(`alexcli.io.lock_holder`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from alexcli import checkpoint as ck
from alexcli.errors import DataError, UsageError
from alexcli.experiment import FITS, RESULTS
from alexcli.io import LOCK_NAME, lock_holder
from alexcli.train import preempt

# every row has these keys (null where unknown)
RUN_FIELDS = ("path", "kind", "status", "reason", "epochs_done", "epochs", "stopped_at", "best_epoch",
              "best_val_top1_error", "best_val_top5_error", "last_train_loss", "init", "init_from", "arch",
              "variants", "lock")


# ---------------------------------------------------------------------------------------------
# finding

def _is_run(folder: Path, names: set[str]) -> bool:
    if ck.METRICS in names or any(ck.CKPT_RE.match(n) or preempt.SNAPSHOT_CKPT_RE.match(n)
                                  or n.startswith("state-e") for n in names):
        return True
    # a run started but not saved yet holds only its lock
    return LOCK_NAME in names and (lock_holder(folder) or {}).get("command") == "train"


def _is_experiment(folder: Path, names: set[str], dirs: list[str]) -> bool:
    return RESULTS in names or (FITS in dirs and any((folder / FITS).glob("*.json")))


def find_runs(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """(folder, kind) of every run under ROOT, ROOT itself included, sorted by path; kind is
    "train", "experiment", or "unreadable" for a folder that could not be listed. Hidden folders
    and an experiment's fits/ are not searched."""
    root = Path(root)
    found: list[tuple[Path, str]] = []

    def failed(exc: OSError) -> None:
        if exc.filename is not None:
            found.append((Path(exc.filename), "unreadable"))

    for dirpath, dirs, files in os.walk(root, onerror=failed):
        folder, names = Path(dirpath), set(files)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if _is_experiment(folder, names, dirs):
            found.append((folder, "experiment"))
            dirs[:] = []
        elif _is_run(folder, names):
            found.append((folder, "train"))
    return sorted(found, key=lambda f: f[0].relative_to(root).parts if f[0] != root else ())


def list_runs(root: str | os.PathLike) -> list[dict]:
    """One dict per run under ROOT (`RUN_FIELDS`, path relative to ROOT), sorted by path. A run that
    cannot be read is its own row, status "unreadable" with the reason: it never stops the listing.
    ROOT missing or not a folder is a UsageError; a folder without runs gives []."""
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{root}: no such folder")
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder; give the folder that holds the runs")
    rows = []
    for folder, kind in find_runs(root):
        rel = folder.relative_to(root).as_posix() if folder != root else "."
        if kind == "unreadable":
            row = _row(rel, "train")
            row.update(status="unreadable", reason="cannot list the folder (permission?)")
        elif kind == "experiment":
            row = read_experiment(folder, rel)
        else:
            row = read_run(folder, rel)
        rows.append(row)
    return rows


def _row(path: str, kind: str) -> dict:
    row = dict.fromkeys(RUN_FIELDS)
    row.update(path=path, kind=kind)
    return row


# ---------------------------------------------------------------------------------------------
# reading one training run

class _Unreadable(Exception):
    """One file of a run that cannot be read; the message names it (relative to the run)."""


def _number(v) -> float | None:
    """V as a JSON-safe number (NaN and infinities, strings, booleans: None)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def _integer(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _Unreadable(f"{path.name}: {exc.strerror or exc}") from None
    except ValueError:
        raise _Unreadable(f"{path.name}: not JSON (damaged)") from None
    if not isinstance(obj, dict):
        raise _Unreadable(f"{path.name}: not a JSON object (damaged)")
    return obj


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that is not a JSON object is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _Unreadable(f"{path.name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _Unreadable(f"{path.name}: not text (damaged)") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise _Unreadable(f"{path.name}: line {i} is not JSON (damaged)") from None
        if not isinstance(row, dict) or _integer(row.get("epoch")) is None:
            raise _Unreadable(f"{path.name}: line {i} is not a metrics row (no epoch)")
        rows.append(row)
    return rows


def read_checkpoint_meta(path: Path) -> dict:
    """A checkpoint's metadata (`alexcli.checkpoint.read_meta`: the header only and its sha256; not
    the plugin check, which would load every architecture's module and torch with it), a failure
    named by the file's name alone."""
    try:
        meta = ck.read_meta(path, check=False)
    except DataError as exc:
        raise _Unreadable(str(exc).replace(str(path), path.name, 1)) from None
    except OSError as exc:
        raise _Unreadable(f"{path.name}: {exc.strerror or exc}") from None
    if not isinstance(meta.get("arch"), dict):
        raise _Unreadable(f"{path.name}: metadata has no architecture")
    return meta


def describe_arch(arch: dict) -> str:
    """`alexnet relu/lrn/overlap w0.25 c64`: the name, the layer variants and the sizes that differ
    between runs (one column, conv6 when set)."""
    layers = "/".join(str(arch.get(k, "?")) for k in ("activation", "norm", "pool"))
    text = f"{arch.get('name', '?')} {layers}"
    if _number(arch.get("width")) is not None:
        text += f" w{arch['width']:g}"
    if _integer(arch.get("crop")) is not None:
        text += f" c{arch['crop']}"
    if arch.get("name", "alexnet") == "alexnet" and arch.get("groups") == 1:
        text += " 1-column"
    if arch.get("conv6"):
        text += " conv6"
    return text


def read_run(folder: Path, rel: str) -> dict:
    """The row of the training run in FOLDER (REL: its path as listed)."""
    row = _row(rel, "train")
    problems: list[str] = []

    def attempt(fn, *args):
        try:
            return fn(*args)
        except _Unreadable as exc:
            problems.append(str(exc))
            return None

    try:
        names = {p.name for p in folder.iterdir() if p.is_file()}
    except OSError as exc:
        row.update(status="unreadable", reason=f"cannot list the folder ({exc.strerror or exc})")
        return row
    # where the run stands, read as --resume reads it
    done = ck.latest_complete_epoch(folder)
    step = preempt.latest(folder, (done or 0) + 1)
    snap = ((done or 0) + 1, step) if step else None
    ckpts = sorted(int(m.group(1)) for n in names if (m := ck.CKPT_RE.match(n)))

    # settings and position: the newest trainer state (a snapshot's marker is newer than its epoch's)
    state = None
    if snap is not None:
        state = attempt(read_json, folder / preempt.names(*snap)[2])
    elif done is not None:
        state = attempt(read_json, folder / ck.state_names(done)[1])
    config = (state or {}).get("config") if isinstance((state or {}).get("config"), dict) else None

    # the network: the checkpoint of the last epoch, else the snapshot's, else the newest there is
    if done is not None:
        ckpt = ck.ckpt_name(done)
    elif snap is not None:
        ckpt = preempt.names(*snap)[0]
    else:
        cands = sorted((n for n in names if preempt.SNAPSHOT_CKPT_RE.match(n)), reverse=True)
        ckpt = ck.ckpt_name(ckpts[-1]) if ckpts else (cands[0] if cands else None)
    meta = attempt(read_checkpoint_meta, folder / ckpt) if ckpt else None
    if meta is not None:
        arch = meta["arch"]
        row.update(arch=arch.get("name"), variants=describe_arch(arch), init=meta.get("init", arch.get("init")))
        init_from = meta.get("init_from")
        if isinstance(init_from, dict):
            row["init_from"] = init_from.get("path")
        if config is None and isinstance(meta.get("config"), dict):
            config = meta["config"]

    # the metric rows: metrics.jsonl, else those the trainer state keeps; only of complete epochs
    rows = None
    if ck.METRICS in names:
        rows = attempt(read_metrics, folder / ck.METRICS)
    elif isinstance((state or {}).get("metrics"), list):
        rows = [m for m in state["metrics"] if isinstance(m, dict) and _integer(m.get("epoch")) is not None]
    if rows and done is not None:
        rows = [m for m in rows if m["epoch"] <= done]
    if rows:
        if done is None:
            done = max(m["epoch"] for m in rows)
        row["last_train_loss"] = _number(rows[-1].get("train_loss"))
        scored = [m for m in rows if _number(m.get("val_top1_error")) is not None]
        if scored:
            best = min(scored, key=lambda m: m["val_top1_error"])  # the first of equals, as training keeps
            row.update(best_epoch=best["epoch"], best_val_top1_error=best["val_top1_error"],
                       best_val_top5_error=_number(best.get("val_top5_error")))

    row["epochs_done"] = done or 0
    row["epochs"] = _integer((config or {}).get("epochs"))
    if snap is not None:
        row["stopped_at"] = {"epoch": snap[0], "step": snap[1]}
    holder = lock_holder(folder) if LOCK_NAME in names else None
    row["lock"] = holder
    diverged = attempt(read_json, folder / ck.DIVERGED) if ck.DIVERGED in names else None
    if holder is not None:
        row["status"] = "running"
        if problems:
            row["reason"] = "; ".join(problems)
    elif diverged is not None:
        row.update(status="diverged", reason=f"loss {diverged.get('loss')} at epoch {diverged.get('epoch')} step "
                                             f"{diverged.get('step')} (lr {diverged.get('lr')})")
    elif problems:
        row.update(status="unreadable", reason="; ".join(problems))
    elif not done and snap is None and not ckpts:
        row.update(status="empty", reason="nothing saved yet")
    elif row["epochs"] is None:
        row.update(status="unknown", reason="no checkpoint or trainer state says how many epochs it was to train")
    elif done and done >= row["epochs"]:
        row["status"] = "finished"
    else:
        row["status"] = "interrupted"
    return row


# ---------------------------------------------------------------------------------------------
# an experiment folder

def read_experiment(folder: Path, rel: str) -> dict:
    """The row of the experiment in FOLDER: finished when results.json is there, else interrupted
    with the number of training runs kept in fits/."""
    row = _row(rel, "experiment")
    if not (folder / RESULTS).is_file():
        n = len(list((folder / FITS).glob("*.json")))
        row.update(status="interrupted", arch="experiment",
                   reason=f"no {RESULTS} yet; {n} finished training run{'s' if n != 1 else ''} kept in {FITS}/")
        return row
    try:
        results = read_json(folder / RESULTS)
    except _Unreadable as exc:
        row.update(status="unreadable", reason=str(exc))
        return row
    row["arch"] = f"experiment {results.get('experiment', '?')}"
    variants = results.get("variants") if isinstance(results.get("variants"), dict) else {}
    row["variants"] = ", ".join(variants) or None
    inits = {v.get("arch", {}).get("init") for v in variants.values() if isinstance(v, dict) and isinstance(v.get("arch"), dict)}
    row["init"] = ", ".join(sorted(i for i in inits if isinstance(i, str))) or None
    epochs = _integer((results.get("config") or {}).get("epochs")) if isinstance(results.get("config"), dict) else None
    row.update(epochs=epochs, epochs_done=epochs, status="finished")
    runs = results.get("runs") if isinstance(results.get("runs"), dict) else {}
    diverged = [f"{label} seed {r.get('seed')}" for label, rs in runs.items() if isinstance(rs, list)
                for r in rs if isinstance(r, dict) and r.get("diverged")]
    if diverged:  # an experiment's fits do record divergence
        row["reason"] = "diverged: " + ", ".join(diverged)
    return row
