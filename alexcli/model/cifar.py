"""The four-layer CIFAR-10 net of the paper's side experiments (Figure 1 and section 3.3).

Modelled on cuda-convnet's example layer files `layers-conv-local-13pct.cfg` (no response
normalisation) and `layers-conv-local-11pct.cfg` (normalisation after conv1 and conv2), the nets
behind the paper's "13% vs 11%" CIFAR-10 result:

    conv1  5x5, 64 maps, padding 2 -> act -> norm -> pool
    conv2  5x5, 64 maps, padding 2 -> act -> norm -> pool
    local3 3x3, 32 maps, padding 1, unshared weights -> act
    local4 3x3, 32 maps, padding 1, unshared weights -> act
    fc10   -> softmax (in the loss)

Activation, normalisation and pooling come from the same registry as AlexNet's (`--layer`), so
`norm=none` is the 13% net and `norm=lrn` the 11% one. Like cuda-convnet, the net works on the
0..255 pixel scale (the loader's 0..1 minus the mean image, times 255): the paper's LRN constants
(k=2, alpha=1e-4) and cuda-convnet's initial weight scales (`initW`) were chosen for activations
of that size; on the 0..1 scale the normalisation would be a constant factor. Differences from
cuda-convnet, kept on purpose: pooling rounds down (torch) where cuda-convnet rounds up, so a 24
crop gives 11 and 5 maps rather than 12 and 6; biases share one learning rate with the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alexcli.errors import UsageError
from alexcli.model.registry import output_side

CONV_MAPS = (64, 64)
LOCAL_MAPS = (32, 32)
PIXEL_SCALE = 255.0  # cuda-convnet's inputs were raw pixel values minus the mean
INITS = ("convnet", "kaiming")
# cuda-convnet's `initW` per layer (weights ~ N(0, initW), biases 0) in the 11pct/13pct files.
CONVNET_INIT_STD = {"conv1": 1e-4, "conv2": 1e-2, "local3": 4e-2, "local4": 4e-2, "fc10": 1e-2}
# Defaults of this architecture for the Arch fields that differ from AlexNet's.
DEFAULTS = {"crop": 24, "groups": 1, "init": "convnet", "dropout": 0.0, "norm": "lrn", "num_classes": 10,
            "input_scale": PIXEL_SCALE}


class LocallyConnected2d(nn.Module):
    """A convolution whose filters are not shared: every output position has its own weights
    (cuda-convnet's `type=local`) and its own bias per map.

    weight: (out_h * out_w, out_channels, in_channels * k * k), position-major, each row in
    `F.unfold`'s (channel, kernel row, kernel column) order; bias: (out_channels, out_h, out_w).
    The forward pass is one batched matrix product over positions of the unfolded input.
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: int, kernel_size: int,
                 padding: int = 0, stride: int = 1):
        super().__init__()
        out_size = (in_size + 2 * padding - kernel_size) // stride + 1
        if out_size < 1:
            raise UsageError(f"a {kernel_size}x{kernel_size} locally connected layer does not fit "
                             f"{in_size}x{in_size} maps")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size, self.out_size = in_size, out_size
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(out_size * out_size, out_channels, fan_in))
        self.bias = nn.Parameter(torch.zeros(out_channels, out_size, out_size))
        nn.init.kaiming_uniform_(self.weight.view(-1, fan_in), a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != self.in_size or w != self.in_size:
            raise UsageError(f"locally connected layer built for {self.in_size}x{self.in_size} maps got {w}x{h}")
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (N, C*k*k, L)
        out = torch.bmm(cols.permute(2, 0, 1), self.weight.transpose(1, 2))  # (L, N, out)
        out = out.permute(1, 2, 0).reshape(n, self.out_channels, self.out_size, self.out_size)
        return out + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, in_size={self.in_size}, out_size={self.out_size}, "
                f"kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride}")


class CifarNet(nn.Module):
    """Two conv+pool stages, two locally connected layers, a softmax layer (see the module doc).
    Build with `alexcli.model.build_model(make_arch("cifar-local", ...))`."""

    def __init__(self, arch, factories: dict):
        super().__init__()
        self.arch = arch
        act, norm, pool = factories["activation"], factories["norm"], factories["pool"]
        c1, c2 = (max(1, round(c * arch.width)) for c in CONV_MAPS)
        l3, l4 = (max(1, round(c * arch.width)) for c in LOCAL_MAPS)
        self.conv1 = nn.Conv2d(3, c1, 5, padding=2)
        self.act1, self.norm1, self.pool1 = act(), norm(c1), pool()
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.act2, self.norm2, self.pool2 = act(), norm(c2), pool()
        side = self._side_after_convs(arch.crop)
        if side < 3:
            raise UsageError(f"--crop {arch.crop} is too small for {arch.name}: its maps are {side}x{side} "
                             f"after two pools (use a crop of at least 16)")
        self.local3 = LocallyConnected2d(c2, l3, side, 3, padding=1)
        self.act3 = act()
        self.local4 = LocallyConnected2d(l3, l4, side, 3, padding=1)
        self.act4 = act()
        self.fc10 = nn.Linear(l4 * side * side, arch.num_classes)
        init_cifar(self, arch.init)

    def _side_after_convs(self, crop: int) -> int:
        return output_side(self, lambda x: self.pool2(self.norm2(self.act2(self.conv2(self.pool1(self.norm1(
            self.act1(self.conv1(x)))))))), crop)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """local4's activations, flattened: the last hidden layer."""
        x = x * self.arch.input_scale
        x = self.pool1(self.norm1(self.act1(self.conv1(x))))
        x = self.pool2(self.norm2(self.act2(self.conv2(x))))
        x = self.act3(self.local3(x))
        return torch.flatten(self.act4(self.local4(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc10(self.features(x))

    def decayed_parameters(self) -> tuple[list, list]:
        """(parameters with weight decay, without): cuda-convnet's files decay only local3, local4
        and fc10 (`wc=0.004`) and leave the conv layers undecayed (`wc=0`)."""
        conv = [p for n, p in self.named_parameters() if n.startswith(("conv1", "conv2"))]
        rest = [p for n, p in self.named_parameters() if not n.startswith(("conv1", "conv2"))]
        return rest, conv


def init_cifar(model: CifarNet, preset: str) -> None:
    """`convnet`: cuda-convnet's initW per layer, biases 0. `kaiming`: He-normal weights scaled for
    the 0..255 input of conv1, biases 0."""
    if preset not in INITS:
        raise ValueError(f"unknown cifar-local init preset {preset!r}")
    for name in ("conv1", "conv2", "local3", "local4", "fc10"):
        layer = getattr(model, name)
        if preset == "convnet":
            nn.init.normal_(layer.weight, 0.0, CONVNET_INIT_STD[name])
        else:
            fan_in = layer.weight.shape[-1] if isinstance(layer, LocallyConnected2d) else layer.weight[0].numel()
            gain = 1.0 / model.arch.input_scale if name == "conv1" else 1.0
            nn.init.normal_(layer.weight, 0.0, gain * math.sqrt(2.0 / fan_in))
        nn.init.zeros_(layer.bias)


def cifar_local(arch, factories: dict) -> CifarNet:
    """Registry factory (`alexcli.architectures`: cifar-local)."""
    return CifarNet(arch, factories)


cifar_local.defaults = DEFAULTS
cifar_local.inits = INITS
cifar_local.stages = ("conv1", "pool1", "conv2", "pool2", "local3", "local4", "fc10")
cifar_local.feature_layer = "local4 (after its activation)"
# Arch fields this net has no use for: one column, no dropout, no conv6 (a different value is refused).
cifar_local.fixed = {"groups": 1, "dropout": 0.0, "conv6": False}
