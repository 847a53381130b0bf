"""The training run's settings. Every default is the paper's number (section 5) unless noted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from alexcli.augment import DEFAULT_AUGMENT
from alexcli.errors import UsageError
from alexcli.train.optim import BASE_LR, MOMENTUM, WEIGHT_DECAY

PARALLEL = ("data", "columns")
AMP = ("none", "bf16")


@dataclass
class TrainConfig:
    data: str                                # prepared data set folder (alexcli prepare)
    out: str                                 # run folder: checkpoints, metrics.jsonl, curves.png
    epochs: int = 90                         # section 5: "roughly 90 cycles"
    batch: int = 128                         # images per SGD step, over all ranks (section 5)
    lr: float = BASE_LR                      # section 5: 0.01
    momentum: float = MOMENTUM               # section 5: 0.9
    weight_decay: float = WEIGHT_DECAY       # section 5: 0.0005
    schedule: str = "plateau"                # plateau (the paper's) | steps
    patience: int = 3                        # epochs without val improvement before lr /= 10 (not given in the paper)
    lr_steps: tuple[int, ...] = ()           # epochs after which lr /= 10 with schedule=steps
    augment: tuple[str, ...] = DEFAULT_AUGMENT  # registry names, applied in order on the device
    seed: int = 0                            # data order, init, augmentation and dropout all follow it
    device: str = "auto"                     # auto (cuda when present) | cpu | cuda
    gpus: int = 1                            # data-parallel processes (DDP; gloo on CPU)
    parallel: str = "data"                   # data | columns (the paper's 2-GPU split)
    amp: str = "none"                        # none | bf16 autocast
    channels_last: bool = False
    compile: bool = False                    # torch.compile the model
    loader_workers: int = -1                 # decode processes per rank; -1: min(4, cores/ranks, shards/ranks)
    keep: int = 3                            # epoch checkpoints kept besides the best
    steps_per_epoch: int = 0                 # 0: one pass over the training set; >0 caps it (benchmarks, demo)
    val_batch: int = 0                       # 0: same as the per-rank training batch
    init_from: str = ""                      # a checkpoint to fine-tune from (train --init CKPT)
    decode: str = "cpu"                      # cpu: PIL in the loader processes; device: nvJPEG on the GPU

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, not {self.epochs}")
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1, not {self.batch}")
        if self.gpus < 1:
            raise UsageError(f"--gpus must be at least 1, not {self.gpus}")
        if self.batch % self.gpus:
            raise UsageError(f"--batch {self.batch} does not split evenly over --gpus {self.gpus}")
        if self.parallel not in PARALLEL:
            raise UsageError(f"--parallel must be one of {', '.join(PARALLEL)}, not {self.parallel!r}")
        if self.parallel == "columns" and self.gpus != 1:
            raise UsageError("--parallel columns uses 2 GPUs in one process: leave --gpus at 1")
        if self.amp not in AMP:
            raise UsageError(f"--amp must be one of {', '.join(AMP)}, not {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.decode not in ("cpu", "device"):
            raise UsageError(f"--decode must be cpu or device, not {self.decode!r}")
        if self.keep < 0:
            raise UsageError(f"--keep must be 0 or more, not {self.keep}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["augment"], d["lr_steps"] = list(self.augment), list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["augment"], d["lr_steps"] = tuple(d.get("augment", DEFAULT_AUGMENT)), tuple(d.get("lr_steps", ()))
        return cls(**d)
