"""Starting a training run: the run folder, then one process per rank.

`train(cfg, arch)` checks or sets up the run folder, then runs rank 0 in this process and ranks
1..N-1 in spawned processes (`--gpus N`), or joins a `torchrun` launch when RANK/WORLD_SIZE are
set. Each rank runs `alexcli.train.loop.run_rank`; an error in any rank comes back as one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import replace
from pathlib import Path

import torch

from alexcli import checkpoint as ck
from alexcli.choices import Parallel
from alexcli.data.dataset import open_split
from alexcli.env import torchrun_world
from alexcli.errors import AlexcliError, DataError, Interrupted, UsageError
from alexcli.events import Progress, ignore
from alexcli.model.registry import Arch, build_model
from alexcli.specs import LAYER_KINDS
from alexcli.io import TMP_SUFFIX, locked_folder
from alexcli.train import preempt
from alexcli.train.config import RESUME_MAY_CHANGE, TrainConfig
from alexcli.train.loop import Data, resume_command, run_rank


def train(cfg: TrainConfig, arch: Arch, *, resume: bool = False, overwrite: bool = False,
          given: dict | None = None, progress: Progress = ignore) -> dict:
    """Train (or with RESUME continue) the run in cfg.out; returns a summary dict. GIVEN: the
    options the user set explicitly ({config or Arch field: value}, from the command line); on
    resume each must agree with the run's unless `RESUME_MAY_CHANGE` lists it (None: only
    cfg.epochs and cfg.data are taken, as a library caller means)."""
    torchrun = torchrun_world()
    cfg.validate(torchrun)
    if not resume:
        arch.validate()
        if cfg.parallel == Parallel.columns and arch.name != "alexnet":
            raise UsageError(f"--parallel columns splits AlexNet's two columns; {arch.name} has none")
        check_crop(arch, cfg.data)
        with torch.device("meta"):  # a network that cannot be built (a crop too small) is refused first
            build_model(arch)
    if torchrun:
        return _join_torchrun(cfg, arch, resume, overwrite, given, progress, torchrun)
    try:
        with run_folder(cfg, resume, progress) as folder:
            cfg, arch, start, mid = _setup(cfg, arch, resume, overwrite, given, folder)
            with preempt.StopSignals() as stop:
                if cfg.gpus == 1:
                    return run_rank(0, 1, 0, cfg, arch, start, progress, mid=mid, stop=stop)
                return _spawn(cfg, arch, start, mid, progress, stop)
    except KeyboardInterrupt:  # Ctrl-C before the run started, or a second one while it saved
        raise interrupted(cfg) from None


def check_crop(arch: Arch, data: str) -> None:
    """The crop fits the data set's images (checked before a network of that input size is built:
    --crop 10000 built a 1.6-billion-parameter model before failing)."""
    size = open_split(data, "train", verify=False).size
    if arch.crop > size:
        raise UsageError(f"--crop {arch.crop} is larger than the {size}x{size} images of {data}")


def interrupted(cfg: TrainConfig) -> Interrupted:
    """The line for a run stopped at once by Ctrl-C: what its folder holds, and how to go on."""
    out = Path(cfg.out)
    done, mid = _position(out) if out.is_dir() else (None, 0)
    if done is None and not mid:
        return Interrupted(f"interrupted before the run's first checkpoint: nothing was saved in {out}; "
                           "run the same command again to start")
    saved = out / (preempt.names((done or 0) + 1, mid)[0] if mid else ck.ckpt_name(done))
    return Interrupted(f"interrupted; the last saved position is {saved}; continue with: {resume_command(cfg)}")


# ---------------------------------------------------------------------------------------------
# the run folder (main process, before any rank starts)

# Every name a run writes in its folder (a `.tmp` of each while it is written): --overwrite and a
# fresh start remove these and nothing else.
RUN_FILE_RE = re.compile(r"^(ckpt-e\d{3,}(-s\d{6,})?\.safetensors|state-e\d{3,}(-s\d{6,})?\.(safetensors|json)|"
                         + "|".join(map(re.escape, (ck.METRICS, ck.CURVES, ck.DIVERGED, ck.BEST))) + ")(" + re.escape(TMP_SUFFIX) + ")?$")


def _run_files(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if RUN_FILE_RE.match(p.name)) if out.is_dir() else []


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, resume: bool, progress: Progress = ignore):
    """The run folder, locked for this run: made if it is new (and removed again if the run is
    refused before it wrote anything). A new run's data is checked before the folder is touched."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if resume and not out.is_dir():
        raise UsageError(f"--resume: no run folder {out}; run the same command without --resume to start it")
    if not resume:
        Data(cfg, progress)  # a bad data set or --batch is refused here, before the run folder exists (and
        # each shard's sha256 is checked once and remembered, so the ranks find them verified)
    with locked_folder(out, "train"):
        yield out


def _position(out: Path) -> tuple[int | None, int]:
    """(last complete epoch or None, step of the newest snapshot inside the next epoch or 0)."""
    done = ck.latest_complete_epoch(out)
    return done, preempt.latest(out, (done or 0) + 1) or 0


def prepare_run(cfg: TrainConfig, arch: Arch, *, resume: bool, overwrite: bool, given: dict | None = None
                ) -> tuple[TrainConfig, Arch, int, int]:
    """Check the (locked) run folder; returns the settings to run with, the epoch done so far and
    the step of a snapshot inside the next epoch (0: none)."""
    out = Path(cfg.out)
    done, mid = _position(out)
    if resume:
        if done is None and not mid:
            raise UsageError(f"--resume: {out} holds no saved position yet (stopped before its first checkpoint); "
                             f"run the same command without --resume to start it")
        saved_at = (out / preempt.names(done + 1 if done else 1, mid)[0]) if mid else out / ck.ckpt_name(done)
        ckpt = ck.load_checkpoint(saved_at)  # a corrupt or foreign file fails here, in one line
        where = (done + 1 if mid else done) if done else 1
        if ckpt.meta.get("epoch") != where or (mid and ckpt.meta.get("step") != mid):
            raise DataError(f"{saved_at}: its metadata says epoch {ckpt.meta.get('epoch')}"
                            + (f" step {ckpt.meta.get('step')}" if mid else "") + f", its name epoch {where}"
                            + (f" step {mid}" if mid else "") + " (renamed or edited); --resume cannot trust it")
        state = preempt.read_state(out, (done or 0) + 1, mid) if mid else ck.load_trainer_state(out, done)[1]
        saved = TrainConfig.from_dict(state.get("config", {}))
        saved_arch = Arch.from_dict(ckpt.meta["arch"])
        cfg = _resumed_config(cfg, saved, saved_arch, given, state, out)
        if (done or 0) >= cfg.epochs:
            raise UsageError(f"--resume: {out} has already trained {done} epochs; give a larger --epochs")
        return cfg, saved_arch, done or 0, mid
    if done is not None or mid:
        if not overwrite:
            at = f"epoch {done or 0}" + (f", step {mid} of epoch {(done or 0) + 1}" if mid else "")
            raise UsageError(f"{out} already holds a training run ({at}); use --resume to continue it or "
                             f"--overwrite to start again")
    files = _run_files(out)  # --overwrite, or what a run killed before its first save left
    foreign = _not_ours(out, files)
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        raise UsageError(f"{out}: {', '.join(foreign)} {'was' if len(foreign) == 1 else 'were'} not written by a run "
                         f"into this folder, and alexcli removes only its own files: move {them} away, or choose "
                         f"another --out")
    for p in files:
        p.unlink(missing_ok=True)
    return cfg, arch, 0, 0


def _not_ours(out: Path, files: list[Path]) -> list[str]:
    """The names among FILES (the run's file names in OUT) that no run into OUT wrote: a checkpoint
    that is neither a committed epoch (its trainer state beside it) nor one whose metadata names
    this folder (a copy from elsewhere; best.safetensors too), and metrics.jsonl or curves.png with none of the run's own
    files beside them. Temporary files and snapshots are always a run's."""
    names = {p.name for p in files}
    ours, loose = set(), []
    for p in files:
        m = ck.CKPT_RE.match(p.name)
        if p.name.endswith(TMP_SUFFIX) or p.name.startswith("state-e") or preempt.SNAPSHOT_CKPT_RE.match(p.name):
            ours.add(p.name)
        elif m or p.name == ck.BEST:
            if (m and ck.state_names(int(m.group(1)))[1] in names) or _written_here(p, out):
                ours.add(p.name)
        else:
            loose.append(p.name)  # metrics.jsonl, curves.png, diverged.json
    return sorted(n for n in names - ours if not (n in loose and ours))


def _written_here(ckpt: Path, out: Path) -> bool:
    try:
        recorded = ck.read_meta(ckpt, check=False).get("config", {}).get("out")
    except (AlexcliError, OSError):
        return False
    return isinstance(recorded, str) and Path(recorded).resolve() == out.resolve()


def _shown(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(getattr(v, "value", v))


def _resumed_config(cfg: TrainConfig, saved: TrainConfig, saved_arch: Arch, given: dict | None, state: dict,
                    out: Path) -> TrainConfig:
    """The saved run's settings with what may change on resume taken from this command; an option
    given with another value than the run's is refused, naming each."""
    ident = state.get("data") or {}
    new = Data(replace(saved, data=cfg.data or saved.data, verify=cfg.verify))
    if ident.get("fingerprint") and new.manifest.get("fingerprint") != ident["fingerprint"]:
        raise UsageError(f"--resume: --data {cfg.data} is not the data set the run in {out} trained on "
                         f"({ident.get('folder')}); give that one")
    if given is None:  # a library call: the new total of epochs, nothing else
        return replace(saved, epochs=cfg.epochs, data=cfg.data or saved.data, out=str(out))
    conflicts, changes = [], {}
    saved_cfg, saved_a = saved.to_dict(), saved_arch.to_dict()
    for field, value in given.items():
        if field in ("data", "out"):
            continue
        theirs = saved_cfg[field] if field in saved_cfg else saved_a.get(field)
        if field in RESUME_MAY_CHANGE:
            changes[field] = value
        elif _shown(value) != _shown(theirs):
            if field in LAYER_KINDS:  # given as --layer KIND=NAME
                conflicts.append(f"--layer {field}={_shown(value)} (the run: {field}={_shown(theirs)})")
                continue
            option = "--" + {"name": "arch", "init_from": "init", "compile": "compile"}.get(field, field).replace("_", "-")
            conflicts.append(f"{option} {_shown(value) or chr(39) * 2} (the run: {_shown(theirs) or chr(39) * 2})")
    if conflicts:
        may = ", ".join("--" + f.replace("_", "-").replace("verify", "no-verify") for f in RESUME_MAY_CHANGE)
        raise UsageError(f"--resume: {'; '.join(conflicts)}: these cannot change when a run continues (only "
                         f"{may} can); leave them out to continue with the run's, or start a new --out")
    return replace(saved, data=cfg.data or saved.data, out=str(out), **changes)


def _setup(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool, given: dict | None, folder: Path
           ) -> tuple[TrainConfig, Arch, int, int]:
    """The run folder checked, the classifier sized to the data set's classes."""
    cfg, arch, start, mid = prepare_run(cfg, arch, resume=resume, overwrite=overwrite, given=given)
    classes = len(open_split(cfg.data, "train", verify=False).classes)
    if not resume:
        arch = replace(arch, num_classes=classes)
    elif arch.num_classes != classes:
        raise UsageError(f"{cfg.data}: {classes} classes, but the run in {cfg.out} was trained on {arch.num_classes}")
    return cfg, arch, start, mid


# ---------------------------------------------------------------------------------------------
# the ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_backend(cfg: TrainConfig) -> str:
    """nccl between GPUs, gloo on the CPU and between ranks that share a GPU (--rank-devices
    cuda:0,cuda:0): NCCL refuses two ranks on one device, gloo moves their CUDA tensors through the host."""
    shared = len(set(cfg.rank_devices)) < len(cfg.rank_devices)
    return "nccl" if (cfg.device != "cpu" and torch.cuda.is_available() and not shared) else "gloo"


def _init_dist(rank: int, world: int, cfg: TrainConfig) -> None:
    import datetime

    import torch.distributed as dist

    backend = dist_backend(cfg)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))


def _join_torchrun(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool, given: dict | None,
                   progress: Progress, torchrun: tuple[int, int]) -> dict:
    """Rank 0 sets up (and locks) the run folder, then every rank gets its settings by broadcast."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), torchrun[0]
    local = int(os.environ.get("LOCAL_RANK", rank))
    box = [None]
    with contextlib.ExitStack() as stack:
        if rank == 0:
            try:
                folder = stack.enter_context(run_folder(cfg, resume))
                c, a, start, mid = _setup(cfg, arch, resume, overwrite, given, folder)
                replace(c, gpus=1).validate(torchrun)  # a resumed run's batch against this launch's ranks
                box = [(c.to_dict(), a.to_dict(), start, mid, None)]
            except AlexcliError as exc:
                box = [(None, None, 0, 0, str(exc))]
        _init_dist(rank, world, cfg)
        try:
            dist.broadcast_object_list(box, src=0)
            cfg_d, arch_d, start, mid, failure = box[0]
            if failure is not None:
                raise UsageError(failure if rank == 0 else f"rank 0 could not start: {failure}")
            cfg = replace(TrainConfig.from_dict(cfg_d), gpus=world)
            with preempt.StopSignals() as stop:
                return run_rank(rank, world, local, cfg, Arch.from_dict(arch_d), start, progress, mid=mid, stop=stop)
        finally:
            dist.destroy_process_group()


def _child(rank: int, world: int, port: int, cfg_d: dict, arch_d: dict, start: int, mid: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig.from_dict(cfg_d)
    try:
        _init_dist(rank, world, cfg)
        with preempt.StopSignals() as stop:
            run_rank(rank, world, rank, cfg, Arch.from_dict(arch_d), start, mid=mid, stop=stop)
    except AlexcliError as exc:
        errors.put((exc.exit_code, f"rank {rank}: {exc}"))
        raise SystemExit(exc.exit_code)
    except Exception as exc:  # reported by the main process as one line
        errors.put((1, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise SystemExit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(cfg: TrainConfig, arch: Arch, start: int, mid: int, progress: Progress, stop) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    children = [ctx.Process(target=_child, args=(rank, cfg.gpus, port, cfg.to_dict(), arch.to_dict(), start, mid, errors),
                            daemon=False) for rank in range(1, cfg.gpus)]
    for c in children:
        c.start()
    failure = None
    try:
        _init_dist(0, cfg.gpus, cfg)
        summary = run_rank(0, cfg.gpus, 0, cfg, arch, start, progress, mid=mid, stop=stop)
    except BaseException as exc:
        failure = exc
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    for c in children:
        c.join(timeout=None if failure is None else 10)
        if c.is_alive():
            c.terminate()
    child_errors = []
    while not errors.empty():
        child_errors.append(errors.get())
    if isinstance(failure, AlexcliError) or (failure is not None and not child_errors):
        raise failure
    if child_errors:  # the first error of another rank explains rank 0's broken collective
        code, message = child_errors[0]
        err = AlexcliError(message)
        err.exit_code = code
        raise err
    bad = [c.exitcode for c in children if c.exitcode]
    if bad:
        raise AlexcliError(f"a training process exited with code {bad[0]}")
    return summary
