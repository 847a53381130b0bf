"""`alexcli predict`, `kernels` and `neighbors`: the paper's qualitative results (section 6.1)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli import defaults
from alexcli.choices import Crops, Device, Split
from alexcli.cli._ui import (Reporter, no_verify_option, checkpoints, ckpt_argument, crops_option, data_folder, data_option,
                             device_option, emit_json, err, json_option, last_option, out, split_option, workers_option)
from alexcli.figures.kernels import AUTO_SCALE, MIN_WIDTH  # no numpy or torch: --help stays fast


def predict_command(
    ckpt: Path = ckpt_argument(),
    images: List[Path] = typer.Argument(..., help="Image files in any format Pillow reads."),
    crops: Crops = crops_option(),
    top: int = typer.Option(defaults.PREDICT_TOP, min=1, help="How many of the most probable classes to show."),
    fig: Optional[Path] = typer.Option(None, "--out", help="Also draw the images with their top probabilities "
                                                           "as bars (Figure 4, left) into this PNG."),
    device: Device = device_option(),
    last: bool = last_option(),
    as_json: bool = json_option(),
) -> None:
    """The most probable classes of any image, with their probabilities (Figure 4, left).

    Each image is resized and cropped exactly as `alexcli prepare` does it (shorter side to the
    checkpoint's image size, the central square, JPEG), then fed as `alexcli eval` does (mean image
    subtracted, centre crop or ten patches). When an image sits in a folder named after one of the
    classes (ImageNet's layout), that class is shown as its label and its bar drawn red.

    Example: alexcli predict runs/demo/seed0 shards/demo-source/val/ring/ring_0003.JPEG --out runs/demo/predictions.png
    """
    from alexcli.env import device_name
    from alexcli.figures.plot import percent
    from alexcli.figures.predict import draw_predictions, predict

    [ckpt] = checkpoints([ckpt], last)
    result, pixels = predict(ckpt, [str(i) for i in images], crops=crops, top=top, device=device_name(device))
    if fig is not None:
        result["out"] = str(draw_predictions(result, pixels, fig))
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    for row in result["images"]:
        label = row["label"]
        title = row["image"] + (f"  (its folder names class {label['name']}: rank {label['rank']})" if label else "")
        out.print(f"[bold]{title}[/bold]", soft_wrap=True)
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("class")
        table.add_column("probability", justify="right")
        for i, t in enumerate(row["top"], 1):
            name = f"[bold]{t['name']}[/bold]" if label and t["index"] == label["index"] else t["name"]
            table.add_row(str(i), name, percent(t["probability"]))
        out.print(table)
    if fig is not None:
        out.print(f"wrote {result['out']}", soft_wrap=True)


def kernels_command(
    ckpt: Path = ckpt_argument(),
    fig: Path = typer.Option(..., "--out", help="The PNG to write."),
    scale: int = typer.Option(AUTO_SCALE, min=0, show_default=False,
                              help=f"Each kernel pixel becomes SCALE x SCALE pixels (nearest neighbour); default "
                                   f"{AUTO_SCALE}: the smallest scale that makes the picture at least {MIN_WIDTH} "
                                   "pixels wide."),
    last: bool = last_option(),
    as_json: bool = json_option(),
) -> None:
    """The first layer's kernels as one picture (Figure 3).

    Each kernel's RGB weights are min-max normalised on their own (its lowest weight black, its
    highest white, as is customary; absolute scales differ between kernels and are not shown), then
    enlarged. With the paper's two columns (--groups 2), the kernels of column 0 (the first half of
    conv1's outputs; the paper's GPU 1) form the upper block and those of column 1 the lower one,
    in rows of 16, each block labelled. A title strip names the checkpoint and its epoch.

    Example: alexcli kernels runs/demo/seed0 --out runs/demo/kernels.png
    """
    from alexcli.figures.kernels import write_kernels

    [ckpt] = checkpoints([ckpt], last)
    result = write_kernels(ckpt, fig, scale=scale)
    if as_json:
        emit_json({k: result[k] for k in ("out", "kernels", "columns", "kernel_size")}
                  | {k: result[k] for k in ("scale", "pixels", "normalisation")})
        return
    h, w = result["kernel_size"]
    blocks = f"{result['columns']} column blocks" if result["columns"] > 1 else "one block"
    out.print(f"wrote {result['out']}: {result['kernels']} kernels of {h}x{w}, {blocks}, "
              f"{result['pixels'][0]}x{result['pixels'][1]} pixels at --scale {result['scale']} "
              f"(min-max per kernel)", soft_wrap=True)


def neighbors_command(
    ckpt: Path = ckpt_argument(),
    images: List[Path] = typer.Argument(..., help="Query image files in any format Pillow reads."),
    data: Optional[str] = data_option(),
    fig: Optional[Path] = typer.Option(None, "--out", help="Draw each query and its neighbours (Figure 4, right) "
                                                           "into this PNG."),
    k: int = typer.Option(defaults.NEIGHBORS_K, "--k", min=1, help="Neighbours per query."),
    split: Split = split_option(defaults.NEIGHBORS_SPLIT, "The split to search."),
    cache: Optional[Path] = typer.Option(None, help="Where the split's codes are cached "
                                                    "(default: features-<checkpoint>-<split>.safetensors beside it)."),
    batch: int = typer.Option(defaults.BATCH, min=1, help="Images per batch while computing the codes."),
    workers: int = workers_option(),
    device: Device = device_option(),
    last: bool = last_option(),
    no_verify: bool = no_verify_option(),
    as_json: bool = json_option(),
) -> None:
    """The training images nearest to each query in the last hidden layer (Figure 4, right).

    Distance is Euclidean between the codes of the architecture's last hidden layer (AlexNet:
    fc7 after its ReLU, 4096 numbers at full width; the CIFAR net: local4), taken from the centre
    crop with the network in eval mode. The training set's codes are computed once and cached
    beside the checkpoint, as float16 to halve the space (the queries' codes are rounded the same
    way); the cache is recomputed when the checkpoint or the data set changes. Each neighbour is
    named by its source file as prepare recorded it (relative to the source tree); a query that
    sits in a folder named after one of the classes gets that class as its label, as in predict.

    Example: alexcli neighbors runs/demo/seed0 shards/demo-source/val/waves/waves_0002.JPEG --data shards/demo --out runs/demo/neighbors.png
    """
    from alexcli.env import device_name
    from alexcli.figures.neighbors import draw_neighbors, neighbors

    [ckpt] = checkpoints([ckpt], last)
    folder = data_folder(data, ckpt)
    with Reporter() as report:
        result, queries, pictures = neighbors(ckpt, [str(i) for i in images], folder, split=split, k=k,
                                              device=device_name(device), batch=batch, workers=workers, cache=cache,
                                              verify=not no_verify, progress=report)
    if result["features"]["reused"]:
        err.print(f"codes of {result['features']['images']:,} {split} images from {result['features']['cache']}",
                  soft_wrap=True)
    if fig is not None:
        result["out"] = str(draw_neighbors(result, queries, pictures, fig))
    if as_json:
        emit_json(result)
        return
    from rich.table import Table

    for row in result["queries"]:
        label = row["label"]
        named = f" (its folder names class {label['name']})" if label else ""
        out.print(f"[bold]{row['image']}[/bold]{named}: nearest {split} images", soft_wrap=True)
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("class")
        table.add_column("distance", justify="right")
        table.add_column("source file")
        for i, n in enumerate(row["neighbors"], 1):
            name = f"[bold]{n['name']}[/bold]" if label and n["index"] == label["index"] else n["name"]
            table.add_row(str(i), name, f"{n['distance']:.3f}", n["source"] or f"{n['shard']}:{n['key']}")
        out.print(table)
    if fig is not None:
        out.print(f"wrote {result['out']}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
    app.command("kernels")(kernels_command)
    app.command("neighbors")(neighbors_command)
