"""One rank of a training run, top to bottom: data, network, schedule, then the epochs.

Exact resume: every random stream (dropout, augmentation, data order) is re-seeded at the start
of each epoch from (seed, epoch, rank), and an epoch is committed only at its end: the checkpoint,
metrics.jsonl and curves.png, then the trainer state (momentum buffers, schedule), whose file marks
the epoch complete. A run killed anywhere and resumed repeats the interrupted epoch exactly and
ends with the same weights as an uninterrupted run. `alexcli.train.launch` starts the ranks.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from alexcli import checkpoint as ck
from alexcli import transforms
from alexcli.choices import Parallel
from alexcli.data import stream
from alexcli.data.dataset import has_split, load_stats, open_split, read_manifest
from alexcli.env import device_name, tune_cpu
from alexcli.errors import DataError, TrainingDiverged, UsageError
from alexcli.evaluate import Tally, predict_probs
from alexcli.events import Advance, Begin, Note, Progress, ignore
from alexcli.io import write_jsonl
from alexcli.model.registry import Arch, build_model, count_parameters
from alexcli.specs import AugmentContext
from alexcli.train.config import TrainConfig
from alexcli.train.optim import PaperSGD, Schedule, set_lr
from alexcli.train.step import TrainStep, autocast_for, derive_seed, seed_epoch, train_epoch

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class Rank:
    """This process's place in the run: its device and the collectives over all ranks."""

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


def run_rank(rank: int, world: int, local_rank: int, cfg: TrainConfig, arch: Arch, start: int,
             progress: Progress = ignore) -> dict:
    """Train epochs start+1..cfg.epochs as this rank; returns the run's summary (rank 0's view)."""
    r = Rank(rank, world, local_rank, cfg)
    emit = progress if r.main else ignore
    out = Path(cfg.out)

    # the data: splits, statistics, batches per rank and epoch
    manifest = read_manifest(cfg.data)
    train_split = open_split(cfg.data, "train")
    val_split = open_split(cfg.data, "val") if has_split(manifest, "val") else None
    if val_split is None and cfg.schedule == "plateau":
        raise UsageError(f"{cfg.data}: no val split, so the plateau schedule cannot see the error stop "
                         f"improving; use --schedule steps --lr-steps ...")
    if val_split is not None and val_split.classes != train_split.classes:
        raise UsageError(f"{cfg.data}: val and train splits list different classes")
    stats = load_stats(cfg.data)
    workers = stream.loader_workers(train_split, world, r.device.type, cfg.loader_workers)
    steps = stream.steps_per_epoch(train_split, cfg.batch, world)
    if cfg.steps_per_epoch:
        steps = min(steps, cfg.steps_per_epoch)

    # the network, the optimizer and the augmentations (restored on resume)
    net, runner, opt, variants, transfer = _build(cfg, arch, r, start)
    if transfer:
        emit(Note(f"--init {transfer['path']}: loaded {len(transfer['loaded'])} tensors; re-initialised "
                  f"{', '.join(transfer['reinitialised']) or 'none'}"
                  + (f"; not used: {', '.join(transfer['unused'])}" if transfer["unused"] else "")))
    ctx = AugmentContext.from_stats(stats, arch.crop, r.device)
    pipeline, aug_used = transforms.build(list(cfg.augment), ctx)
    step = TrainStep(runner, opt, augment=pipeline, crop=arch.crop, channels_last=cfg.channels_last,
                     autocast=autocast_for(cfg.amp, r.device))
    eval_mean = ctx.mean_image if "mean" in cfg.augment else None

    # the schedule and the best epoch so far (restored on resume)
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.patience, cfg.lr_steps)
    best = {"epoch": None, "val_top1_error": math.inf}
    if start:
        _, state = ck.load_trainer_state(out, start)
        schedule.load_state_dict(state["schedule"])
        best = state.get("best", best) or best
        best["val_top1_error"] = math.inf if best.get("val_top1_error") is None else best["val_top1_error"]
    set_lr(opt, schedule.lr)
    rows = _read_metrics(out, start) if r.main else []
    meta_base = ck.training_meta(
        arch=arch, variants=variants, augment=aug_used, split=train_split, manifest=manifest,
        parameters=count_parameters(net), config=cfg.to_dict(),
        init_from=({k: transfer[k] for k in ("path", "sha256", "reinitialised")} if transfer
                   else _saved_init_from(out, start)))
    emit(Note(f"training on {r.device} x{world}, {meta_base['parameters']:,} parameters, batch {cfg.batch}, "
              f"{steps} steps/epoch, {workers} loader worker(s) per rank"
              + (f"; resuming after epoch {start}" if start else "")))

    last = None
    for epoch in range(start + 1, cfg.epochs + 1):
        gen = seed_epoch(cfg.seed, epoch, rank)  # every random stream of this epoch: exact resume
        emit(Begin(f"epoch {epoch}/{cfg.epochs}", steps, unit="steps"))
        t0 = time.perf_counter()
        shown = {"steps": 0, "images": 0}

        def logged(n: int, mean_loss: float, seen: int, epoch=epoch) -> None:
            if not math.isfinite(mean_loss):
                good = out / ck.ckpt_name(epoch - 1) if epoch > 1 else "none (first epoch)"
                raise TrainingDiverged(f"loss became {mean_loss} at epoch {epoch} step {n} (lr {schedule.lr:g}); "
                                       f"stopped; last good checkpoint: {good}; try a lower --lr or --init caffe")
            emit(Advance(n - shown["steps"], images=(seen - shown["images"]) * world, loss=mean_loss))
            shown.update(steps=n, images=seen)

        batches = stream.batches(train_split, cfg.batch // world, train=True, workers=workers, rank=rank, world=world,
                                 seed=cfg.seed, epoch=epoch, pin=r.device.type == "cuda", limit=steps,
                                 decode=cfg.decode)
        loss_sum, wrong, seen = train_epoch(step, batches, gen, r.device, steps=steps, logged=logged)
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
                   "images_per_s": float(totals[2]) / train_seconds, "seconds": time.perf_counter() - t0}
        if val and val["top1_error"] < best["val_top1_error"]:
            best = {"epoch": epoch, "val_top1_error": val["top1_error"]}
        if r.main:
            rows.append(metrics)
            _commit_epoch(out, epoch, net, opt, stats, dict(meta_base, epoch=epoch, metrics=metrics), rows,
                          schedule, best, cfg, steps, world)
        r.barrier()
        emit(Note(_epoch_line(metrics) + (f"  -> lr {schedule.lr:g}" if dropped else "")))
        last = metrics
    return {"rank": rank, "out": str(out), "epochs": cfg.epochs, "started_at": start, "last": last,
            "best_epoch": best["epoch"], "best_val_top1_error": None if best["epoch"] is None else best["val_top1_error"],
            "checkpoint": str(out / ck.ckpt_name(cfg.epochs)), "parameters": meta_base["parameters"],
            "device": str(r.device), "world": world}


def _epoch_line(m: dict) -> str:
    val = (f"val top-1 {m['val_top1_error']:.1%} top-5 {m['val_top5_error']:.1%}"
           if m["val_top1_error"] is not None else "no val split")
    return (f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  train err {m['train_top1_error']:.1%}  "
            f"{val}  lr {m['lr']:g}  {m['images_per_s']:,.0f} img/s  {m['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------
# the network

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
    if cfg.parallel == Parallel.columns:
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


def _commit_epoch(out, epoch, net, opt, stats, meta, rows, schedule, best, cfg, steps, world) -> None:
    """The epoch's files in order: checkpoint, metrics.jsonl, curves.png, then the trainer state,
    whose presence marks the epoch complete (each written atomically)."""
    from alexcli.figures.plot import write_curves

    ck.save_checkpoint(out / ck.ckpt_name(epoch), one_device_state(net), ck.stats_tensors(stats), meta)
    write_jsonl(out / METRICS, rows)
    write_curves(out / CURVES, rows)
    best_json = dict(best, val_top1_error=None if best["epoch"] is None else best["val_top1_error"])
    state = {"config": cfg.to_dict(), "schedule": _json_safe(schedule.state_dict()), "best": best_json,
             "position": {"epoch": epoch, "step": epoch * steps, "steps_per_epoch": steps, "world": world,
                          "order": "data order, augmentation and dropout re-seeded from (seed, epoch, rank)"},
             "seeds": {"torch": derive_seed(cfg.seed, epoch + 1, 0, "torch"),
                       "augment": derive_seed(cfg.seed, epoch + 1, 0, "augment")}}
    ck.save_trainer_state(out, epoch, _velocity(opt, net), state)
    ck.prune(out, cfg.keep, best["epoch"], epoch)


def _read_metrics(out: Path, upto: int) -> list[dict]:
    """The rows of epochs 1..UPTO (a row of an epoch that was not committed is dropped)."""
    path = out / METRICS
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


def _saved_init_from(out: Path, start: int):
    """On resume, the fine-tuning record of the run's earlier checkpoints."""
    if not start:
        return None
    return ck.read_meta(out / ck.ckpt_name(start)).get("init_from")


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}
