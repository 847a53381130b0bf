"""alexcli plugin: batch normalisation in place of local response normalisation.

Registered in the `alexcli.layers.norm` entry-point group as `batchnorm` (see pyproject.toml),
so `alexcli train --layer norm=batchnorm` puts a BatchNorm2d (Ioffe & Szegedy, "Batch
Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift", 2015)
wherever the 2012 network has LRN: after conv1 and conv2, following the ReLU.

alexcli calls a norm factory once per column with that column's channel count (48 and 128 at
full width with the paper's two columns), so each column keeps its own statistics, as each GPU
did in 2012.
"""

from __future__ import annotations

from torch import nn

__all__ = ["batchnorm"]


def batchnorm(channels: int) -> nn.Module:
    """The `alexcli.layers.norm` factory: `norm(channels) -> nn.Module`.

    torch's defaults (eps 1e-5, momentum 0.1, learnable scale and shift, running statistics):
    batch statistics normalise each channel in training, the running averages in evaluation.
    """
    return nn.BatchNorm2d(channels)
