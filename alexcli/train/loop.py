"""One rank of a training run, top to bottom: data, network, schedule, then the epochs.

Exact resume: every random stream (dropout, augmentation, data order) is re-seeded at the start
of each epoch from (seed, epoch, rank), and an epoch is committed only at its end: the checkpoint,
metrics.jsonl and curves.png, then the trainer state (momentum buffers, schedule, the metric rows),
whose file marks the epoch complete. Inside an epoch, snapshots (`alexcli.train.preempt`) save the
position every --save-every steps and when SIGTERM or SIGINT arrives. A run killed anywhere and
resumed continues from its last snapshot or epoch and ends with the same weights as an
uninterrupted run. `alexcli.train.launch` starts the ranks.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch

from alexcli import checkpoint as ck
from alexcli import transforms
from alexcli.choices import Parallel
from alexcli.data import stream
from alexcli.data.dataset import has_split, load_stats, open_split, read_manifest, verified
from alexcli.env import autocast_for, device_name, tune_cpu
from alexcli.errors import DataError, Stopped, TrainingDiverged, UsageError
from alexcli.evaluate import Tally, predict_probs
from alexcli.events import Advance, Begin, Label, Note, Progress, ignore
from alexcli.io import write_json, write_jsonl
from alexcli.model.registry import Arch, build_model, count_parameters
from alexcli.specs import AugmentContext
from alexcli.train import preempt
from alexcli.train import tensorboard as tb_events
from alexcli.train.chance import ChanceWatch
from alexcli.train.config import TrainConfig
from alexcli.train.optim import PaperSGD, Schedule, param_groups, set_lr
from alexcli.train.step import LOG_EVERY, TrainStep, derive_seed, seed_epoch, train_epoch


class Rank:
    """This process's place in the run: its device and the collectives over all ranks."""

    def __init__(self, rank: int, world: int, local_rank: int, cfg: TrainConfig):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        use_cuda = device_name(cfg.device) == "cuda"
        # The local rank picks the GPU (under torchrun on several machines the world is larger than
        # one machine's GPUs), or --rank-devices names each local rank's.
        index, option = local_rank, f"--gpus {world}"
        if cfg.rank_devices:
            option = f"--rank-devices {','.join(cfg.rank_devices)}"
            if local_rank >= len(cfg.rank_devices):  # torchrun started more ranks on this machine than it names
                raise UsageError(f"{option}: names {len(cfg.rank_devices)} device(s), but this is local rank {local_rank}")
            index = torch.device(cfg.rank_devices[local_rank]).index
            if not use_cuda:
                raise UsageError(f"{option}: places the ranks on GPUs, but this machine has none visible")
        if use_cuda and index >= torch.cuda.device_count():
            raise UsageError(f"{option}: rank {rank} needs CUDA device {index}, but only "
                             f"{torch.cuda.device_count()} are visible on this machine")
        self.device = torch.device("cuda", index) if use_cuda else torch.device("cpu")
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


class Data:
    """The training data as every rank and the launcher see it, checked once: manifest, splits,
    statistics. Every check a run needs of its data is here, so a bad data set is refused before the
    run folder is touched."""

    def __init__(self, cfg: TrainConfig, progress: Progress = ignore):
        # every check that reads no shard first: a refused run hashes nothing
        train = open_split(cfg.data, "train", verify=False)  # a missing or damaged data set says so
        self.manifest = read_manifest(cfg.data)
        want = cfg.val_split.value
        if want != "none" and not has_split(self.manifest, want) and want != "val":
            raise UsageError(f"--val-split {want}: {cfg.data} has no {want} split")
        validates = want != "none" and has_split(self.manifest, want)
        if not validates and cfg.schedule == "plateau":
            test = " --val-split test (this data set has a test split) or" if (
                want != "test" and has_split(self.manifest, "test")) else ""
            why = "--val-split none" if want == "none" else f"{cfg.data}: no val split"
            raise UsageError(f"{why}, so the plateau schedule cannot see the error stop improving; use{test} "
                             f"--schedule cosine, constant or steps to train without validation")
        val = open_split(cfg.data, want, verify=False) if validates else None
        if val is not None and val.classes != train.classes:
            raise UsageError(f"{cfg.data}: {want} and train splits list different classes")
        if cfg.batch > train.samples:
            raise UsageError(f"--batch {cfg.batch}: larger than the training split of {cfg.data} "
                             f"({train.samples:,} images); use a --batch of at most that")
        # then the shards' sha256 (hashed once, remembered), each split opened only once
        self.train = verified(train, progress) if cfg.verify else train
        self.val = verified(val, progress) if val is not None and cfg.verify else val
        self.stats = load_stats(cfg.data)

    @property
    def identity(self) -> dict:
        """What says which data set a run trained on (compared on --resume)."""
        return {"folder": self.train.folder.recorded(), "fingerprint": self.manifest.get("fingerprint")}


def run_rank(rank: int, world: int, local_rank: int, cfg: TrainConfig, arch: Arch, start: int,
             progress: Progress = ignore, mid: int = 0, stop: preempt.StopSignals | None = None) -> dict:
    """Train epochs start+1..cfg.epochs as this rank (from step MID of epoch start+1 when a snapshot
    was saved there); returns the run's summary (rank 0's view). STOP: the signals that ask the run
    to save and stop."""
    r = Rank(rank, world, local_rank, cfg)
    emit = progress if r.main else ignore
    out = Path(cfg.out)
    stop = stop or preempt.StopSignals()
    if r.main and cfg.tensorboard:  # a resumed run's --tensorboard is the run's: its package, before any work
        tb_events.require()

    # the data: splits, statistics, batches per rank and epoch
    data = Data(cfg)
    manifest, train_split, val_split, stats = data.manifest, data.train, data.val, data.stats
    workers = stream.loader_workers(train_split, world, r.device.type, cfg.loader_workers)
    steps = stream.steps_per_epoch(train_split, cfg.batch, world)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    # where the run stands: a snapshot inside epoch start+1, or the end of epoch START
    snap = preempt.load(out, start + 1, mid, rank) if mid else None
    if snap is not None and snap.state.get("position", {}).get("steps_per_epoch") != steps:
        raise UsageError(f"--resume: the snapshot in {out} was taken with "
                         f"{snap.state['position'].get('steps_per_epoch')} steps per epoch, this data and batch give {steps}")

    # the network, the optimizer and the augmentations (restored on resume)
    net, runner, opt, variants, transfer = _build(cfg, arch, r, start, snap)
    if transfer:
        emit(Note(f"--init {transfer['path']}: loaded {len(transfer['loaded'])} tensors; re-initialised "
                  f"{', '.join(transfer['reinitialised']) or 'none'}"
                  + (f"; not used: {', '.join(transfer['unused'])}" if transfer["unused"] else "")))
    ctx = AugmentContext.from_stats(stats, arch.crop, r.device)
    pipeline, aug_used = transforms.build(list(cfg.augment), ctx)
    step = TrainStep(runner, opt, augment=pipeline, crop=arch.crop, channels_last=cfg.channels_last,
                     autocast=autocast_for(cfg.amp, r.device))
    eval_mean = ctx.mean_image if "mean" in cfg.augment else None

    # the schedule, the best epoch so far and the metric rows (restored on resume)
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.patience, cfg.lr_steps, warmup=cfg.warmup, epochs=cfg.epochs)
    watch = ChanceWatch(arch.num_classes, cfg.chance_steps)
    best = {"epoch": None, "val_top1_error": math.inf}
    saved_rows = None
    if start or snap:
        state = snap.state if snap else ck.load_trainer_state(out, start)[1]
        schedule.load_state_dict(state["schedule"])
        watch.load_state_dict(state.get("chance"))
        best = state.get("best", best) or best
        best["val_top1_error"] = math.inf if best.get("val_top1_error") is None else best["val_top1_error"]
        saved_rows = state.get("metrics")
    set_lr(opt, schedule.lr)
    rows = _metric_rows(out, start, saved_rows) if r.main else []
    meta_base = ck.training_meta(
        arch=arch, variants=variants, augment=aug_used, split=train_split, manifest=manifest,
        parameters=count_parameters(net), config=cfg.to_dict(),
        init_from=({k: transfer[k] for k in ("path", "sha256", "reinitialised")} if transfer
                   else _saved_init_from(out, start, snap)))
    emit(Note(f"training on {r.device} x{world}, {meta_base['parameters']:,} parameters, batch {cfg.batch}, "
              f"{steps} steps/epoch, {workers} loader worker(s) per rank"
              + (f"; resuming at epoch {start + 1} step {mid}" if mid else
                 f"; resuming after epoch {start}" if start else "")))
    # rank 0's TensorBoard events (--tensorboard), against the global step
    tb = (tb_events.Board(cfg, arch, steps=steps, start=start, mid=mid, hint=resume_command(cfg),
                          notes=lambda text: emit(Note(text))) if r.main and cfg.tensorboard else None)

    def common_state(epoch: int) -> dict:
        """What the trainer state of an epoch and a snapshot inside it both hold."""
        best_json = dict(best, val_top1_error=None if best["epoch"] is None else best["val_top1_error"])
        return {"config": cfg.to_dict(), "schedule": _json_safe(schedule.state_dict()), "best": best_json,
                "chance": watch.state_dict(), "data": data.identity, "metrics": rows,
                "position": {"epoch": epoch, "steps_per_epoch": steps, "world": world,
                             "order": "data order, augmentation and dropout re-seeded from (seed, epoch, rank)"}}

    def bar_label(epoch: int) -> str:
        return f"epoch {epoch}/{cfg.epochs}" + (" (at chance)" if watch.at_chance else "")

    last = None
    for epoch in range(start + 1, cfg.epochs + 1):
        gen = seed_epoch(cfg.seed, epoch, rank)  # every random stream of this epoch: exact resume
        resumed = snap if epoch == start + 1 else None
        skip = mid if resumed else 0
        if resumed:
            preempt.set_random_state(resumed.random, gen, r.device)
        emit(Begin(bar_label(epoch), steps, unit="steps"))
        if skip:
            emit(Advance(skip))
        t0 = time.perf_counter()
        if tb:
            tb.begin_epoch()
        shown = {"steps": skip, "images": resumed.tally[3] if resumed else 0,
                 "loss_sum": resumed.tally[1] if resumed else 0.0}

        def logged(n: int, mean_loss: float, seen: int, epoch=epoch) -> None:
            if not math.isfinite(mean_loss):
                good = out / ck.ckpt_name(epoch - 1) if epoch > 1 else "none (first epoch)"
                if r.main:  # the run folder says so too (`alexcli runs`)
                    write_json(out / ck.DIVERGED, {"epoch": epoch, "step": n, "loss": str(mean_loss),
                                                   "lr": schedule.lr})
                raise TrainingDiverged(f"loss became {mean_loss} at epoch {epoch} step {n} (lr {schedule.lr:g}); "
                                       f"stopped; last good checkpoint: {good}; try a lower --lr or another --init")
            window = (mean_loss * seen - shown["loss_sum"]) / max(1, seen - shown["images"])
            event = watch.update((epoch - 1) * steps + n, window)
            if event == "stuck" or (event == "left" and watch.warned):  # told, or told it is over
                emit(Note(watch.message(arch.init) if event == "stuck" else
                          f"the training loss left chance at step {watch.left_step:,}"))
                emit(Label(bar_label(epoch)))
            emit(Advance(n - shown["steps"], images=(seen - shown["images"]) * world, loss=mean_loss))
            if tb:
                tb.step((epoch - 1) * steps + n, window, schedule.lr, (seen - shown["images"]) * world)
            shown.update(steps=n, images=seen, loss_sum=mean_loss * seen)

        def after_step(tally, epoch=epoch, gen=gen) -> None:
            signum = stop.signum
            if world > 1:  # every rank must agree to stop at the same step: ask at the loss checks
                signum = None
                if tally.done % LOG_EVERY == 0:
                    flag = r.all_sum(torch.tensor([float(stop.signum or 0)], dtype=torch.float64))
                    signum = signal_of(flag) if flag[0] else None
            due = cfg.save_every and tally.done % cfg.save_every == 0
            if not (due or signum):
                return
            path = _snapshot(out, epoch, tally, net, opt, stats, meta_base, common_state(epoch), gen, r)
            if signum:
                raise _stopped(signum, f"at epoch {epoch} step {tally.done}/{steps}", path, cfg)

        batches = stream.batches(train_split, cfg.batch // world, train=True, workers=workers, rank=rank, world=world,
                                 seed=cfg.seed, epoch=epoch, pin=r.device.type == "cuda", limit=steps - skip,
                                 decode=cfg.decode, share=cfg.decode_share, skip=skip)
        loss_sum, wrong, seen = train_epoch(step, batches, gen, r.device, steps=steps, logged=logged,
                                            start=tuple(resumed.tally) if resumed else None, after_step=after_step)
        train_seconds = time.perf_counter() - t0
        totals = r.all_sum(torch.tensor([loss_sum, wrong, float(seen)], dtype=torch.float64))
        val = (evaluate_split(runner, val_split, cfg, r, eval_mean, arch.crop, arch.num_classes, workers)
               if val_split else None)

        lr_used = schedule.lr
        dropped = schedule.end_epoch(epoch, val["top1_error"] if val else None)
        set_lr(opt, schedule.lr)
        metrics = {"epoch": epoch, "step": epoch * steps, "train_loss": float(totals[0] / totals[2]),
                   "train_top1_error": float(totals[1] / totals[2]),
                   "val_top1_error": val["top1_error"] if val else None,
                   "val_top5_error": val["top5_error"] if val else None,
                   "val_loss": val["loss"] if val else None, "lr": lr_used,
                   "images_per_s": float(totals[2]) / train_seconds, "seconds": time.perf_counter() - t0,
                   **watch.row()}
        if resumed:
            metrics["resumed_at_step"] = skip  # its speed and seconds cover only the steps after it
        if val and val["top1_error"] < best["val_top1_error"]:
            best = {"epoch": epoch, "val_top1_error": val["top1_error"]}
        if r.main:
            rows.append(metrics)
            _commit_epoch(out, epoch, net, opt, stats, dict(meta_base, epoch=epoch, metrics=metrics), rows,
                          common_state(epoch), cfg, steps)
            if tb:  # after the commit: a failure to write events loses no training
                tb.epoch(metrics, best, one_device_state(net))
        r.barrier()
        emit(Note(_epoch_line(metrics) + (f"  -> lr {schedule.lr:g}" if dropped else "")))
        last = metrics
        if stop.signum and epoch < cfg.epochs:
            raise _stopped(stop.signum, f"after epoch {epoch}", out / ck.ckpt_name(epoch), cfg)
    if tb:
        tb.finish()
    return {"rank": rank, "out": str(out), "epochs": cfg.epochs, "started_at": start, "last": last,
            "best_epoch": best["epoch"], "best_val_top1_error": None if best["epoch"] is None else best["val_top1_error"],
            "checkpoint": str(out / ck.ckpt_name(cfg.epochs)), "parameters": meta_base["parameters"],
            "device": str(r.device), "world": world}


def column_devices(cfg: TrainConfig, device: torch.device) -> list[torch.device]:
    """The two columns' devices for --parallel columns: --column-devices, else cuda:0 and cuda:1 on
    a GPU run and the CPU twice on a CPU run; a one-line error naming what this machine lacks."""
    if cfg.column_devices:
        devices = [torch.device(d) for d in cfg.column_devices]
        option = f"--column-devices {','.join(cfg.column_devices)}"
    else:
        devices = [torch.device("cuda", 0), torch.device("cuda", 1)] if device.type == "cuda" else [device] * 2
        option = "--parallel columns"
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    needed = max(((d.index or 0) + 1 for d in devices if d.type == "cuda"), default=0)
    if needed > present:
        raise UsageError(f"{option} needs {needed} CUDA device(s); this machine has {present}"
                         + (" (--column-devices cuda:0,cuda:0 runs both columns on one GPU)" if present == 1 else ""))
    return devices


def resume_command(cfg: TrainConfig) -> str:
    """The command that continues the run in cfg.out."""
    import shlex

    return f"alexcli train --data {shlex.quote(cfg.data)} --out {shlex.quote(str(cfg.out))} --resume"


def _stopped(signum: int, where: str, saved: Path, cfg: TrainConfig) -> Stopped:
    """The one line a stopped run ends with: what stopped it, what it saved, how to continue."""
    return Stopped(f"stopped by {signal.Signals(signum).name} {where}; saved {saved}; continue with: "
                   f"{resume_command(cfg)}", signum)


def signal_of(flag: torch.Tensor) -> int:
    """The signal that stops every rank, from the sum over ranks of the signal numbers they got."""
    n = int(flag[0])
    return n if n in (signal.SIGTERM, signal.SIGINT) else signal.SIGTERM


def _snapshot(out: Path, epoch: int, tally, net, opt, stats, meta_base: dict, state: dict, gen, r: Rank) -> Path:
    """Save the position inside EPOCH (a collective when there are several ranks: each sends its
    random state and running sums to rank 0, which writes)."""
    mine = {"random": preempt.random_state(gen, r.device),
            "tally": [tally.done, float(tally.loss_sum), float(tally.wrong), tally.seen]}
    ranks = [mine]
    if r.world > 1:
        import torch.distributed as dist

        ranks = [None] * r.world
        dist.all_gather_object(ranks, mine)
    path = None
    if r.main:
        state = dict(state, position=dict(state["position"], step=tally.done))
        path = preempt.save(out, epoch, tally.done, weights=one_device_state(net), data=ck.stats_tensors(stats),
                            meta=meta_base, velocity=_velocity(opt, net), ranks=ranks, state=state)
    r.barrier()
    return path or out / preempt.names(epoch, tally.done)[0]


def _epoch_line(m: dict) -> str:
    val = (f"val top-1 {m['val_top1_error']:.1%} top-5 {m['val_top5_error']:.1%}"
           if m["val_top1_error"] is not None else "no val split")
    return (f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  train err {m['train_top1_error']:.1%}  "
            f"{val}  lr {m['lr']:g}  {m['images_per_s']:,.0f} img/s  {m['seconds']:.1f} s"
            + ("  (at chance)" if m.get("at_chance") else ""))


# ---------------------------------------------------------------------------------------------
# the network

def _build(cfg: TrainConfig, arch: Arch, r: Rank, start: int, snap=None):
    """The network (weights restored on resume, from SNAP when resuming mid-epoch), the module that
    runs it, and the optimizer."""
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # the same initial weights on every rank
    net, variants = build_model(arch)
    velocity, transfer = None, None
    if cfg.init_from and not (start or snap):
        transfer = load_matching(net, cfg.init_from)
    if snap is not None:
        net.load_state_dict(snap.ckpt.model_state)
        velocity = snap.velocity
    elif start:
        ckpt = ck.load_checkpoint(Path(cfg.out) / ck.ckpt_name(start))
        net.load_state_dict(ckpt.model_state)
        velocity, _ = ck.load_trainer_state(Path(cfg.out), start)
    if cfg.parallel == Parallel.columns:
        from alexcli.model.columns import ColumnAlexNet

        net = ColumnAlexNet(net, column_devices(cfg, r.device))
    else:
        net = net.to(r.device)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = PaperSGD(param_groups(net, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
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


# ---------------------------------------------------------------------------------------------
# validation and the epoch's commit

def evaluate_split(runner, split, cfg: TrainConfig, r: Rank, mean_image, crop: int, num_classes: int,
                   workers: int, crops: str = "center") -> dict:
    """Top-1/top-5 error over this rank's val shards, summed over ranks."""
    runner.eval()
    tally = Tally(num_classes)
    for images, labels in stream.batches(split, max(1, cfg.batch // r.world), train=False, workers=workers,
                                         rank=r.rank, world=r.world):
        probs = predict_probs(runner, images, r.device, mean_image, crop, crops,
                              autocast=autocast_for(cfg.amp, r.device), channels_last=cfg.channels_last)
        tally.add(probs, labels)
    tally.set_from_tensor(r.all_sum(tally.as_tensor()))
    return tally.result()


def _commit_epoch(out, epoch, net, opt, stats, meta, rows, state, cfg, steps) -> None:
    """The epoch's files in order: checkpoint, metrics.jsonl, curves.png, then the trainer state
    (which holds the metric rows too), whose presence marks the epoch complete (each written
    atomically); then the epoch's snapshots go, best.safetensors is set and old checkpoints are
    pruned."""
    from alexcli.figures.plot import write_curves

    ck.save_checkpoint(out / ck.ckpt_name(epoch), one_device_state(net), ck.stats_tensors(stats), meta)
    write_jsonl(out / ck.METRICS, rows)
    write_curves(out / ck.CURVES, rows)
    state = dict(state, position=dict(state["position"], step=epoch * steps),
                 seeds={"torch": derive_seed(cfg.seed, epoch + 1, 0, "torch"),
                        "augment": derive_seed(cfg.seed, epoch + 1, 0, "augment")})
    ck.save_trainer_state(out, epoch, _velocity(opt, net), state)
    (out / ck.DIVERGED).unlink(missing_ok=True)  # a resumed run that got past where it diverged
    preempt.remove(out)
    ck.mark_best(out, state["best"]["epoch"])
    ck.prune(out, cfg.keep, state["best"]["epoch"], epoch)


def _metric_rows(out: Path, upto: int, saved: list | None) -> list[dict]:
    """The metric rows of epochs 1..UPTO: those the trainer state saved (metrics.jsonl is rewritten
    from them at the next commit, so a damaged or cut metrics.jsonl is rebuilt); a run from before
    the state held them reads metrics.jsonl, and a damaged one is an error naming it."""
    if saved is not None:
        return [m for m in saved if m.get("epoch", math.inf) <= upto]
    path = out / ck.METRICS
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}: line {i} is not JSON (damaged); restore it or start again with "
                                f"--overwrite") from None
    return [m for m in rows if m.get("epoch", math.inf) <= upto]


def _saved_init_from(out: Path, start: int, snap=None):
    """On resume, the fine-tuning record of the run's earlier checkpoints."""
    if snap is not None:
        return snap.ckpt.meta.get("init_from")
    if not start:
        return None
    return ck.read_meta(out / ck.ckpt_name(start)).get("init_from")


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}
