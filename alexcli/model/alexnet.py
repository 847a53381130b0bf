"""The 2012 network (section 3.5), with its layer variants chosen by registry name.

Layer names follow the paper (conv1..conv5, fc6..fc8) so checkpoints read like the table in
docs/design.md. `groups=2` is the paper's two columns: conv2, conv4 and conv5 see only their own
column's maps, and response normalisation runs within a column (each GPU normalised its own 48
or 128 maps in cuda-convnet), so the one-device model computes exactly what the two-device
split in `alexcli.model.columns` computes.
"""

from __future__ import annotations

import torch
from torch import nn

from alexcli.errors import UsageError
from alexcli.model.registry import Arch, output_side

# Section 3.5: kernels per layer; fc6/fc7 have 4096 units.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_UNITS = 4096
INITS = ("paper", "caffe", "kaiming")


def conv_channels(arch: Arch) -> tuple[int, ...]:
    """conv1..conv5's kernels at ARCH's width, each a multiple of the column count."""
    g = arch.groups
    return tuple(max(g, round(c * arch.width / g) * g) for c in CONV_CHANNELS)


def fc_units(arch: Arch) -> int:
    return max(arch.groups, round(FC_UNITS * arch.width / arch.groups) * arch.groups)


def conv1_padding(arch: Arch) -> int:
    return 0 if arch.crop % 2 == 1 else 2  # 227 (Caffe) -> 0; 224 (paper) -> 2 giving 55x55
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


class AlexNet(nn.Module):
    """Section 3.5. Build with `build_model(arch)`; `forward` returns logits (softmax in the loss)."""

    def __init__(self, arch: Arch, factories: dict):
        super().__init__()
        arch.validate()
        self.arch = arch
        act, norm, pool = factories["activation"], factories["norm"], factories["pool"]
        c1, c2, c3, c4, c5 = conv_channels(arch)
        g, units = arch.groups, fc_units(arch)
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=conv1_padding(arch))
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
        self.fc6 = nn.Linear(c5 * side * side, units)
        self.act6, self.drop6 = act(), nn.Dropout(arch.dropout)
        self.fc7 = nn.Linear(units, units)
        self.act7, self.drop7 = act(), nn.Dropout(arch.dropout)
        self.fc8 = nn.Linear(units, arch.num_classes)
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
    if preset not in INITS:
        raise ValueError(f"unknown AlexNet init preset {preset!r}")
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
    """Registry factory (`alexcli.architectures`: alexnet); the contract is
    `alexcli.specs.ArchitectureFactory`."""
    return AlexNet(arch, factories)


def describe(arch: Arch) -> str:
    scale = f", input x{arch.input_scale:g}" if arch.input_scale != 1 else ""
    return (f"AlexNet {'-'.join(map(str, conv_channels(arch)))} conv, fc {fc_units(arch)}, {arch.num_classes} classes, "
            f"crop {arch.crop}, groups {arch.groups}, {arch.activation}/{arch.norm}/{arch.pool}, init {arch.init}"
            f"{scale}")


alexnet.defaults = {}
alexnet.inits = INITS
alexnet.stages = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")
alexnet.feature_layer = "fc7 (after its ReLU)"
alexnet.describe = describe
