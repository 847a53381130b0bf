"""The training run's settings, in one place: `alexcli train` reads its defaults from here.
Every default is the paper's number (section 5) unless noted. Saved in every checkpoint and in
the trainer state, so `--resume` continues with exactly these. Imports no torch, so `--help` is fast."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from alexcli.choices import Amp, Decode, Device, Parallel, ScheduleKind, ValSplit, choice
from alexcli.errors import UsageError
from alexcli.train.chance import CHANCE_STEPS

# Section 5's numbers (alexcli.train.optim implements the rule they go into).
BASE_LR = 0.01        # "initialized the learning rate at 0.01"
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
LR_DROP = 10.0        # "divide the learning rate by 10 when the validation error rate stopped improving"
MAX_DROPS = 3         # "reduced three times prior to termination"
DEFAULT_AUGMENT = ("mean", "crop", "flip", "pca")  # sections 2 and 4.1: mean image, random crop, reflection, PCA colour
# Steps between mid-epoch snapshots: a quarter of an ImageNet epoch at batch 128 (10,009 steps), so a
# job stopped by its scheduler loses at most that; an epoch shorter than this only saves at its end.
SAVE_EVERY = 2500
# What --resume may change: everything else is the run's and is refused if it differs.
RESUME_MAY_CHANGE = ("epochs", "keep", "loader_workers", "save_every", "verify", "device", "chance_steps",
                     "tensorboard", "column_devices", "rank_devices")
_DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")  # what --column-devices accepts for each column
_CUDA_NAME = re.compile(r"cuda:\d+")           # what --rank-devices accepts for each rank


def _device_list(devices: tuple[str, ...], count: int, name: re.Pattern) -> bool:
    """Whether DEVICES (--column-devices or --rank-devices) is COUNT names that NAME matches whole."""
    return len(devices) == count and all(name.fullmatch(d) for d in devices)


def default_steps(epochs: int) -> tuple[int, ...]:
    """--schedule steps without --lr-steps: lr/10 after a third and after two thirds of EPOCHS (as
    torchvision's reference recipe divides after 30 and 60 of 90)."""
    return tuple(sorted({e for e in (epochs // 3, 2 * epochs // 3) if 1 <= e < epochs}))


# the choice fields and the option each comes from (values from a saved config are plain strings)
_CHOICES = {"schedule": (ScheduleKind, "--schedule"), "device": (Device, "--device"), "parallel": (Parallel, "--parallel"),
            "amp": (Amp, "--amp"), "decode": (Decode, "--decode"), "val_split": (ValSplit, "--val-split")}


@dataclass
class TrainConfig:
    data: str                                # prepared data set folder (alexcli prepare)
    out: str                                 # run folder: checkpoints, metrics.jsonl, curves.png
    epochs: int = 90                         # section 5: "roughly 90 cycles"
    batch: int = 128                         # images per SGD step, over all ranks (section 5)
    lr: float = BASE_LR                      # section 5: 0.01
    momentum: float = MOMENTUM               # section 5: 0.9
    weight_decay: float = WEIGHT_DECAY       # section 5: 0.0005
    schedule: ScheduleKind = ScheduleKind.plateau  # plateau (the paper's) | steps | constant | cosine
    patience: int = 3                        # epochs without val improvement before lr /= 10 (not given in the paper)
    lr_steps: tuple[int, ...] = ()           # epochs after which lr /= 10 with schedule=steps (): a third and two thirds of epochs
    warmup: int = 0                          # epochs of linear warm-up before the schedule (not in the paper)
    val_split: ValSplit = ValSplit.val       # the split validated on after each epoch; none: no validation
    augment: tuple[str, ...] = DEFAULT_AUGMENT  # registry names, applied in order on the device
    seed: int = 0                            # data order, init, augmentation and dropout all follow it
    device: Device = Device.auto             # auto (cuda when present) | cpu | cuda
    gpus: int = 1                            # data-parallel processes (DDP; gloo on CPU)
    rank_devices: tuple[str, ...] = ()       # each local rank's GPU; (): cuda:0..N-1. Ranks sharing one talk over gloo
    parallel: Parallel = Parallel.data       # data | columns (the paper's 2-GPU split)
    column_devices: tuple[str, ...] = ()     # the two columns' devices with --parallel columns; (): cuda:0,cuda:1 (cpu,cpu on the CPU)
    amp: Amp = Amp.none                      # none | bf16 autocast
    channels_last: bool = False
    compile: bool = False                    # torch.compile the model
    loader_workers: int = -1                 # decode processes per rank; -1: alexcli.data.stream.loader_workers' rule
    keep: int = 3                            # epoch checkpoints kept besides the best
    steps_per_epoch: int = 0                 # 0: one pass over the training set; >0 caps it (benchmarks, demo)
    init_from: str = ""                      # a checkpoint to fine-tune from (train --init CKPT)
    decode: Decode = Decode.cpu              # cpu: PIL in the loader processes; device: nvJPEG on the GPU; mixed: both
    decode_share: float = 0.5                # --decode mixed: the share of each batch decoded on the device (its first images)
    save_every: int = SAVE_EVERY             # steps between mid-epoch snapshots (0: at epoch ends only)
    verify: bool = True                      # check each shard's sha256 once before its first use
    chance_steps: int = CHANCE_STEPS         # steps after which a run whose loss is still ln(classes) is told so (0: never)
    tensorboard: str = ""                    # TensorBoard event folder; "": none, "auto": RUN/tensorboard (alexcli.train.tensorboard)

    def __post_init__(self) -> None:
        for name, (kind, option) in _CHOICES.items():
            setattr(self, name, choice(kind, getattr(self, name), option))

    def validate(self, torchrun: tuple[int, int] | None = None) -> None:
        """Every option check, before the run folder is touched. TORCHRUN: (WORLD_SIZE, LOCAL_WORLD_SIZE)
        of a torchrun launch (alexcli.env.torchrun_world), whose ranks are torchrun's, not --gpus'."""
        for name, low in (("epochs", 1), ("batch", 1), ("gpus", 1), ("patience", 1), ("keep", 0),
                          ("steps_per_epoch", 0), ("loader_workers", -1), ("save_every", 0),
                          ("chance_steps", 0), ("warmup", 0)):
            if getattr(self, name) < low:
                option = "--" + name.replace("_", "-")
                raise UsageError(f"{option} must be at least {low}, not {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number, not {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay must be 0 or a positive number, not {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise UsageError(f"momentum must be in [0, 1), not {self.momentum}")
        if any(b <= a for a, b in zip(self.lr_steps, self.lr_steps[1:])) or any(e < 1 for e in self.lr_steps):
            raise UsageError(f"--lr-steps must be increasing epochs of 1 or more, not {','.join(map(str, self.lr_steps))}")
        if self.schedule == ScheduleKind.steps and not (self.lr_steps or default_steps(self.epochs)):
            raise UsageError(f"--schedule steps over {self.epochs} epoch(s) has no epoch to divide lr after; give "
                             "--lr-steps or use --schedule constant")
        if self.warmup and self.warmup >= self.epochs:
            raise UsageError(f"--warmup {self.warmup} leaves no epoch of the {self.epochs} after it; use fewer")
        world, local, ranks = self.gpus, self.gpus, f"--gpus {self.gpus}"
        if torchrun:  # the launch's ranks; --gpus would be ignored, so it is refused unless it says the same
            world, local = torchrun
            ranks = f"the {world} ranks torchrun started (WORLD_SIZE)"
            if self.gpus not in (1, world):
                raise UsageError(f"--gpus {self.gpus}: under torchrun the ranks are torchrun's (WORLD_SIZE {world}); "
                                 "leave --gpus out")
        if self.batch % world:
            raise UsageError(f"--batch {self.batch} does not split evenly over {ranks}")
        if self.parallel == Parallel.columns and world != 1:
            raise UsageError("--parallel columns uses 2 GPUs in one process: "
                             + ("run it without torchrun" if torchrun else "leave --gpus at 1"))
        if self.column_devices:
            given = ",".join(self.column_devices)
            if self.parallel != Parallel.columns:
                raise UsageError(f"--column-devices {given}: it places the columns of --parallel columns; add that")
            if not _device_list(self.column_devices, 2, _DEVICE_NAME):
                raise UsageError(f"--column-devices {given}: expected two devices like cuda:0,cuda:1 (or cuda:0,cuda:0 "
                                 "to run both columns on one GPU)")
        if not (math.isfinite(self.decode_share) and 0 < self.decode_share < 1):
            raise UsageError(f"--decode-share must be between 0 and 1 (the part of each batch decoded on the device), "
                             f"not {self.decode_share}")
        if self.rank_devices:
            given = ",".join(self.rank_devices)
            if not _device_list(self.rank_devices, local, _CUDA_NAME):
                per = f"rank on this machine (torchrun's LOCAL_WORLD_SIZE {local})" if torchrun else f"rank ({ranks})"
                raise UsageError(f"--rank-devices {given}: expected one CUDA device per {per} "
                                 f"like {','.join(f'cuda:{i}' for i in range(local))} (or "
                                 f"{','.join(['cuda:0'] * local)} to share one GPU)")
            if self.device == Device.cpu:
                raise UsageError(f"--rank-devices {given}: places the ranks on GPUs, but --device is cpu")
        if self.tensorboard:  # the package (optional) and the folder
            from alexcli.train.tensorboard import check

            check(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["augment"], d["lr_steps"] = list(self.augment), list(self.lr_steps)
        d["column_devices"], d["rank_devices"] = list(self.column_devices), list(self.rank_devices)
        return {k: (v.value if k in _CHOICES else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["augment"], d["lr_steps"] = tuple(d.get("augment", DEFAULT_AUGMENT)), tuple(d.get("lr_steps", ()))
        d["column_devices"], d["rank_devices"] = tuple(d.get("column_devices", ())), tuple(d.get("rank_devices", ()))
        return cls(**d)

