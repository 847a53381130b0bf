"""Augmentations on whole batches on the training device (section 4.1), chosen by registry name.

The loader only decodes: it hands over uint8 256x256 images, `to_float` scales them to 0..1 on
the device, and the pipeline named by `--augment` (default `mean,crop,flip,pca`) runs there.

A plugin registers a factory in the `alexcli.augmentations` entry-point group:

    factory(ctx: AugmentContext) -> augment(x: Tensor, gen: torch.Generator) -> Tensor

`x` is a float32 batch (N, 3, H, W) on the training device, pixel values on the 0..1 scale.
`gen` is a CPU generator: draw the (few) random numbers on the CPU with it and move them with
`to_device(t, x)`, so a run gives the same images on CPU and GPU, follows `--seed` exactly, and
does not stall the host (see to_device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from alexcli import plugins
from alexcli.errors import UsageError

DEFAULT_AUGMENT = ("mean", "crop", "flip", "pca")
PCA_STD = 0.1  # section 4.1: alpha ~ N(0, 0.1), drawn once per image per pass

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class AugmentContext:
    """What an augmentation may need, from the data set's stats.safetensors (0..1 pixel scale)."""

    crop: int                  # side of the network's input (224)
    mean_image: torch.Tensor   # (3, S, S) float32 on the device
    eigval: torch.Tensor       # (3,) eigenvalues of the RGB covariance, descending
    eigvec: torch.Tensor       # (3, 3) eigenvectors in columns

    @classmethod
    def from_stats(cls, stats: dict, crop: int, device) -> "AugmentContext":
        """The context for a data set's statistics (as loader.load_data_stats gives them) on DEVICE."""
        return cls(crop=crop, mean_image=stats["mean_image"].float().to(device),
                   eigval=stats["pca_eigval"].float().to(device), eigvec=stats["pca_eigvec"].float().to(device))


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Move random numbers drawn on the CPU to LIKE's device without stalling the host: a copy from
    ordinary (pageable) memory makes the CPU wait for all queued GPU work, which would stop the
    loader's next batch from overlapping this step. Pinned memory (cached by torch) does not."""
    if like.device.type != "cuda":
        return t
    return t.pin_memory().to(like.device, non_blocking=True)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 on the 0..1 scale the statistics use."""
    return images.float().div_(255.0)


def crop_at(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image crops of side SIZE at offsets (oy[i], ox[i]), as one gather over the batch."""
    n, c, h, w = x.shape
    ar = torch.arange(size, device=x.device)
    idx = ((to_device(oy, x)[:, None] + ar)[:, :, None] * w + (to_device(ox, x)[:, None] + ar)[:, None, :])
    idx = idx.reshape(n, 1, size * size).expand(n, c, size * size)
    return x.reshape(n, c, h * w).gather(2, idx).reshape(n, c, size, size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def ten_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """Section 4.1's test patches: four corners and the centre, and their reflections.
    (N, 3, H, W) -> (N, 10, 3, size, size)."""
    h, w = x.shape[-2:]
    b, r = h - size, w - size
    patches = [x[..., :size, :size], x[..., :size, r:], x[..., b:, :size], x[..., b:, r:], center_crop(x, size)]
    patches += [p.flip(-1) for p in patches]
    return torch.stack(patches, dim=1)


def _check_mean_shape(x: torch.Tensor, mean: torch.Tensor) -> None:
    if x.shape[-2:] != mean.shape[-2:]:
        raise UsageError(f"augmentation 'mean' needs the full {mean.shape[-1]}x{mean.shape[-2]} images but got "
                         f"{x.shape[-1]}x{x.shape[-2]}: put it before 'crop' in --augment")


def subtract_mean(x: torch.Tensor, mean_image: torch.Tensor) -> torch.Tensor:
    _check_mean_shape(x, mean_image)
    return x - mean_image


# --- the built-in augmentations (registered in pyproject.toml like any plugin) ---

def mean(ctx: AugmentContext) -> Augment:
    """Section 2: subtract the mean image of the training set from each image."""
    return lambda x, gen: subtract_mean(x, ctx.mean_image)


def crop(ctx: AugmentContext) -> Augment:
    """Section 4.1: a random CROPxCROP patch of each image."""
    def run(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        if h < ctx.crop or w < ctx.crop:
            raise UsageError(f"images are {w}x{h}, smaller than --crop {ctx.crop}")
        oy = torch.randint(0, h - ctx.crop + 1, (n,), generator=gen)
        ox = torch.randint(0, w - ctx.crop + 1, (n,), generator=gen)
        return crop_at(x, oy, ox, ctx.crop)
    return run


def flip(ctx: AugmentContext) -> Augment:
    """Section 4.1: horizontal reflection of half the images."""
    def run(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        mask = to_device(torch.rand(x.shape[0], generator=gen) < 0.5, x)
        return torch.where(mask[:, None, None, None], x.flip(-1), x)
    return run


def pca(ctx: AugmentContext) -> Augment:
    """Section 4.1: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T to every pixel, a ~ N(0, 0.1) per image.
    Eigenvalues are those of the 0..1-scale covariance (as fb.resnet.torch uses them)."""
    def run(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        alpha = torch.randn(x.shape[0], 3, generator=gen) * PCA_STD
        shift = (to_device(alpha, x) * ctx.eigval) @ ctx.eigvec.T  # (N, 3): one RGB offset per image
        return x + shift[:, :, None, None].to(x.dtype)
    return run


def parse(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    for n in names:
        plugins.info("augmentation", n)  # unknown names fail here, before any work
    return names


def build(names: list[str], ctx: AugmentContext) -> tuple[Augment, dict]:
    """The pipeline for NAMES in order, and the provenance of each (for the checkpoint)."""
    steps, used = [], {}
    for n in names:
        info = plugins.info("augmentation", n)
        steps.append(plugins.get("augmentation", n)(ctx))
        used[n] = {"name": n, "package": info.package, "version": info.version}

    def pipeline(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, gen)
        return x
    return pipeline, used
