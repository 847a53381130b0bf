"""`alexcli kernels`: the first layer's kernels as one picture (Figure 3), a row block per column,
under a title strip naming the checkpoint and, with two columns, a label above each block.

No numpy or torch at import: the command line reads AUTO_SCALE and MIN_WIDTH from here."""

from __future__ import annotations

from pathlib import Path

from alexcli.errors import DataError, UsageError
from alexcli.figures.plot import check_png, save_png

KERNELS_PER_ROW = 16     # Figure 3 shows each column's 48 kernels as 3 rows of 16
AUTO_SCALE = 0           # --scale 0 (the default): the smallest scale making the picture MIN_WIDTH wide
MIN_WIDTH = 800          # pixels; the demo's 24 kernels of 11x11 at --scale 4 were 580 wide, too small to see
MAX_PIXELS = 64_000_000  # a 192 MB RGB picture; the paper's Figure 3 at --scale 4 is 0.2 million


def normalise_kernels(weight):
    """(C, 3, k, k) weights -> (C, k, k, 3) floats in 0..1, each kernel min-max scaled on its own
    (a kernel whose weights are all equal becomes mid grey)."""
    import numpy as np

    w = weight.detach().float().cpu().numpy()
    lo = w.reshape(len(w), -1).min(1)[:, None, None, None]
    hi = w.reshape(len(w), -1).max(1)[:, None, None, None]
    span = hi - lo
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    return norm.transpose(0, 2, 3, 1)


def column_label(g: int, groups: int) -> str:
    """The label above column G's block: the paper's Figure 3 learned the upper block on GPU 1."""
    return f"column {g} (GPU {g + 1} in the paper)" if groups == 2 else f"column {g}"


def kernel_layout(count: int, groups: int, size: int, scale: int, per_row: int = KERNELS_PER_ROW, *,
                  text: bool = True) -> dict:
    """Where each kernel goes. Each column's COUNT/GROUPS kernels fill rows of PER_ROW (fewer when
    a column has fewer); tiles are SIZE*SCALE pixels with SCALE pixels of white between and
    around them, and a column's block starts 4*SCALE pixels below the previous one. With TEXT, a
    title strip of TITLE pixels heads the picture and, with more than one column, a label strip of
    LABEL pixels sits above each block (their font sizes grow with the width).
    Returns {"width", "height", "tile", "origins": [(top, left) per kernel], "per_row", "rows",
    "title", "label", "labels": [top of each block's label strip], "fonts": [title, label] px}."""
    per_col = count // groups
    across = min(per_row, per_col)
    down = -(-per_col // across)
    tile, pad, gap = size * scale, scale, 4 * scale
    block_h = down * tile + (down + 1) * pad
    width = across * tile + (across + 1) * pad
    title_font = max(9, min(18, width // 50)) if text else 0
    label_font = round(title_font * 0.8) if text and groups > 1 else 0
    title_h, label_h = 2 * title_font, round(1.7 * label_font)
    height = title_h + groups * (label_h + block_h) + (groups - 1) * gap
    labels = [title_h + g * (label_h + block_h + gap) for g in range(groups)] if label_h else []
    origins = []
    for i in range(count):
        g, j = divmod(i, per_col)
        r, c = divmod(j, across)
        block_top = title_h + g * (label_h + block_h + gap) + label_h
        origins.append((block_top + pad + r * (tile + pad), pad + c * (tile + pad)))
    return {"width": width, "height": height, "tile": tile, "origins": origins, "per_row": across, "rows": down,
            "title": title_h, "label": label_h, "labels": labels, "fonts": [title_font, label_font]}


def _pixels(count: int, groups: int, size: int, scale: int, text: bool = True) -> int:
    layout = kernel_layout(count, groups, size, scale, text=text)
    return layout["width"] * layout["height"]


def auto_scale(count: int, groups: int, size: int, min_width: int = MIN_WIDTH) -> int:
    """The smallest integer scale whose picture is at least MIN_WIDTH pixels wide (the width grows
    linearly with the scale), but no larger than keeps it within MAX_PIXELS; at least 1."""
    unit = kernel_layout(count, groups, size, 1, text=False)["width"]
    scale = max(1, -(-min_width // unit))
    while scale > 1 and _pixels(count, groups, size, scale) > MAX_PIXELS:
        scale -= 1
    return scale


def _font(px: int, bold: bool):
    """DejaVu Sans (matplotlib's own font, so it is always there) at PX pixels."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), px)
    except (ImportError, OSError):
        return ImageFont.load_default(px)


def _strip(text: str, width: int, height: int, px: int, *, bold: bool, centre: bool, left: int):
    """A HEIGHT x WIDTH white strip with TEXT in black, vertically centred; the font shrinks (to 8
    px) and then the text is cut short with an ellipsis until it fits."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    room = width - 2 * left
    font = _font(px, bold)
    while px > 8 and draw.textlength(text, font=font) > room:
        px -= 1
        font = _font(px, bold)
    while len(text) > 1 and draw.textlength(text, font=font) > room:
        text = text[:-2] + "\u2026"
    if centre:
        draw.text((width / 2, height / 2), text, fill="black", font=font, anchor="mm")
    else:
        draw.text((left, height / 2), text, fill="black", font=font, anchor="lm")
    return np.asarray(img)


def kernel_grid(weight, groups: int, scale: int | None = None, title: str | None = None):
    """conv1 WEIGHT (C, 3, k, k) -> an RGB uint8 picture (H, W, 3) and its layout: each kernel
    min-max normalised on its own and enlarged SCALE times (nearest neighbour; None or 0: the
    automatic scale, `auto_scale`), the first C/2 kernels (column 0) above the other C/2 (column 1)
    when GROUPS is 2. With TITLE, a title strip above and a label above each column's block; the
    layout's "scale" is the scale used."""
    import numpy as np

    count, _, size, _ = weight.shape
    if scale is None or scale == AUTO_SCALE:
        scale = auto_scale(count, groups, size)
    if scale < 1:
        raise UsageError(f"--scale must be at least 1 (or {AUTO_SCALE} for the automatic scale), not {scale}")
    text = title is not None
    layout = kernel_layout(count, groups, size, scale, text=text)
    pixels = layout["width"] * layout["height"]
    if pixels > MAX_PIXELS:
        unit = pixels / scale ** 2  # the picture grows about with the square of the scale
        most = max(1, int((MAX_PIXELS / unit) ** 0.5))
        while most > 1 and _pixels(count, groups, size, most, text) > MAX_PIXELS:
            most -= 1
        raise UsageError(f"--scale {scale} makes a {layout['width']} x {layout['height']} picture, more than "
                         f"{MAX_PIXELS // 10**6} million pixels; use --scale {most} or less")
    norm = normalise_kernels(weight)
    tiles = np.rint(norm * 255).astype(np.uint8).repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((layout["height"], layout["width"], 3), 255, np.uint8)
    t = layout["tile"]
    for tile, (top, left) in zip(tiles, layout["origins"]):
        canvas[top:top + t, left:left + t] = tile
    width, (title_px, label_px) = layout["width"], layout["fonts"]
    if text:  # each strip drawn on its own and pasted in: no text pixel can touch a tile
        canvas[:layout["title"]] = _strip(title, width, layout["title"], title_px, bold=True, centre=True,
                                          left=scale)
        for g, top in enumerate(layout["labels"]):
            canvas[top:top + layout["label"]] = _strip(column_label(g, groups), width, layout["label"], label_px,
                                                       bold=False, centre=False, left=scale)
    return canvas, dict(layout, scale=scale)


def first_layer_weight(state: dict):
    """The kernels that read the RGB image: `conv1.weight` (AlexNet, the CIFAR net), else the only
    (C, 3, k, k) tensor of an architecture that names its layers otherwise."""
    def rgb_kernels(t):
        return t.dim() == 4 and t.shape[1] == 3

    if "conv1.weight" in state and rgb_kernels(state["conv1.weight"]):
        return state["conv1.weight"]
    found = [t for name, t in state.items() if name.endswith("weight") and rgb_kernels(t)]
    return found[0] if len(found) == 1 else None


def kernels_title(ckpt_path, meta: dict, count: int, size: tuple[int, int], groups: int) -> str:
    """The title strip: the checkpoint's file name, its epoch when its metadata has one, and what
    the picture shows."""
    epoch = meta.get("epoch")
    where = Path(ckpt_path).name + (f", epoch {epoch}" if epoch is not None else "")
    columns = f"{groups} columns, " if groups > 1 else ""
    return f"{where}: {count} first-layer kernels of {size[0]}x{size[1]} ({columns}min-max per kernel)"


def write_kernels(ckpt_path, out, *, scale: int | None = None) -> dict:
    """Figure 3 from a checkpoint, written to OUT (PNG); SCALE None or 0: `auto_scale`."""
    from alexcli.checkpoint import load_checkpoint

    out = check_png(out)
    ckpt = load_checkpoint(ckpt_path)
    weight = first_layer_weight(ckpt.model_state)
    if weight is None:
        raise DataError(f"{ckpt_path}: no first-layer kernels of shape (C, 3, k, k) in it (conv1.weight, or the "
                        f"only such tensor)")
    groups = int(ckpt.meta.get("arch", {}).get("groups", 1))
    groups = groups if weight.shape[0] % groups == 0 else 1
    size = (int(weight.shape[2]), int(weight.shape[3]))
    title = kernels_title(ckpt_path, ckpt.meta, int(weight.shape[0]), size, groups)
    canvas, layout = kernel_grid(weight, groups, scale, title)
    save_png(canvas, out)
    return {"out": str(out), "kernels": int(weight.shape[0]), "columns": groups,
            "kernel_size": list(size), "scale": layout["scale"],
            "pixels": [layout["width"], layout["height"]], "normalisation": "min-max per kernel",
            "title": title}
