"""The 2012 network (section 3.5), with its layer variants chosen by registry name.

Layer names follow the paper (conv1..conv5, fc6..fc8) so checkpoints read like the table in
docs/design.md. `groups=2` is the paper's two columns: conv2, conv4 and conv5 see only their own
column's maps, and response normalisation runs within a column (each GPU normalised its own 48
or 128 maps in cuda-convnet), so the one-device model computes exactly what the two-device
split in `alexcli.model.columns` computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alexcli.model.registry import Arch, fc6_side

# Section 3.5: kernels per layer; fc6/fc7 have 4096 units.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_UNITS = 4096


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
        self.fc6 = nn.Linear(c5 * side * side, units)
        self.act6, self.drop6 = act(), nn.Dropout(arch.dropout)
        self.fc7 = nn.Linear(units, units)
        self.act7, self.drop7 = act(), nn.Dropout(arch.dropout)
        self.fc8 = nn.Linear(units, arch.num_classes)
        init_weights(self, arch.init)

    def feature_side(self) -> int:
        """Side of pool5's maps for this crop."""
        return fc6_side(self, self.conv_features, self.arch.crop)

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


# The initialisation presets: per layer (weight std, bias) at the paper's size (width 1, crop 224,
# two columns); `kaiming` is computed from each layer's fan-in instead. docs/design.md gives the
# measurements behind the default (Arch.init).
_PAPER_BIAS = {"conv2": 1.0, "conv4": 1.0, "conv5": 1.0, "fc6": 1.0, "fc7": 1.0}  # section 5; the rest 0
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7", "fc8")
PRESETS = {
    # section 5: "zero-mean Gaussian distribution with standard deviation 0.01", biases 1 in
    # conv2, conv4, conv5 and the hidden fully-connected layers, 0 elsewhere
    "paper": {n: (0.01, _PAPER_BIAS.get(n, 0.0)) for n in LAYERS},
    # Krizhevsky's own cuda-convnet2 layers-imagenet-2gpu-model.cfg (the two-column net): initW 0.03
    # in conv3-5, else the paper's numbers. (Its one-GPU file's fc1000 initB=-7 is the same bias on
    # every class, which softmax ignores, so it is left at 0.)
    "convnet2": {n: (0.03 if n in ("conv3", "conv4", "conv5", "conv6") else 0.01, _PAPER_BIAS.get(n, 0.0))
                 for n in LAYERS},
    # Caffe's bvlc_alexnet: biases 0.1 where the paper has 1, fc6/fc7 weights N(0, 0.005)
    "caffe": {n: (0.005 if n in ("fc6", "fc7") else 0.01, 0.1 if n in _PAPER_BIAS else 0.0) for n in LAYERS},
}
INITS = ("paper", "convnet2", "caffe", "kaiming")
# Each layer's fan-in (inputs per output unit) in the paper's net, the size the presets' numbers
# were given for: width 1, two columns (conv2/4/5 see one column's maps), pool5 6x6 at crop 224.
PAPER_FAN_IN = {"conv1": 3 * 11 * 11, "conv2": 48 * 5 * 5, "conv3": 256 * 3 * 3, "conv4": 192 * 3 * 3,
                "conv5": 192 * 3 * 3, "conv6": 128 * 3 * 3, "fc6": 256 * 6 * 6, "fc7": 4096, "fc8": 4096}


def init_std(preset: str, name: str, fan_in: int) -> float:
    """The weight std of layer NAME under PRESET when it has FAN_IN inputs per unit: the preset's
    number times sqrt(paper fan-in / fan-in), so a layer narrowed by --width (or by a smaller
    --crop, or --groups 1) starts with the pre-activation statistics of the paper's net. At the
    paper's size the factor is 1: the preset's own numbers."""
    return PRESETS[preset][name][0] * math.sqrt(PAPER_FAN_IN[name] / fan_in)


def init_weights(model: AlexNet, preset: str) -> None:
    """Initialise MODEL's layers with PRESET (see PRESETS): `paper`, `convnet2`, `caffe` (weights
    N(0, init_std), the preset's biases), or `kaiming` (He-normal weights from each layer's own
    fan-in, zero biases; not in the paper)."""
    if preset not in INITS:
        raise ValueError(f"unknown AlexNet init preset {preset!r}")
    for name in LAYERS:
        module = getattr(model, name, None)
        if module is None:  # conv6 only with --conv6
            continue
        if preset == "kaiming":
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
            continue
        nn.init.normal_(module.weight, 0.0, init_std(preset, name, module.weight[0].numel()))
        nn.init.constant_(module.bias, PRESETS[preset][name][1])


def alexnet(arch: Arch, factories: dict) -> AlexNet:
    """Registry factory (`alexcli.architectures`: alexnet); the contract is
    `alexcli.specs.ArchitectureFactory`."""
    return AlexNet(arch, factories)


def describe(arch: Arch) -> str:
    scale = f", input x{arch.input_scale:g}" if arch.input_scale != 1 else ""
    return (f"AlexNet {'-'.join(map(str, conv_channels(arch)))} conv, fc {fc_units(arch)}, {arch.num_classes} classes, "
            f"crop {arch.crop}, groups {arch.groups}, {arch.activation}/{arch.norm}/{arch.pool}, init {arch.init}"
            f"{scale}")


# The default: the paper's network, pixel scale and biases with Krizhevsky's own cuda-convnet2
# weight scales, the configuration closest to the paper that leaves chance (docs/design.md,
# "Initialisation"; the literal paper is --init paper).
alexnet.defaults = {"init": "convnet2", "input_scale": 255.0}
# Each preset with the input scale its source fed: the paper, cuda-convnet2 and Caffe trained on
# raw 0..255 pixels minus the mean; He's scales assume unit-sized inputs.
alexnet.init_fields = {"paper": {"input_scale": 255.0}, "convnet2": {"input_scale": 255.0},
                       "caffe": {"input_scale": 255.0}, "kaiming": {"input_scale": 1.0}}
# Checkpoints written before Arch had input_scale were all trained on the 0..1 scale.
alexnet.legacy = {"input_scale": 1.0}
alexnet.inits = INITS
alexnet.stages = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")
alexnet.feature_layer = "fc7 (after its ReLU)"
alexnet.describe = describe
