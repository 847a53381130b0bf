"""What each of the paper's CIFAR-10 side experiments compares, and its settings.

relu-vs-tanh (Figure 1): the four-layer net with ReLU and with tanh units, each at the learning
  rate a short sweep picks for it, no regularisation (no weight decay, no dropout, no
  augmentation but the mean), the same data order; training error per epoch, and the epochs
  (and seconds) each needs to reach 25% training error. The paper: ReLU about six times faster.
lrn (section 3.3): the net with and without response normalisation (cuda-convnet's 11% and 13%
  layer files), random 24x24 crops and reflections, weight decay on the locally connected and
  output layers as in those files; test error of each and the difference. The paper: 13% -> 11%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alexcli.choices import Device, Experiment, choice
from alexcli.env import device_name
from alexcli.errors import UsageError

TARGET_ERROR = 0.25     # Figure 1: epochs to reach 25% training error
PAPER_SPEEDUP = 6.0     # Figure 1: ReLU reaches it about six times sooner than tanh
PAPER_LRN = {"none": 0.13, "with": 0.11}  # section 3.3: CIFAR-10 test error without and with normalisation


@dataclass
class ExperimentConfig:
    data: str                               # prepared data set (alexcli prepare --size 32 --holdout 0.1)
    out: str                                # results.json, the figure, fits/, checkpoints
    epochs: int = 30
    seeds: int = 1                          # seeds 0..seeds-1; mean and spread over them
    subset: int = 0                         # training images used (0: all); the first ones of the shuffled shards
    batch: int = 128                        # cuda-convnet's minibatch for these nets
    lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03)   # the sweep; one value: no sweep
    fixed_lrs: dict = field(default_factory=dict)  # variant -> lr (--lrs relu=0.003,tanh=0.01): no sweep
    sweep_epochs: int = 1
    momentum: float = 0.9
    weight_decay: float = 0.004             # lrn only: cuda-convnet's wc on local3, local4, fc10
    crop: int = 0                           # 0: 32 for relu-vs-tanh (whole images), 24 for lrn (random crops)
    norm: str = "lrn"                       # lrn: the normalisation compared with none
    width: float = 1.0
    device: Device = Device.auto
    target: float = TARGET_ERROR
    verify: bool = True                     # check each shard's sha256 once before its first use

    def __post_init__(self) -> None:
        self.device = choice(Device, self.device, "--device")

    def validate(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, not {self.epochs}")
        if self.seeds < 1:
            raise UsageError(f"--seeds must be at least 1, not {self.seeds}")
        if self.subset < 0:
            raise UsageError(f"--subset must be 0 (all) or more, not {self.subset}")
        if self.batch < 1:
            raise UsageError(f"--batch must be at least 1, not {self.batch}")
        if not (self.lrs or self.fixed_lrs) or any(lr <= 0 for lr in [*self.lrs, *self.fixed_lrs.values()]):
            raise UsageError(f"--lrs must be positive learning rates, not {','.join(map(str, self.lrs))}")
        if self.sweep_epochs < 1:
            raise UsageError(f"--sweep-epochs must be at least 1, not {self.sweep_epochs}")
        if not 0 < self.target < 1:
            raise UsageError(f"--target must be between 0 and 1, not {self.target}")
        device_name(self.device)  # an unavailable device fails here, before any work

    def default_crop(self, name: str) -> int:
        return self.crop or (32 if name == Experiment.relu_vs_tanh else 24)


@dataclass
class Plan:
    """One variant of an experiment: the net and how it is trained."""

    label: str
    arch_fields: dict
    augment: tuple[str, ...]
    weight_decay: float
    lr_drops: tuple[int, ...] = ()          # epochs after which lr /= 10
    test: bool = False                      # score the held-out split after every epoch


def plans(name: str, cfg: ExperimentConfig, crop: int) -> list[Plan]:
    name = choice(Experiment, name, "experiment")
    if name == Experiment.relu_vs_tanh:
        # Figure 1: "no regularization of any kind"; the 13pct net (no normalisation)
        return [Plan(act, {"activation": act, "norm": "none", "crop": crop}, ("mean",), 0.0)
                for act in ("relu", "tanh")]
    drops = (max(1, round(cfg.epochs * 0.8)),) if cfg.epochs >= 5 else ()
    return [Plan(norm, {"activation": "relu", "norm": norm, "crop": crop}, ("mean", "crop", "flip"),
                 cfg.weight_decay, drops, test=True)
            for norm in (cfg.norm, "none")]
