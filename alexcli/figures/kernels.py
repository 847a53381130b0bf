"""`alexcli kernels`: the first layer's kernels as one picture (Figure 3), a row block per column."""

from __future__ import annotations

import numpy as np
import torch

from alexcli.errors import DataError, UsageError
from alexcli.figures.plot import check_png, save_png

KERNELS_PER_ROW = 16     # Figure 3 shows each column's 48 kernels as 3 rows of 16


def normalise_kernels(weight: torch.Tensor) -> np.ndarray:
    """(C, 3, k, k) weights -> (C, k, k, 3) floats in 0..1, each kernel min-max scaled on its own
    (a kernel whose weights are all equal becomes mid grey)."""
    w = weight.detach().float().cpu().numpy()
    lo = w.reshape(len(w), -1).min(1)[:, None, None, None]
    hi = w.reshape(len(w), -1).max(1)[:, None, None, None]
    span = hi - lo
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    return norm.transpose(0, 2, 3, 1)


MAX_PIXELS = 64_000_000  # a 192 MB RGB picture; the paper's Figure 3 at --scale 4 is 0.2 million


def kernel_layout(count: int, groups: int, size: int, scale: int, per_row: int = KERNELS_PER_ROW) -> dict:
    """Where each kernel goes. Each column's COUNT/GROUPS kernels fill rows of PER_ROW (fewer when
    a column has fewer); tiles are SIZE*SCALE pixels with SCALE pixels of white between and
    around them, and a column's block starts 4*SCALE pixels below the previous one.
    Returns {"width", "height", "tile", "origins": [(top, left) per kernel]}."""
    per_col = count // groups
    across = min(per_row, per_col)
    down = -(-per_col // across)
    tile, pad, gap = size * scale, scale, 4 * scale
    block_h = down * tile + (down + 1) * pad
    width = across * tile + (across + 1) * pad
    height = groups * block_h + (groups - 1) * gap
    origins = []
    for i in range(count):
        g, j = divmod(i, per_col)
        r, c = divmod(j, across)
        origins.append((g * (block_h + gap) + pad + r * (tile + pad), pad + c * (tile + pad)))
    return {"width": width, "height": height, "tile": tile, "origins": origins, "per_row": across, "rows": down}


def kernel_grid(weight: torch.Tensor, groups: int, scale: int = 4) -> tuple[np.ndarray, dict]:
    """conv1 WEIGHT (C, 3, k, k) -> an RGB uint8 picture (H, W, 3) and its layout: each kernel
    min-max normalised on its own and enlarged SCALE times (nearest neighbour), the first C/2
    kernels (column 0) above the other C/2 (column 1) when GROUPS is 2."""
    if scale < 1:
        raise UsageError(f"--scale must be at least 1, not {scale}")
    count, _, size, _ = weight.shape
    layout = kernel_layout(count, groups, size, scale)
    pixels = layout["width"] * layout["height"]
    if pixels > MAX_PIXELS:
        unit = pixels / scale ** 2  # the picture grows with the square of the scale
        raise UsageError(f"--scale {scale} makes a {layout['width']} x {layout['height']} picture, more than "
                         f"{MAX_PIXELS // 10**6} million pixels; use --scale {int((MAX_PIXELS / unit) ** 0.5)} or less")
    norm = normalise_kernels(weight)
    tiles = np.rint(norm * 255).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((layout["height"], layout["width"], 3), 255, np.uint8)
    t = layout["tile"]
    for tile, (top, left) in zip(tiles, layout["origins"]):
        canvas[top:top + t, left:left + t] = tile
    return canvas, layout


def first_layer_weight(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The kernels that read the RGB image: `conv1.weight` (AlexNet, the CIFAR net), else the only
    (C, 3, k, k) tensor of an architecture that names its layers otherwise."""
    def rgb_kernels(t):
        return t.dim() == 4 and t.shape[1] == 3

    if "conv1.weight" in state and rgb_kernels(state["conv1.weight"]):
        return state["conv1.weight"]
    found = [t for name, t in state.items() if name.endswith("weight") and rgb_kernels(t)]
    return found[0] if len(found) == 1 else None


def write_kernels(ckpt_path, out, *, scale: int = 4) -> dict:
    """Figure 3 from a checkpoint, written to OUT (PNG)."""
    from alexcli.checkpoint import load_checkpoint

    out = check_png(out)
    ckpt = load_checkpoint(ckpt_path)
    weight = first_layer_weight(ckpt.model_state)
    if weight is None:
        raise DataError(f"{ckpt_path}: no first-layer kernels of shape (C, 3, k, k) in it (conv1.weight, or the "
                        f"only such tensor)")
    groups = int(ckpt.meta.get("arch", {}).get("groups", 1))
    groups = groups if weight.shape[0] % groups == 0 else 1
    canvas, layout = kernel_grid(weight, groups, scale)
    save_png(canvas, out)
    return {"out": str(out), "kernels": int(weight.shape[0]), "columns": groups,
            "kernel_size": [int(weight.shape[2]), int(weight.shape[3])], "scale": scale,
            "pixels": [layout["width"], layout["height"]], "normalisation": "min-max per kernel"}
