"""Every option that takes one of a fixed set of values, as an Enum: `--help` lists the values and
the command line refuses others before any work starts.

Each is a `str` Enum, so a member equals its value (`Amp.bf16 == "bf16"`), prints as it
(`f"{Amp.bf16}"` is `bf16`), and goes into JSON and checkpoints as a plain string; library callers
may pass either. `choice()` turns a value that came from elsewhere (a saved config, a script) into
the member, or a one-line UsageError naming the option. `comma_list()` splits an option that takes
a list of values (--lr-steps 30,60,80).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from alexcli.errors import UsageError


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Device(Choice):
    """Where the network runs: auto is CUDA when a GPU is visible, else the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Amp(Choice):
    """Mixed precision: none (fp32, TF32 convolutions where PyTorch allows) or bf16 autocast."""

    none = "none"
    bf16 = "bf16"


class Crops(Choice):
    """Test patches: the centre one, or the four corners, the centre and their reflections (4.1)."""

    center = "center"
    ten = "ten"


class ScheduleKind(Choice):
    """plateau: lr/10 when val error stops improving, at most 3 times (section 5); steps: lr/10 at
    given epochs; constant; cosine: half a cosine from lr down to 0 over the run."""

    plateau = "plateau"
    steps = "steps"
    constant = "constant"
    cosine = "cosine"


class Parallel(Choice):
    """data: DistributedDataParallel over --gpus; columns: the paper's split, one column per GPU."""

    data = "data"
    columns = "columns"


class Decode(Choice):
    """Where training JPEGs are decoded: cpu (pillow-simd in the loader processes), device (nvJPEG),
    or mixed: the first --decode-share of every batch on the device, the rest in the loader."""

    cpu = "cpu"
    device = "device"
    mixed = "mixed"


class Split(Choice):
    """A prepared data set's splits."""

    train = "train"
    val = "val"
    test = "test"


class ValSplit(Choice):
    """The split a training run validates on after each epoch (none: it does not validate)."""

    val = "val"
    test = "test"
    none = "none"


class Resample(Choice):
    """prepare's resize filter."""

    bicubic = "bicubic"
    bilinear = "bilinear"
    lanczos = "lanczos"
    box = "box"


class Experiment(Choice):
    """The paper's CIFAR-10 side experiments: Figure 1 and section 3.3's 13% vs 11%."""

    relu_vs_tanh = "relu-vs-tanh"
    lrn = "lrn"


E = TypeVar("E", bound=Choice)


def choice(kind: type[E], value, option: str) -> E:
    """VALUE as a member of KIND, or a UsageError: `--amp must be one of none, bf16, not 'fp16'`."""
    try:
        return kind(value)
    except ValueError:
        raise UsageError(f"{option} must be one of {', '.join(m.value for m in kind)}, not {value!r}") from None


class ExportFormat(Choice):
    """`alexcli export --format`."""

    onnx = "onnx"


class ImportKind(Choice):
    """`alexcli import KIND`: whose file it is."""

    torchvision = "torchvision"
    caffe = "caffe"


def comma_list(value: str, option: str, expected: str) -> list[str]:
    """The entries of an option's comma-separated VALUE, stripped: "" has none. An empty entry
    ("30,,60", a comma at the end) is a UsageError naming OPTION and saying what is EXPECTED, not
    dropped: one of the user's entries may be missing."""
    if not value.strip():
        return []
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise UsageError(f"{option} {value!r}: an empty entry between commas; expected {expected}")
    return items
