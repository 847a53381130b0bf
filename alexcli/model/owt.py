"""torchvision's `alexnet`: the "one weird trick" network (Krizhevsky 2014, arXiv:1404.5997), not
the 2012 paper's, registered as `owt` so an imported torchvision checkpoint (`alexcli import
torchvision`) computes exactly what torchvision's model does, and so it can be trained like any
other architecture.

Against the paper's net: 64-192-384-256-256 kernels, one column (no groups), no response
normalisation, dropout *before* fc6 and fc7 (torchvision's order), and an adaptive average pool
to 6x6 before fc6, so any crop of at least 63 works. Layer names follow the paper
(conv1..conv5, fc6..fc8); `alexcli.convert.torchvision` maps torchvision's `features.N` /
`classifier.N` keys onto them.

Input: like every alexcli network, 0..1 pixels minus the checkpoint's mean image, times
`arch.input_scale`. torchvision normalises with a per-channel mean and std instead; an import
keeps that exactly by storing the channel means as a constant mean image and dividing conv1's
weights by the std of their input channel (conv1 is linear and its zero padding is zero in both
spaces, so the two are the same function).
"""

from __future__ import annotations

from torch import nn

from alexcli.model.registry import Arch, fc6_side

CONV_CHANNELS = (64, 192, 384, 256, 256)
FC_UNITS = 4096
POOLED = 6  # adaptive average pool's output side


def conv_channels(arch: Arch) -> tuple[int, ...]:
    return tuple(max(1, round(c * arch.width)) for c in CONV_CHANNELS)


def fc_units(arch: Arch) -> int:
    return max(1, round(FC_UNITS * arch.width))


class AdaptiveAverage(nn.Module):
    """torchvision's AdaptiveAvgPool2d(6) for a known input side, as two products with a fixed
    averaging matrix (bin i of SIDE averages rows floor(i*SIDE/6) to ceil((i+1)*SIDE/6), as torch's
    adaptive pooling does): the same numbers, and unlike the adaptive op it exports to ONNX for any
    side (torch's exporter takes adaptive pooling only when 6 divides the side). At crop 224 the side
    is 6 and it is the identity, as torchvision's is."""

    def __init__(self, side: int, out: int = POOLED):
        super().__init__()
        import torch

        a = torch.zeros(out, side)
        for i in range(out):
            lo, hi = (i * side) // out, -(-((i + 1) * side) // out)
            a[i, lo:hi] = 1.0 / (hi - lo)
        self.identity = side == out
        self.register_buffer("a", a, persistent=False)  # not a weight: state dicts stay torchvision's

    def forward(self, x):
        return x if self.identity else self.a.to(x.dtype) @ x @ self.a.to(x.dtype).T


class OWT(nn.Module):
    """torchvision.models.AlexNet with the paper's layer names (build with `build_model`)."""

    def __init__(self, arch: Arch, factories: dict):
        super().__init__()
        arch.validate()
        self.arch = arch
        act, norm, pool = factories["activation"], factories["norm"], factories["pool"]
        c1, c2, c3, c4, c5 = conv_channels(arch)
        units = fc_units(arch)
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4, padding=2)
        self.act1, self.norm1, self.pool1 = act(), norm(c1), pool()
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.act2, self.norm2, self.pool2 = act(), norm(c2), pool()
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.act3 = act()
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.act4 = act()
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=1)
        self.act5 = act()
        self.pool5 = pool()
        side = fc6_side(self, self._maps, arch.crop)
        self.avgpool = AdaptiveAverage(side)
        self.drop6, self.fc6, self.act6 = nn.Dropout(arch.dropout), nn.Linear(c5 * POOLED * POOLED, units), act()
        self.drop7, self.fc7, self.act7 = nn.Dropout(arch.dropout), nn.Linear(units, units), act()
        self.fc8 = nn.Linear(units, arch.num_classes)
        if arch.init == "kaiming":
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        # "torchvision": the layers' own initialisation, as torchvision.models.alexnet() leaves it

    def _maps(self, x):
        if self.arch.input_scale != 1:
            x = x * self.arch.input_scale
        x = self.pool1(self.norm1(self.act1(self.conv1(x))))
        x = self.pool2(self.norm2(self.act2(self.conv2(x))))
        x = self.act3(self.conv3(x))
        x = self.act4(self.conv4(x))
        return self.pool5(self.act5(self.conv5(x)))

    def features(self, x):
        """fc7 after its ReLU: the 4096-d code (torchvision's classifier[5] output)."""
        x = self.avgpool(self._maps(x)).flatten(1)
        x = self.act6(self.fc6(self.drop6(x)))
        return self.act7(self.fc7(self.drop7(x)))

    def forward(self, x):
        return self.fc8(self.features(x))


def owt(arch: Arch, factories: dict) -> OWT:
    """Registry factory (`alexcli.architectures`: owt)."""
    return OWT(arch, factories)


def describe(arch: Arch) -> str:
    scale = f", input x{arch.input_scale:g}" if arch.input_scale != 1 else ""
    return (f"OWT (torchvision's AlexNet) {'-'.join(map(str, conv_channels(arch)))} conv, fc {fc_units(arch)}, "
            f"{arch.num_classes} classes, crop {arch.crop}, {arch.activation}/{arch.norm}/{arch.pool}, "
            f"init {arch.init}{scale}")


owt.defaults = {"norm": "none", "groups": 1, "init": "torchvision", "input_scale": 1.0}
owt.inits = ("torchvision", "kaiming")
owt.fixed = {"groups": 1, "conv6": False}
owt.stages = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7", "fc8")
owt.feature_layer = "fc7 (after its ReLU)"
owt.describe = describe
