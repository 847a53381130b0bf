"""alexcli plugin: cutout (DeVries & Taylor, "Improved Regularization of Convolutional Neural
Networks with Cutout", 2017).

Registered in the `alexcli.augmentations` entry-point group as `cutout` (see pyproject.toml), so
`alexcli train --augment mean,crop,flip,pca,cutout` zeroes one square patch of every training
image, on the whole batch at once on the training device.

- Patch side: half the network's input side, `ctx.crop // 2` (112 at the paper's 224 crop). This
  is the paper's CIFAR-10 setting (16 on 32x32 images) scaled to the crop; the ratio is the
  module constant `SIDE_FRACTION`, and `cutout_with(side)` builds a factory for any other side.
- Centre: drawn uniformly over the image, row in [0, H) and column in [0, W), so the patch may
  be clipped at the borders (the paper's choice: on average less than side x side is cut).
  The patch covers rows [cy - side // 2, cy - side // 2 + side) and the same for columns.
- Value: 0. After `mean` that is the data set's mean image, i.e. "no information", as the
  paper intends for normalised inputs; place `cutout` after `mean` in `--augment`.
- Randomness: two integers per image, drawn on the CPU from the `torch.Generator` alexcli passes
  in (rows first, then columns), then moved with `alexcli.transforms.to_device` (pinned, no host
  stall) to the images' device, so CPU and GPU runs cut the
  same patches and `--seed` decides them all.
"""

from __future__ import annotations

from typing import Callable

import torch

from alexcli.transforms import to_device

__all__ = ["SIDE_FRACTION", "cutout", "cutout_with", "cutout_at", "draw_centres"]

SIDE_FRACTION = 0.5  # patch side / crop side

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def draw_centres(n: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch centres for N images of HxW: rows then columns, uniform, on the CPU from GEN."""
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    return cy, cx


def cutout_at(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, side: int) -> torch.Tensor:
    """X (N, C, H, W) with a SIDE x SIDE square centred at (cy[i], cx[i]) set to 0 in image i,
    clipped to the image. One mask for the whole batch, no loop over images; X is not modified."""
    n, _, h, w = x.shape
    top = to_device(cy, x)[:, None] - side // 2  # (N, 1)
    left = to_device(cx, x)[:, None] - side // 2
    rows = torch.arange(h, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top) & (rows < top + side)  # (N, H)
    in_cols = (cols >= left) & (cols < left + side)  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # (N, H, W)
    return x.masked_fill(mask[:, None], 0.0)


def cutout_with(side: int) -> Callable[[object], Augment]:
    """A factory like `cutout` with a fixed patch side in pixels (for a plugin of your own)."""
    if side < 1:
        raise ValueError(f"cutout side must be at least 1 pixel, not {side}")

    def factory(ctx) -> Augment:
        def run(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            n, _, h, w = x.shape
            cy, cx = draw_centres(n, h, w, gen)
            return cutout_at(x, cy, cx, side)
        return run
    return factory


def cutout(ctx) -> Augment:
    """The `alexcli.augmentations` factory: `cutout(ctx: AugmentContext) -> augment(x, gen)`,
    with a patch side of `ctx.crop * SIDE_FRACTION` (at least 1)."""
    return cutout_with(max(1, int(ctx.crop * SIDE_FRACTION)))(ctx)
