"""Built-in layer variants, registered through the same entry-point groups as plugins; each
factory fits its kind's contract in `alexcli.specs` (ActivationFactory, NormFactory, PoolFactory)."""

import torch
import torch.nn.functional as F
from torch import nn


def relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def tanh() -> nn.Module:
    return nn.Tanh()


# Section 3.3: b_i = a_i / (k + alpha * sum_j a_j^2)^beta with k=2, n=5, alpha=1e-4, beta=0.75.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


class LRN(nn.Module):
    """Section 3.3 across channels: b_i = a_i / (k + alpha * sum_{|j-i| <= n/2} a_j^2)^beta.

    The window sum is a 1x1 convolution of a^2 with a 0/1 band matrix: one matrix product (tensor
    cores in bf16, no layout change in channels-last) where torch's LocalResponseNorm runs
    avg_pool3d on a padded 5-d copy. With `forward_grouped` both columns are normalised in one
    call with a block-diagonal band, so the window never crosses from one column into the other."""

    def __init__(self, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self._bands: dict = {}

    def _band(self, channels: int, groups: int, x: torch.Tensor) -> torch.Tensor:
        key = (channels, groups, x.dtype, x.device)
        if key not in self._bands:
            i = torch.arange(channels)
            per = channels // groups
            near = (i[:, None] - i[None, :]).abs() <= self.size // 2
            same = (i[:, None] // per) == (i[None, :] // per)
            self._bands[key] = (near & same).to(x.dtype).to(x.device)[:, :, None, None]
        return self._bands[key]

    def forward_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        band = self._band(x.shape[1], groups, x)
        if x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return _LRNFunction.apply(x, band, self.alpha, self.beta, self.k)
        s = F.conv2d(x * x, band)
        return x * (s * self.alpha + self.k).pow(-self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_grouped(x, 1)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class _LRNFunction(torch.autograd.Function):
    """LRN with a hand-written backward, used on the CPU. With d = k + alpha * band(x^2) and
    r = d^-beta the output is y = x * r, and

        dL/dx = g * r - 2 * alpha * beta * x * band(g * x * r / d)

    (band is symmetric). Autograd's version of the same formula runs pow's backward (a second
    pow) and keeps more temporaries; on 2 CPU cores LRN then cost 70% of a CIFAR net's step
    (benchmarks/cifar.py --variant lrn). On a GPU the autograd path is kept: it is fused and
    fast there, and autocast handles its dtypes."""

    @staticmethod
    def forward(ctx, x, band, alpha, beta, k):
        d = F.conv2d(x * x, band).mul_(alpha).add_(k)
        r = d.pow(-beta)
        ctx.save_for_backward(x, band, d, r)
        ctx.scale = 2.0 * alpha * beta
        return x * r

    @staticmethod
    def backward(ctx, g):
        x, band, d, r = ctx.saved_tensors
        gr = g * r
        u = F.conv2d((gr * x).div_(d), band)
        return gr.sub_(u.mul_(x).mul_(ctx.scale)), None, None, None, None


def lrn_paper(channels: int) -> nn.Module:
    """The paper's text: alpha is not divided by n (= torch's LocalResponseNorm with alpha 5e-4)."""
    return LRN(LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


def lrn_convnet(channels: int) -> nn.Module:
    """Krizhevsky's released cuda-convnet2 code: `scale /= size`, i.e. alpha/n (= torch's
    LocalResponseNorm with alpha 1e-4)."""
    return LRN(LRN_SIZE, LRN_ALPHA / LRN_SIZE, LRN_BETA, LRN_K)


class LRNAcrossColumns(LRN):
    """LRN whose window runs over all channels even in the two-column network: Caffe's LRN layer
    has no groups, so bvlc_alexnet's norm1 and norm2 normalise across both columns' maps (at
    channels 47|48 and 127|128 the window takes maps of the other column), where cuda-convnet
    normalised each column on its own GPU. `--parallel columns` cannot split it (each device holds
    one column's maps) and refuses it."""

    spans_columns = True

    def forward_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        return super().forward_grouped(x, 1)


def lrn_caffe(channels: int) -> nn.Module:
    """Caffe's LRN layer (ACROSS_CHANNELS) as BVLC's bvlc_alexnet uses it: local_size 5, alpha 1e-4
    divided by local_size, beta 0.75, k = 1 (Caffe's default; the paper's k is 2), and one window
    across both columns (LRNAcrossColumns)."""
    return LRNAcrossColumns(LRN_SIZE, LRN_ALPHA / LRN_SIZE, LRN_BETA, 1.0)


def no_norm(channels: int) -> nn.Module:
    return nn.Identity()


class MaxPool(nn.MaxPool2d):
    """nn.MaxPool2d that, without gradients on the CPU (eval, validation, predict, neighbors), pools
    in channels-last layout and hands back the usual one: the same maxima, where torch's NCHW max
    pool on the CPU is the slowest op of a forward pass (128 CIFAR maps of 64x24x24: 21 ms against
    6 ms with the two layout copies; AlexNet's pool1 at quarter width: 45 against 31 ms). With
    gradients it is nn.MaxPool2d itself: which of several equal inputs gets the gradient must not
    depend on the layout. While tracing (ONNX export) it is too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
                and not torch.jit.is_tracing()):
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)


def pool_overlapping() -> nn.Module:
    """Section 3.4: overlapping pooling, size 3 stride 2."""
    return MaxPool(kernel_size=3, stride=2)


def pool_2x2() -> nn.Module:
    """The paper's ablation: non-overlapping size 2 stride 2."""
    return MaxPool(kernel_size=2, stride=2)
