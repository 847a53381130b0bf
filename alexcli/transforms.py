"""What happens to a batch of images between the loader and the network, in training and in test.

The stream only decodes: it hands over uint8 images (256x256 by default); `to_float` scales them
to 0..1 on the device. In training the pipeline named by `--augment` (default `mean,crop,flip,pca`:
sections 2 and 4.1; each a registered `alexcli.augmentations` factory, see `alexcli.specs`) runs on
whole batches there; in test `model_input` subtracts the mean and takes the centre patch or section
4.1's ten patches. Augmentations draw their random numbers on the CPU from a seeded generator and
move them with `to_device`, so a run gives the same images on CPU and GPU and follows `--seed`.
"""

from __future__ import annotations

import torch

from alexcli import plugins
from alexcli.choices import comma_list
from alexcli.errors import UsageError
from alexcli.specs import Augment, AugmentContext

PCA_STD = 0.1  # section 4.1: alpha ~ N(0, 0.1), drawn once per image per pass


def to_device(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Move random numbers drawn on the CPU to LIKE's device without stalling the host: a copy from
    ordinary (pageable) memory makes the CPU wait for all queued GPU work, which would stop the
    loader's next batch from overlapping this step. Pinned memory (cached by torch) does not."""
    if like.device.type != "cuda":
        return t
    return t.pin_memory().to(like.device, non_blocking=True)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> a new float32 tensor on the 0..1 scale the statistics use."""
    if images.dtype != torch.uint8:  # .float() of a float tensor is the tensor itself: div_ would change it
        raise TypeError(f"to_float takes uint8 images, not {images.dtype}")
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


# --- test patches ---

def model_input(x: torch.Tensor, mean_image: torch.Tensor | None, crop: int, crops: str = "center") -> torch.Tensor:
    """Float 0..1 images (N, 3, S, S) -> the network's test input: (N, 3, crop, crop), or
    (N*10, 3, crop, crop) with crops="ten" (each image's ten patches consecutive)."""
    if mean_image is not None:
        x = subtract_mean(x, mean_image)
    if crops == "ten":
        return ten_crops(x, crop).flatten(0, 1)
    return center_crop(x, crop)


# --- the training pipeline ---

def parse(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """--augment's names, checked: each registered, none twice (mean,mean would subtract the mean
    image twice; a checkpoint records each step once). "" is none; an empty entry is an error."""
    if isinstance(spec, str):
        names = comma_list(spec, "--augment", "registered names like mean,crop,flip,pca")
    else:
        names = [n for n in spec if n]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--augment {','.join(names)}: {', '.join(twice)} given more than once")
    for n in names:
        plugins.info("augmentation", n)  # unknown names fail here, before any work
    return names


def build(names: list[str], ctx: AugmentContext) -> tuple[Augment, dict]:
    """The pipeline for NAMES in order, and the provenance of each (for the checkpoint)."""
    names = parse(names)
    steps = [plugins.get("augmentation", n)(ctx) for n in names]
    used = {n: plugins.info("augmentation", n).provenance() for n in names}

    def pipeline(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, gen)
        return x
    return pipeline, used
