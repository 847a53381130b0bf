"""The training loop: one process per rank, the paper's SGD, checkpoints every epoch.

`train(cfg, arch)` prepares the run folder, then runs rank 0 in this process and ranks 1..N-1
in spawned processes (`--gpus N`), or joins a `torchrun` launch when RANK/WORLD_SIZE are set.

Exact resume: every random stream (dropout, augmentation, data order) is re-seeded at the start
of each epoch from (seed, epoch, rank), and a checkpoint is written only at an epoch's end with
the weights, the momentum buffers and the schedule's state. A run killed anywhere and resumed
repeats the interrupted epoch exactly and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from alexcli import augment as aug
from alexcli.env import device_name, tune_cpu
from alexcli.errors import AlexcliError, UsageError
from alexcli.evaluate import Tally, predict_probs
from alexcli.model.alexnet import Arch, build_model, count_parameters
from alexcli.train import checkpoint as ck
from alexcli.train import loader
from alexcli.train.config import TrainConfig
from alexcli.train.optim import PaperSGD, Schedule, set_lr

LOG_EVERY = 10       # steps between loss checks / progress updates (each one syncs the device)
METRICS = "metrics.jsonl"
CURVES = "curves.png"

Progress = Callable[..., None]


class TrainingDiverged(AlexcliError):
    """The loss became NaN or infinite; the last good checkpoint is left in place."""

    exit_code = 1


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, the same in every process and on every platform."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


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


# ---------------------------------------------------------------------------------------------
# one rank

class Rank:
    def __init__(self, rank: int, world: int, local_rank: int, cfg: TrainConfig):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        use_cuda = device_name(cfg.device) == "cuda"
        if use_cuda and world > torch.cuda.device_count():
            raise UsageError(f"--gpus {world}: only {torch.cuda.device_count()} CUDA device(s) visible")
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        else:
            tune_cpu()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _build(cfg: TrainConfig, arch: Arch, r: Rank, start: int):
    """The network (weights restored on resume), the module that runs it, and the optimizer."""
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # the same initial weights on every rank
    net, variants = build_model(arch)
    velocity, transfer = None, None
    if cfg.init_from and not start:
        transfer = load_matching(net, cfg.init_from)
    if start:
        ckpt = ck.load_checkpoint(Path(cfg.out) / ck.ckpt_name(start))
        net.load_state_dict(ckpt.model_state)
        velocity, _ = ck.load_trainer_state(Path(cfg.out), start)
    if cfg.parallel == "columns":
        from alexcli.model.columns import ColumnAlexNet

        devices = ([torch.device("cuda", 0), torch.device("cuda", 1)] if r.device.type == "cuda"
                   else [torch.device("cpu")] * 2)
        if r.device.type == "cuda" and torch.cuda.device_count() < 2:
            raise UsageError("--parallel columns needs 2 CUDA devices")
        net = ColumnAlexNet(net, devices)
    else:
        net = net.to(r.device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = PaperSGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if velocity is not None:
        _load_velocity(opt, net, velocity)
    runner = net
    if cfg.compile:
        runner = torch.compile(runner)
    if r.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    return net, runner, opt, variants, transfer


def load_matching(net, path: str) -> dict:
    """Fine-tuning (the paper's starred models): copy every tensor of checkpoint PATH whose name and
    shape match; the rest (a classifier for another class count, a new conv6) keep their fresh
    initialisation. Returns what was loaded and what was not."""
    src = ck.load_checkpoint(path)
    ck.check_variants(src.meta, src.path)
    own = net.state_dict()
    loaded, fresh = [], []
    with torch.no_grad():
        for name, t in own.items():
            theirs = src.model_state.get(name)
            if theirs is not None and theirs.shape == t.shape:
                t.copy_(theirs)
                loaded.append(name)
            else:
                fresh.append(name)
    if not loaded:
        raise UsageError(f"--init {path}: no layer of that checkpoint fits this network "
                         f"(its arch: {src.meta.get('arch')})")
    unused = sorted(set(src.model_state) - set(own))
    return {"path": str(path), "sha256": src.meta.get("sha256"), "loaded": loaded, "reinitialised": fresh,
            "unused": unused}


def one_device_state(net) -> dict[str, torch.Tensor]:
    """The weights in the one-device layout (what checkpoints store), from either model."""
    return net.merged_state_dict() if hasattr(net, "merged_state_dict") else net.state_dict()


def _velocity(opt: PaperSGD, net) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in net.named_parameters()}
    vel = {names[id(p)]: s["velocity"] for p, s in opt.state.items() if "velocity" in s}
    return net.to_single(vel) if hasattr(net, "to_single") else vel


def _load_velocity(opt: PaperSGD, net, velocity: dict[str, torch.Tensor]) -> None:
    if hasattr(net, "from_single"):  # the column model keeps its own halves of every tensor
        velocity = net.from_single(velocity)
    for n, p in net.named_parameters():
        if n in velocity:
            opt.state[p]["velocity"] = velocity[n].to(p.device, p.dtype).clone()


def _autocast(cfg: TrainConfig, device):
    if cfg.amp == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def evaluate_split(runner, split, cfg: TrainConfig, r: Rank, mean_image, crop: int, num_classes: int,
                   workers: int, crops: str = "center") -> dict:
    """Top-1/top-5 error over this rank's val shards, summed over ranks."""
    runner.eval()
    tally = Tally(num_classes)
    batch = cfg.val_batch or max(1, cfg.batch // r.world)
    for images, labels in loader.batches(split, batch, train=False, workers=workers, rank=r.rank, world=r.world):
        probs = predict_probs(runner, images, r.device, mean_image, crop, crops,
                              autocast=_autocast(cfg, r.device), channels_last=cfg.channels_last)
        tally.add(probs, labels)
    tally.set_from_tensor(r.all_sum(tally.as_tensor()))
    return tally.result()


def _write_curves(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [m["train_loss"] for m in rows], marker="o", label="train")
    if rows and rows[0].get("val_loss") is not None:
        a.plot(epochs, [m["val_loss"] for m in rows], marker="o", label="val")
    a.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    a.legend()
    b.plot(epochs, [m["train_top1_error"] for m in rows], marker="o", label="train top-1")
    if rows and rows[0].get("val_top1_error") is not None:
        b.plot(epochs, [m["val_top1_error"] for m in rows], marker="o", label="val top-1")
        b.plot(epochs, [m["val_top5_error"] for m in rows], marker="o", label="val top-5")
    b.set(xlabel="epoch", ylabel="error", title="error", ylim=(0, 1))
    b.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = out / (CURVES + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, out / CURVES)


def _read_metrics(out: Path, upto: int) -> list[dict]:
    path = out / METRICS
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [m for m in rows if m["epoch"] <= upto]


def run_rank(rank: int, world: int, local_rank: int, cfg: TrainConfig, arch: Arch, start: int,
             progress: Progress | None = None) -> dict:
    """Train epochs start+1..cfg.epochs as this rank; returns the run's summary (rank 0's view)."""
    r = Rank(rank, world, local_rank, cfg)
    emit = progress if (progress is not None and r.main) else (lambda *a, **k: None)
    out = Path(cfg.out)
    train_split = loader.open_split(cfg.data, "train")
    val_split = loader.open_split(cfg.data, "val") if _has_split(cfg.data, "val") else None
    if val_split is None and cfg.schedule == "plateau":
        raise UsageError(f"{cfg.data}: no val split, so the plateau schedule cannot see the error stop "
                         f"improving; use --schedule steps --lr-steps ...")
    if val_split is not None and val_split.classes != train_split.classes:
        raise UsageError(f"{cfg.data}: val and train splits list different classes")
    stats = loader.load_data_stats(cfg.data)
    per_rank = cfg.batch // world
    workers = _loader_workers(cfg, train_split, world, r.device)
    steps = loader.steps_per_epoch(train_split, cfg.batch, world)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    net, runner, opt, variants, transfer = _build(cfg, arch, r, start)
    if transfer:
        emit("init_from", transfer)
    ctx = aug.AugmentContext.from_stats(stats, arch.crop, r.device)
    pipeline, aug_used = aug.build(list(cfg.augment), ctx)
    eval_mean = ctx.mean_image if "mean" in cfg.augment else None
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.patience, cfg.lr_steps)
    best = {"epoch": None, "val_top1_error": math.inf}
    if start:
        _, state = ck.load_trainer_state(out, start)
        schedule.load_state_dict(state["schedule"])
        best = state.get("best", best) or best
        best["val_top1_error"] = math.inf if best.get("val_top1_error") is None else best["val_top1_error"]
    set_lr(opt, schedule.lr)
    rows = _read_metrics(out, start) if r.main else []
    autocast = _autocast(cfg, r.device)
    meta_base = {
        "arch": arch.to_dict(), "variants": {**variants, **{f"augment:{k}": v for k, v in aug_used.items()}},
        "augment": list(cfg.augment), "classes": train_split.classes, "class_names": _class_names(cfg.data),
        "data": {"folder": str(Path(cfg.data).resolve()), "size": train_split.size,
                 "train_images": train_split.samples},
        "parameters": count_parameters(net), "config": cfg.to_dict(),
        "init_from": ({k: transfer[k] for k in ("path", "sha256", "reinitialised")} if transfer
                      else _saved_init_from(out, start)),
    }
    emit("start", {"epochs": cfg.epochs, "start": start, "steps": steps, "world": world, "device": str(r.device),
                   "parameters": meta_base["parameters"], "loader_workers": workers, "batch": cfg.batch})
    last = None
    for epoch in range(start + 1, cfg.epochs + 1):
        # every random stream of this epoch, from (seed, epoch, rank): exact resume at an epoch boundary
        torch.manual_seed(derive_seed(cfg.seed, epoch, rank, "torch"))
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, rank, "augment"))
        emit("epoch", epoch=epoch, steps=steps, lr=schedule.lr)
        t0 = time.perf_counter()

        def logged(n: int, mean_loss: float, seen: int, epoch=epoch) -> None:
            if not math.isfinite(mean_loss):
                good = out / ck.ckpt_name(epoch - 1) if epoch > 1 else "none (first epoch)"
                raise TrainingDiverged(f"loss became {mean_loss} at epoch {epoch} step {n} (lr {schedule.lr:g}); "
                                       f"stopped; last good checkpoint: {good}; try a lower --lr or --init caffe")
            emit("step", n=n, loss=mean_loss, images=seen * world)

        batches = loader.batches(train_split, per_rank, train=True, workers=workers, rank=rank, world=world,
                                 seed=cfg.seed, epoch=epoch, pin=r.device.type == "cuda", limit=steps,
                                 decode=cfg.decode)
        loss_sum, wrong, seen = train_epoch(runner, opt, batches, pipeline, gen, arch.crop, cfg, r.device,
                                            autocast, steps, logged)
        train_seconds = time.perf_counter() - t0
        totals = r.all_sum(torch.tensor([loss_sum, wrong, float(seen)], dtype=torch.float64))
        train_loss, train_err = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        val = (evaluate_split(runner, val_split, cfg, r, eval_mean, arch.crop, arch.num_classes, workers)
               if val_split else None)
        seconds = time.perf_counter() - t0
        lr_used = schedule.lr
        dropped = schedule.end_epoch(epoch, val["top1_error"] if val else None)
        set_lr(opt, schedule.lr)
        metrics = {"epoch": epoch, "step": epoch * steps, "train_loss": train_loss, "train_top1_error": train_err,
                   "val_top1_error": val["top1_error"] if val else None,
                   "val_top5_error": val["top5_error"] if val else None,
                   "val_loss": val["loss"] if val else None, "lr": lr_used,
                   "images_per_s": float(totals[2]) / train_seconds, "seconds": seconds}
        if val and val["top1_error"] < best["val_top1_error"]:
            best = {"epoch": epoch, "val_top1_error": val["top1_error"]}
        if r.main:
            _save_epoch(out, epoch, net, opt, stats, meta_base, metrics, schedule, best, cfg, steps, world)
            rows.append(metrics)
            with open(out / METRICS, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(m) + "\n" for m in rows)
            _write_curves(out, rows)
        r.barrier()
        emit("epoch_end", metrics=metrics, lr_dropped=dropped, new_lr=schedule.lr)
        last = metrics
    return {"rank": rank, "out": str(out), "epochs": cfg.epochs, "started_at": start, "last": last,
            "best_epoch": best["epoch"], "best_val_top1_error": None if best["epoch"] is None else best["val_top1_error"],
            "checkpoint": str(out / ck.ckpt_name(cfg.epochs)), "parameters": meta_base["parameters"],
            "device": str(r.device), "world": world}


def train_epoch(runner, opt, batches, pipeline, gen, crop: int, cfg: TrainConfig, device, autocast, steps: int,
                logged) -> tuple[float, float, int]:
    """One epoch of SGD steps; returns this rank's (loss sum, top-1 misses, images). LOGGED(step,
    mean loss, images) is called every LOG_EVERY steps: each call syncs the device once."""
    runner.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    seen = done = 0
    for images, labels in batches:
        x = pipeline(aug.to_float(loader.images_on(images, device)), gen)
        labels = labels.to(device, non_blocking=True)
        if x.shape[-1] != crop:  # no 'crop' in --augment: the centre patch
            x = aug.center_crop(x, crop)
        # the loader's batches have channels-last strides; give the model the layout it was asked for
        x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        with autocast() if autocast else contextlib.nullcontext():
            logits = runner(x)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().double() * len(labels)
        wrong += (logits.detach().argmax(1) != labels).sum()
        seen += len(labels)
        done += 1
        if done % LOG_EVERY == 0 or done == steps:
            logged(done, float(loss_sum) / seen, seen)
    return float(loss_sum), float(wrong), seen


def _save_epoch(out, epoch, net, opt, stats, meta_base, metrics, schedule, best, cfg, steps, world) -> None:
    meta = dict(meta_base, epoch=epoch, metrics=metrics, init=meta_base["arch"]["init"])
    ck.save_checkpoint(out / ck.ckpt_name(epoch), one_device_state(net), ck.stats_tensors(stats), meta)
    best_json = dict(best, val_top1_error=None if best["epoch"] is None else best["val_top1_error"])
    state = {"config": cfg.to_dict(), "schedule": _json_safe(schedule.state_dict()), "best": best_json,
             "position": {"epoch": epoch, "step": epoch * steps, "steps_per_epoch": steps, "world": world,
                          "order": "data order, augmentation and dropout re-seeded from (seed, epoch, rank)"},
             "seeds": {"torch": derive_seed(cfg.seed, epoch + 1, 0, "torch"),
                       "augment": derive_seed(cfg.seed, epoch + 1, 0, "augment")}}
    ck.save_trainer_state(out, epoch, _velocity(opt, net), state)
    ck.prune(out, cfg.keep, best["epoch"], epoch)


def _saved_init_from(out: Path, start: int):
    """On resume, the fine-tuning record of the run's earlier checkpoints."""
    if not start:
        return None
    return ck.read_meta(out / ck.ckpt_name(start)).get("init_from")


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _has_split(folder: str, split: str) -> bool:
    from alexcli.data.shards import read_manifest

    return bool(read_manifest(folder).get("splits", {}).get(split, {}).get("shards"))


def _class_names(folder: str) -> list[str]:
    from alexcli.data.shards import read_manifest

    m = read_manifest(folder)
    return list(m.get("class_names") or m["classes"])


def _loader_workers(cfg: TrainConfig, split, world: int, device: torch.device) -> int:
    """--loader-workers, or: on a GPU all cores but one per rank (up to 8), on the CPU a quarter of
    them (the model's arithmetic needs the rest: on 2 cores, decoding in the main process was
    twice as fast as 2 workers); never more than there are shards per rank."""
    if cfg.loader_workers >= 0:
        loader.check_slots(split, world, cfg.loader_workers)
        return cfg.loader_workers
    cores = max(1, (os.cpu_count() or 1) // world)
    wanted = min(8, cores - 1) if device.type == "cuda" else cores // 4
    return loader.auto_workers(split, world, wanted)


# ---------------------------------------------------------------------------------------------
# launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_dist(rank: int, world: int, cfg: TrainConfig) -> None:
    import datetime

    import torch.distributed as dist

    backend = "nccl" if (cfg.device != "cpu" and torch.cuda.is_available()) else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))


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


def train(cfg: TrainConfig, arch: Arch, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None) -> dict:
    """Train (or with RESUME continue) the run in cfg.out; returns a summary dict."""
    cfg.validate()
    if not resume:
        arch.validate()
        if cfg.parallel == "columns" and arch.name != "alexnet":
            raise UsageError(f"--parallel columns splits AlexNet's two columns; {arch.name} has none")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        return _join_torchrun(cfg, arch, resume, overwrite, progress)
    cfg, arch, start = _setup(cfg, arch, resume, overwrite)
    if cfg.gpus == 1:
        return run_rank(0, 1, 0, cfg, arch, start, progress)
    return _spawn(cfg, arch, start, progress)


def _setup(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool) -> tuple[TrainConfig, Arch, int]:
    """The run folder checked or made, fc8 sized to the data set's classes."""
    cfg, arch, start = prepare_run(cfg, arch, resume=resume, overwrite=overwrite)
    classes = len(loader.open_split(cfg.data, "train").classes)
    if not resume:
        arch = replace(arch, num_classes=classes)
    elif arch.num_classes != classes:
        raise UsageError(f"{cfg.data}: {classes} classes, but the run in {cfg.out} was trained on {arch.num_classes}")
    return cfg, arch, start


def _join_torchrun(cfg: TrainConfig, arch: Arch, resume: bool, overwrite: bool, progress) -> dict:
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


def _spawn(cfg: TrainConfig, arch: Arch, start: int, progress: Progress | None) -> dict:
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


def describe(arch: Arch) -> str:
    scale = f", input x{arch.input_scale:g}" if arch.input_scale != 1 else ""
    if arch.name != "alexnet":
        return (f"{arch.name}, {arch.num_classes} classes, crop {arch.crop}, width {arch.width:g}, "
                f"{arch.activation}/{arch.norm}/{arch.pool}, init {arch.init}{scale}")
    c = arch.channels()
    return (f"AlexNet {'-'.join(map(str, c))} conv, fc {arch.fc_units}, {arch.num_classes} classes, "
            f"crop {arch.crop}, groups {arch.groups}, {arch.activation}/{arch.norm}/{arch.pool}, init {arch.init}"
            f"{scale}")


__all__ = ["train", "run_rank", "TrainingDiverged", "derive_seed", "describe", "evaluate_split"]
