"""`alexcli predict`: the most probable labels of any image, and Figure 4 (left).

A user's image goes through exactly what `alexcli prepare` does to a source file (shorter side
scaled to the data size, central square kept, written as JPEG and decoded again), then through
what `alexcli eval` does (mean image, centre crop or ten patches).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alexcli import defaults
from alexcli.choices import Crops, choice
from alexcli.errors import DataError, UsageError
from alexcli.figures.plot import check_png, percent, pyplot, save_figure, short


def image_params(meta: dict):
    """How prepare converted the checkpoint's training images: its data set's parameters when that
    folder is still here, else prepare's defaults at the checkpoint's image size."""
    from alexcli.data.dataset import read_manifest
    from alexcli.data.config import ImageParams

    data = meta.get("data", {})
    params = {}
    folder = data.get("folder")
    if folder:
        try:
            params = read_manifest(folder).get("parameters", {})
        except DataError:
            params = {}
    size = int(data.get("size") or params.get("size") or ImageParams.size)
    return ImageParams(size=size, quality=int(params.get("quality", ImageParams.quality)),
                       resample=params.get("resample", ImageParams.resample),
                       max_pixels=int(params.get("max_pixels", ImageParams.max_pixels)))


def load_image(path, params) -> torch.Tensor:
    """Any image file -> uint8 (3, S, S): the pixels the network would see had prepare written it."""
    from alexcli.data.image import Reject, convert, read_source
    from alexcli.data.stream import decode_batch

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not an image")
    try:
        data = read_source(path)  # a regular file only, with prepare's size limit: a FIFO or /dev/zero never hangs
        jpg, _ = convert(data, params)
    except Reject as exc:
        raise DataError(f"{path}: {exc}") from None
    return decode_batch([jpg])[0].contiguous()  # decoded as the training loader decodes


def load_images(paths: Sequence, params) -> torch.Tensor:
    """All of PATHS as one uint8 batch; the first unusable file is an error naming it."""
    if not paths:
        raise UsageError("give at least one image")
    return torch.stack([load_image(p, params) for p in paths])


def true_label(path, classes: list[str]) -> int | None:
    """The class an image's folder names, as in ImageNet's layout (.../n01440764/x.JPEG); else None."""
    parent = Path(path).resolve().parent.name
    return classes.index(parent) if parent in classes else None


def predict(ckpt_path, images: Sequence, *, crops: str = "center", top: int = defaults.PREDICT_TOP,
            device="cpu") -> tuple[dict, torch.Tensor]:
    """The TOP most probable classes of each image. Returns (result, uint8 images (N, 3, S, S))."""
    from alexcli.checkpoint import read_meta
    from alexcli.data.dataset import class_names
    from alexcli.evaluate import load_scored, model_probs
    from alexcli.transforms import to_float

    crops = choice(Crops, crops, "--crops")
    if top < 1:
        raise UsageError(f"--top must be at least 1, not {top}")
    dev = torch.device(device)
    meta = read_meta(ckpt_path)
    pixels = load_images(images, image_params(meta))  # every file checked before the model is loaded
    scored = load_scored(ckpt_path, dev)
    names = class_names(scored.meta)
    probs = model_probs(scored.model, to_float(pixels.to(dev)), scored.mean_image, scored.crop, crops).cpu()
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    rows = []
    for path, p, v, i in zip(images, probs, values.tolist(), indices.tolist()):
        label = true_label(path, scored.classes)
        rows.append({
            "image": str(path),
            "label": None if label is None else {"index": label, "class": scored.classes[label], "name": names[label],
                                                 "probability": float(p[label]), "rank": int((p > p[label]).sum()) + 1},
            "top": [{"index": c, "class": scored.classes[c], "name": names[c], "probability": pr}
                    for pr, c in zip(v, i)],
        })
    return {"checkpoint": str(ckpt_path), "crops": crops.value, "size": int(pixels.shape[-1]), "images": rows}, pixels


def draw_predictions(result: dict, pixels: torch.Tensor, out) -> Path:
    """Figure 4 (left): each image with its top-k probabilities as bars beneath it. The bar of the
    image's own class (when its folder names one) is red, as in the paper; the others blue."""
    out = check_png(out)
    plt = pyplot()
    n = len(result["images"])
    cols = min(n, 4)
    rows = -(-n // cols)
    k = max(len(r["top"]) for r in result["images"])
    fig = plt.figure(figsize=(2.5 * cols, 3.7 * rows))
    outer = fig.add_gridspec(rows, cols, hspace=0.16, wspace=0.15, left=0.03, right=0.97,
                             top=1 - 0.3 / (3.7 * rows), bottom=0.02)
    for j, (row, img) in enumerate(zip(result["images"], pixels)):
        r, c = divmod(j, cols)
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[2.2, 0.22 * k + 0.2], hspace=0.12)
        ax = fig.add_subplot(cell[0])
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(short(Path(row["image"]).name, 28), fontsize=8)
        if row["label"] is not None:
            ax.set_xlabel(short(row["label"]["name"], 30), fontsize=9, fontweight="bold")
        bars = fig.add_subplot(cell[1])
        top = row["top"]
        truth = row["label"]["index"] if row["label"] is not None else None
        y = np.arange(len(top))
        colours = ["#d7301f" if t["index"] == truth else "#9ecae1" for t in top]
        bars.barh(y, [t["probability"] for t in top], color=colours, height=0.8)
        for yy, t in zip(y, top):
            bars.text(0.01, yy, f"{short(t['name'], 26)}  {percent(t['probability'])}", va="center", ha="left",
                      fontsize=7)
        bars.set_xlim(0, 1)
        bars.set_ylim(len(top) - 0.5, -0.5)
        bars.set_xticks([])
        bars.set_yticks([])
    return save_figure(fig, out)
