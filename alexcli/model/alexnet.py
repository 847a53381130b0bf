"""The 2012 network (section 3.5), with its layer variants chosen by registry name.

Layer names follow the paper (conv1..conv5, fc6..fc8) so checkpoints read like the table in
DESIGN.md. `groups=2` is the paper's two columns: conv2, conv4 and conv5 see only their own
column's maps, and response normalisation runs within a column (each GPU normalised its own 48
or 128 maps in cuda-convnet), so the one-device model computes exactly what the two-device
split in `alexcli.model.columns` computes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from alexcli import plugins
from alexcli.errors import PluginError, UsageError

# Section 3.5: kernels per layer; fc6/fc7 have 4096 units.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_UNITS = 4096
INITS = ("paper", "caffe", "kaiming")
LAYER_KINDS = {"act": "activation", "norm": "norm", "pool": "pool"}


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild the network; stored in every checkpoint. `name` is the
    architecture's registry name (`alexcli.architectures`); the fields after it are read by each
    architecture as it needs (the CIFAR net has no columns, conv6 or dropout)."""

    name: str = "alexnet"      # registry name: alexnet, cifar-local, or a plugin's
    num_classes: int = 1000
    crop: int = 224            # input side; 224 with conv1 padding 2 (paper), 227 with padding 0 (Caffe)
    width: float = 1.0         # multiplies every layer's channels and units (small experiments)
    groups: int = 2            # 2: the paper's two columns on conv2/4/5; 1: one column
    activation: str = "relu"   # registry names (alexcli plugins)
    norm: str = "lrn"
    pool: str = "overlap"
    dropout: float = 0.5       # section 4.2: fc6 and fc7
    init: str = "paper"        # paper | caffe | kaiming
    conv6: bool = False        # the sixth conv layer of the paper's pre-trained models (section 6)
    # Multiplies the network's input (0..1 pixels minus the mean image) before conv1: 255 feeds the
    # paper's "(centered) raw RGB values" (section 2), the scale its LRN constants were chosen for;
    # 1 (AlexNet's default here) leaves LRN a near-constant factor. See README, "Pixel scale and LRN".
    input_scale: float = 1.0

    @property
    def conv1_padding(self) -> int:
        return 0 if self.crop % 2 == 1 else 2  # 227 (Caffe) -> 0; 224 (paper) -> 2 giving 55x55

    def channels(self) -> tuple[int, ...]:
        g = self.groups
        return tuple(max(g, round(c * self.width / g) * g) for c in CONV_CHANNELS)

    @property
    def fc_units(self) -> int:
        return max(self.groups, round(FC_UNITS * self.width / self.groups) * self.groups)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        """The Arch a checkpoint stored. A field the dict lacks (written before the field existed)
        takes its architecture's default, so an old checkpoint rebuilds the network it trained."""
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            base = arch_defaults(d.get("name", "alexnet"))
        except PluginError:  # the architecture's package is missing: build_model names it
            base = {}
        return cls(**{k: v for k, v in {**base, **d}.items() if k in known})

    def validate(self) -> None:
        if self.groups not in (1, 2):
            raise UsageError(f"--groups must be 1 or 2, not {self.groups}")
        if not 0 < self.width <= 4:
            raise UsageError(f"--width must be in (0, 4], not {self.width}")
        if self.num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, not {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), not {self.dropout}")
        if not 0 < self.input_scale <= 1e4:
            raise UsageError(f"--input-scale must be in (0, 10000], not {self.input_scale}")


def with_layers(arch: Arch, specs: list[str]) -> Arch:
    """Apply `--layer KIND=NAME` options (kinds: act, norm, pool) to an Arch."""
    changes = {}
    for spec in specs:
        kind, sep, name = spec.partition("=")
        if not sep or kind not in LAYER_KINDS or not name:
            raise UsageError(f"--layer {spec!r}: expected KIND=NAME with KIND one of {', '.join(LAYER_KINDS)}")
        changes[{"act": "activation"}.get(kind, kind)] = name
    return dataclasses.replace(arch, **changes)


class PerColumn(nn.Module):
    """A channel-wise layer applied to each column's maps on their own (section 3.5)."""

    def __init__(self, factory, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.cols = nn.ModuleList(factory(channels // groups) for _ in range(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return self.cols[0](x)
        fused = getattr(self.cols[0], "forward_grouped", None)
        if fused is not None:  # the built-in LRN normalises both columns in one call
            return fused(x, self.groups)
        return torch.cat([m(part) for m, part in zip(self.cols, x.chunk(self.groups, dim=1))], dim=1)


def output_side(module: nn.Module, stack, crop: int) -> int:
    """Side of STACK's output for a crop x crop input, found by running it on zeros in eval mode
    (in train mode the probe would update a batch norm plugin's running statistics); 0 when a
    pooling window outgrows its input."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = stack(torch.zeros(1, 3, crop, crop))
    except RuntimeError:  # a pooling window larger than its input
        return 0
    finally:
        module.train(was_training)
    return x.shape[-1]


def resolve_layers(arch: Arch) -> tuple[dict, dict]:
    """Registry factories for the arch's variants, and their provenance for the checkpoint."""
    factories, used = {}, {}
    for kind, name in (("activation", arch.activation), ("norm", arch.norm), ("pool", arch.pool)):
        info = plugins.info(kind, name)
        factories[kind] = plugins.get(kind, name)
        used[kind] = {"name": name, "package": info.package, "version": info.version}
    return factories, used


class AlexNet(nn.Module):
    """Section 3.5. Build with `build_model(arch)`; `forward` returns logits (softmax in the loss)."""

    def __init__(self, arch: Arch, factories: dict):
        super().__init__()
        arch.validate()
        if arch.init not in INITS:
            raise UsageError(f"--init must be one of {', '.join(INITS)}, not {arch.init!r}")
        self.arch = arch
        act, norm, pool = factories["activation"], factories["norm"], factories["pool"]
        c1, c2, c3, c4, c5 = arch.channels()
        g = arch.groups
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=arch.conv1_padding)
        self.act1, self.norm1, self.pool1 = act(), PerColumn(norm, c1, g), pool()
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2, groups=g)
        self.act2, self.norm2, self.pool2 = act(), PerColumn(norm, c2, g), pool()
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)  # sees both columns
        self.act3 = act()
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, groups=g)
        self.act4 = act()
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1, groups=g)
        self.act5 = act()
        if arch.conv6:  # section 6: the pre-trained models' extra conv layer after the last pool
            self.conv6 = nn.Conv2d(c5, c5, 3, padding=1, groups=g)
            self.act6c = act()
        self.pool5 = pool()
        side = self.feature_side()
        if side < 1:
            raise UsageError(f"--crop {arch.crop} is too small for this network: the maps vanish before fc6 "
                             f"(use a crop of at least 64)")
        self.fc6 = nn.Linear(c5 * side * side, arch.fc_units)
        self.act6, self.drop6 = act(), nn.Dropout(arch.dropout)
        self.fc7 = nn.Linear(arch.fc_units, arch.fc_units)
        self.act7, self.drop7 = act(), nn.Dropout(arch.dropout)
        self.fc8 = nn.Linear(arch.fc_units, arch.num_classes)
        init_weights(self, arch.init)

    def feature_side(self) -> int:
        """Side of pool5's maps for this crop."""
        return output_side(self, self.conv_features, self.arch.crop)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch.input_scale != 1:
            x = x * self.arch.input_scale
        x = self.pool1(self.norm1(self.act1(self.conv1(x))))
        x = self.pool2(self.norm2(self.act2(self.conv2(x))))
        x = self.act3(self.conv3(x))
        x = self.act4(self.conv4(x))
        x = self.act5(self.conv5(x))
        if self.arch.conv6:
            x = self.act6c(self.conv6(x))
        return self.pool5(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer (fc7 after its activation): the 4096-d code of Figure 4 right."""
        x = torch.flatten(self.conv_features(x), 1)
        x = self.drop6(self.act6(self.fc6(x)))
        return self.act7(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.drop7(self.features(x)))


# Layers whose biases the paper sets to 1 (section 5); the rest start at 0.
ONE_BIAS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def init_weights(model: AlexNet, preset: str) -> None:
    """`paper`: weights N(0, 0.01), biases 1 in conv2/4/5 and fc6/7, else 0 (section 5). Known to
    sit at loss ln(classes) for a long time in reproductions. `caffe`: bvlc_alexnet's fix, biases
    0.1 where the paper has 1 and fc6/fc7 weights N(0, 0.005). `kaiming`: He-normal weights and
    zero biases, which leaves the flat start at once (not in the paper; for small experiments)."""
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if preset == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
            continue
        std = 0.005 if preset == "caffe" and name in ("fc6", "fc7") else 0.01
        nn.init.normal_(module.weight, 0.0, std)
        one = 1.0 if preset == "paper" else 0.1
        nn.init.constant_(module.bias, one if name in ONE_BIAS else 0.0)


def alexnet(arch: Arch, factories: dict) -> AlexNet:
    """Registry factory (`alexcli.architectures`: alexnet). An architecture plugin's factory has
    this signature: (Arch, {"activation"|"norm"|"pool": layer factory}) -> nn.Module taking
    (N, 3, crop, crop) images on the 0..1 scale minus the mean image and returning logits; it
    multiplies them by `arch.input_scale` itself where it wants another scale."""
    return AlexNet(arch, factories)


alexnet.defaults = {}
alexnet.inits = INITS
alexnet.stages = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")


def arch_defaults(name: str) -> dict:
    """The Arch fields architecture NAME sets differently from AlexNet (e.g. the CIFAR net's crop 24)."""
    return dict(getattr(plugins.get("architecture", name), "defaults", {}))


def make_arch(name: str = "alexnet", **fields) -> Arch:
    """An Arch for registry name NAME: its defaults, then FIELDS (those given as None are left out)."""
    return Arch(name=name, **{**arch_defaults(name), **{k: v for k, v in fields.items() if v is not None}})


def build_model(arch: Arch) -> tuple[nn.Module, dict]:
    """The network for ARCH and the provenance of its architecture and layer variants (name,
    package, version), as checkpoints record them."""
    arch.validate()
    factory = plugins.get("architecture", arch.name)
    info = plugins.info("architecture", arch.name)
    factories, used = resolve_layers(arch)
    used = {"architecture": {"name": arch.name, "package": info.package, "version": info.version}, **used}
    return factory(arch, factories), used


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shapes(model: nn.Module, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Output shape after each named stage (the factory's `stages`, else every direct child), for
    tests and `alexcli train --dry-run`."""
    out, hooks = {}, []
    stages = getattr(plugins.get("architecture", model.arch.name), "stages", None)
    for name in stages or [n for n, _ in model.named_children()]:
        hooks.append(getattr(model, name).register_forward_hook(
            lambda _m, _i, y, name=name: out.__setitem__(name, tuple(y.shape))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, 3, model.arch.crop, model.arch.crop))
    finally:
        for h in hooks:
            h.remove()
    return out
