"""Built-in layer variants, registered through the same entry-point groups as plugins.

Factory signatures (a plugin's must match):
  activation() -> nn.Module
  norm(channels: int) -> nn.Module
  pool() -> nn.Module          (applied to 55x55, 27x27 and 13x13 maps)
"""

from torch import nn


def relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def tanh() -> nn.Module:
    return nn.Tanh()


# Section 3.3: b_i = a_i / (k + alpha * sum_j a_j^2)^beta with k=2, n=5, alpha=1e-4, beta=0.75.
# torch's LocalResponseNorm divides alpha by n, so the paper's text is alpha=n*1e-4 there.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def lrn_paper(channels: int) -> nn.Module:
    """The paper's text: alpha is not divided by n."""
    return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


def lrn_convnet(channels: int) -> nn.Module:
    """Krizhevsky's released cuda-convnet2 code: `scale /= size`, i.e. alpha/n."""
    return nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


def no_norm(channels: int) -> nn.Module:
    return nn.Identity()


def pool_overlapping() -> nn.Module:
    """Section 3.4: overlapping pooling, size 3 stride 2."""
    return nn.MaxPool2d(kernel_size=3, stride=2)


def pool_2x2() -> nn.Module:
    """The paper's ablation: non-overlapping size 2 stride 2."""
    return nn.MaxPool2d(kernel_size=2, stride=2)
