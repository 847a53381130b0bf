from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli import defaults
from alexcli.choices import Amp, Crops, Device, Split
from alexcli.cli._ui import (Reporter, no_verify_option, amp_option, checkpoints, ckpt_argument, crops_option, data_folder,
                             data_option, device_option, emit_json, json_option, last_option, out, split_option,
                             workers_option)
from alexcli.figures.plot import check_png  # no matplotlib until a picture is drawn


def _run(ckpts: list[Path], data: Optional[str], split: Split, crops: Crops, batch: int, workers: int, device: Device,
         amp: Amp, no_verify: bool) -> dict:
    import torch

    from alexcli.checkpoint import read_meta
    from alexcli.data import stream
    from alexcli.data.dataset import open_split
    from alexcli.env import autocast_for, device_name
    from alexcli.evaluate import score

    dev = torch.device(device_name(device))
    for c in ckpts:  # a damaged checkpoint is one line before any shard is hashed (neighbors does the same)
        read_meta(c)
    folder = data_folder(data, ckpts[0])
    with Reporter() as report:
        sp = open_split(folder, split, verify=not no_verify, progress=report)
        return score([str(c) for c in ckpts], sp, crops=crops, batch=batch, device=dev,
                     workers=stream.loader_workers(sp, 1, dev.type, workers), autocast=autocast_for(amp, dev),
                     progress=report)


_CROPS = {"center": "centre crop", "ten": "ten patches"}  # how the tables and the picture name --crops


def _scored(result: dict) -> dict:
    """The result the per-class table and the confusion matrix show: the ensemble's, or the model's."""
    return result["ensemble"] or result["models"][0]


def _class_label(result: dict, i: int) -> str:
    name, cid = result["class_names"][i], result["classes"][i]
    return name if name == cid else f"{name} ({cid})"


def render(result: dict, per_class: bool, confusion: Optional[Path] = None) -> None:
    """One table shaped like the paper's Table 2: each model, then their average; with PER_CLASS
    each class's top-1 error, worst first; with CONFUSION the classes most often taken for others."""
    from rich.table import Table

    split = result["split"]
    table = Table(title=f"{result['data']}  {split}, {result['images']:,} images, {_CROPS[result['crops']]}",
                  title_justify="left")
    table.add_column("model")
    table.add_column(f"top-1 error ({split})", justify="right")  # the paper's Table 2 reports errors too
    table.add_column(f"top-5 error ({split})", justify="right")
    for m in result["models"]:
        table.add_row(f"{m['path']} (epoch {m['epoch']})", f"{m['top1_error']:.2%}", f"{m['top5_error']:.2%}")
    if result["ensemble"]:
        e = result["ensemble"]
        table.add_row(f"[bold]{len(result['models'])} CNNs averaged[/bold]", f"[bold]{e['top1_error']:.2%}",
                      f"[bold]{e['top5_error']:.2%}")
    out.print(table)
    if per_class:
        pc = Table(title="top-1 error per class (worst first)", title_justify="left")
        for col in ("class", "images", "top-1 error"):
            pc.add_column(col, justify="left" if col == "class" else "right")
        for r in sorted(_scored(result)["per_class"], key=lambda r: -(r["top1_error"] or 0)):
            err = "-" if r["top1_error"] is None else f"{r['top1_error']:.1%}"
            pc.add_row(_class_label(result, r["class"]), str(r["images"]), err)
        out.print(pc)
    if confusion is not None:
        from alexcli.evaluate import most_confused

        matrix = _scored(result)["confusion"]
        pairs = most_confused(matrix)
        if pairs:
            mc = Table(title="most confused (true class -> top-1 prediction)", title_justify="left")
            for col in ("true class", "predicted", "images", "of the class"):
                mc.add_column(col, justify="left" if col in ("true class", "predicted") else "right")
            for t, p, n in pairs:
                mc.add_row(_class_label(result, t), _class_label(result, p), str(n), f"{n / sum(matrix[t]):.1%}")
            out.print(mc)
        out.print(f"wrote {result['confusion_out']}", soft_wrap=True)


def _show(result: dict, per_class: bool, as_json: bool, confusion: Optional[Path] = None) -> None:
    """Draw the confusion matrix (with CONFUSION), then the tables or the JSON: per-class errors and
    the matrix only when asked for (--per-class or --confusion: the matrix of 1,000 classes is a
    million numbers)."""
    if confusion is not None:
        from alexcli.figures.confusion import write_confusion

        scored = _scored(result)
        who = f"{len(result['models'])} CNNs averaged" if result["ensemble"] else result["models"][0]["path"]
        title = (f"{who}\n{result['data']} {result['split']}, {result['images']:,} images, "
                 f"{_CROPS[result['crops']]}: top-1 error {scored['top1_error']:.2%}")
        result["confusion_out"] = str(write_confusion(scored["confusion"], result["class_names"], title, confusion))
    if not as_json:
        render(result, per_class, confusion)
        return
    if not (per_class or confusion is not None):
        for m in result["models"] + ([result["ensemble"]] if result["ensemble"] else []):
            m.pop("per_class", None)
            m.pop("confusion", None)
    emit_json(result)


def confusion_option():
    return typer.Option(None, "--confusion", help="Also draw the confusion matrix (rows: true class, columns: "
                                                  "top-1 prediction; the ensemble's for several models) into this "
                                                  "PNG, list the most confused pairs, and put the matrix in --json.")


def eval_command(
    ckpt: Path = ckpt_argument(),
    data: Optional[str] = data_option(),
    split: Split = split_option(defaults.EVAL_SPLIT, "The split to score."),
    crops: Crops = crops_option(),
    batch: int = typer.Option(defaults.BATCH, min=1, help="Images per batch (x10 patches with --crops ten)."),
    workers: int = workers_option(),
    device: Device = device_option(),
    amp: Amp = amp_option(),
    per_class: bool = typer.Option(False, "--per-class", help="Also show each class's top-1 error."),
    confusion: Optional[Path] = confusion_option(),
    last: bool = last_option(),
    no_verify: bool = no_verify_option(),
    as_json: bool = json_option(),
) -> None:
    """Top-1 and top-5 error of a checkpoint, as the paper reports them (section 6).

    The network is rebuilt from the checkpoint's metadata alone, with the mean image it was
    trained with. Each shard of the split is checked against its sha256 in dataset.json before
    its first use (remembered afterwards; --no-verify skips the check). With --data URL each shard
    is streamed and checked as it arrives (docs/cluster.md).

    Given a run folder, it scores the run's best.safetensors (the epoch with the lowest val top-1
    error), or with --last its latest epoch; the table names the file.

    Examples:
      alexcli eval runs/demo/seed0 --crops ten --confusion runs/demo/confusion.png
      alexcli eval runs/alexnet/ckpt-e090.safetensors --data shards/imagenet --crops ten
      alexcli eval runs/alexnet --last --data https://data.example.org/imagenet
    """
    confusion = check_png(confusion, "--confusion") if confusion is not None else None  # before any scoring
    _show(_run(checkpoints([ckpt], last), data, split, crops, batch, workers, device, amp, no_verify), per_class, as_json,
          confusion)


def ensemble_command(
    ckpts: List[Path] = typer.Argument(..., help="Checkpoints to average (their class lists must match), or run "
                                                 "folders: each one's best.safetensors (--last: its latest)."),
    data: Optional[str] = data_option("the first one's"),
    split: Split = split_option(defaults.EVAL_SPLIT, "The split to score."),
    crops: Crops = crops_option(),
    batch: int = typer.Option(defaults.BATCH, min=1, help="Images per batch (x10 patches with --crops ten)."),
    workers: int = workers_option(),
    device: Device = device_option(),
    amp: Amp = amp_option(),
    per_class: bool = typer.Option(False, "--per-class", help="Also show the ensemble's error per class."),
    confusion: Optional[Path] = confusion_option(),
    last: bool = last_option(),
    no_verify: bool = no_verify_option(),
    as_json: bool = json_option(),
) -> None:
    """Each model's error and the error of their averaged softmax, as the paper's Table 2.

    Every batch is decoded once and scored by all the models; memory grows only by their weights.
    The split's shards are checked against dataset.json as for `alexcli eval`.

    Example: alexcli ensemble runs/a/ckpt-e090.safetensors runs/b/ckpt-e090.safetensors --data shards/imagenet
    """
    confusion = check_png(confusion, "--confusion") if confusion is not None else None
    _show(_run(checkpoints(ckpts, last), data, split, crops, batch, workers, device, amp, no_verify), per_class, as_json,
          confusion)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("ensemble")(ensemble_command)
