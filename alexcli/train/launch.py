"""Starting a training run: the run folder, then one process per rank.

`train(cfg, arch)` checks or sets up the run folder, then runs rank 0 in this process and ranks
1..N-1 in spawned processes (`--gpus N`), or joins a `torchrun` launch when RANK/WORLD_SIZE are
set. Each rank runs `alexcli.train.loop.run_rank`; an error in any rank comes back as one line.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path

import torch

from alexcli import checkpoint as ck
from alexcli.choices import Parallel
from alexcli.data.dataset import open_split
from alexcli.errors import AlexcliError, UsageError
from alexcli.events import Progress, ignore
from alexcli.model.registry import Arch
from alexcli.train.config import TrainConfig
from alexcli.train.loop import CURVES, METRICS, run_rank


def train(cfg: TrainConfig, arch: Arch, *, resume: bool = False, overwrite: bool = False,
          progress: Progress = ignore) -> dict:
    """Train (or with RESUME continue) the run in cfg.out; returns a summary dict."""
    cfg.validate()
    if not resume:
        arch.validate()
        if cfg.parallel == Parallel.columns and arch.name != "alexnet":
            raise UsageError(f"--parallel columns splits AlexNet's two columns; {arch.name} has none")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        return _join_torchrun(cfg, arch, resume, overwrite, progress)
    cfg, arch, start = _setup(cfg, arch, resume, overwrite)
    if cfg.gpus == 1:
        return run_rank(0, 1, 0, cfg, arch, start, progress)
    return _spawn(cfg, arch, start, progress)


# ---------------------------------------------------------------------------------------------
# the run folder (main process, before any rank starts)

def _run_files(out: Path) -> list[Path]:
    return sorted([*out.glob("ckpt-e*.safetensors"), *out.glob("state-e*"), *out.glob("*.tmp"),
                   out / METRICS, out / CURVES])


def prepare_run(cfg: TrainConfig, arch: Arch, *, resume: bool, overwrite: bool) -> tuple[TrainConfig, Arch, int]:
    """Check or set up the run folder; returns the settings to run with and the epoch done so far."""
    out = Path(cfg.out)
    done = ck.latest_complete_epoch(out) if out.is_dir() else None
    if resume:
        if done is None:
            raise UsageError(f"--resume: {out} holds no complete epoch to continue from")
        ckpt = ck.load_checkpoint(out / ck.ckpt_name(done))  # a corrupt or foreign file fails here, in one line
        _, state = ck.load_trainer_state(out, done)
        saved = TrainConfig.from_dict(state.get("config", {}))
        cfg = replace(saved, epochs=cfg.epochs, data=cfg.data or saved.data, out=str(out))
        arch = Arch.from_dict(ckpt.meta["arch"])
        if done >= cfg.epochs:
            raise UsageError(f"--resume: {out} has already trained {done} epochs; give a larger --epochs")
        return cfg, arch, done
    if done is not None or any(p.exists() for p in _run_files(out)):
        if not overwrite:
            raise UsageError(f"{out} already holds a training run (epoch {done or 0}); use --resume to continue "
                             f"it or --overwrite to start again")
        for p in _run_files(out):
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, arch, 0


def _setup(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool) -> tuple[TrainConfig, Arch, int]:
    """The run folder checked or made, the classifier sized to the data set's classes."""
    cfg, arch, start = prepare_run(cfg, arch, resume=resume, overwrite=overwrite)
    classes = len(open_split(cfg.data, "train").classes)
    if not resume:
        arch = replace(arch, num_classes=classes)
    elif arch.num_classes != classes:
        raise UsageError(f"{cfg.data}: {classes} classes, but the run in {cfg.out} was trained on {arch.num_classes}")
    return cfg, arch, start


# ---------------------------------------------------------------------------------------------
# the ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_dist(rank: int, world: int, cfg: TrainConfig) -> None:
    import datetime

    import torch.distributed as dist

    backend = "nccl" if (cfg.device != "cpu" and torch.cuda.is_available()) else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))


def _join_torchrun(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool, progress: Progress) -> dict:
    """Rank 0 sets up the run folder, then every rank gets its settings by broadcast."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    box = [None]
    if rank == 0:
        try:
            c, a, start = _setup(cfg, arch, resume, overwrite)
            box = [(c.to_dict(), a.to_dict(), start, None)]
        except AlexcliError as exc:
            box = [(None, None, 0, str(exc))]
    _init_dist(rank, world, cfg)
    try:
        dist.broadcast_object_list(box, src=0)
        cfg_d, arch_d, start, failure = box[0]
        if failure is not None:
            raise UsageError(failure if rank == 0 else f"rank 0 could not start: {failure}")
        cfg = replace(TrainConfig.from_dict(cfg_d), gpus=world)
        return run_rank(rank, world, local, cfg, Arch.from_dict(arch_d), start, progress)
    finally:
        dist.destroy_process_group()


def _child(rank: int, world: int, port: int, cfg_d: dict, arch_d: dict, start: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = TrainConfig.from_dict(cfg_d)
    try:
        _init_dist(rank, world, cfg)
        run_rank(rank, world, rank, cfg, Arch.from_dict(arch_d), start)
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


def _spawn(cfg: TrainConfig, arch: Arch, start: int, progress: Progress) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    children = [ctx.Process(target=_child, args=(rank, cfg.gpus, port, cfg.to_dict(), arch.to_dict(), start, errors),
                            daemon=False) for rank in range(1, cfg.gpus)]
    for c in children:
        c.start()
    failure = None
    try:
        _init_dist(0, cfg.gpus, cfg)
        summary = run_rank(0, cfg.gpus, 0, cfg, arch, start, progress)
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
