from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli import defaults
from alexcli.choices import Amp, Crops, Device, Split
from alexcli.cli._ui import (Reporter, no_verify_option, amp_option, ckpt_argument, crops_option, data_folder, data_option,
                             device_option, emit_json, json_option, out, split_option, workers_option)


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


def render(result: dict, per_class: bool) -> None:
    """One table shaped like the paper's Table 2: each model, then their average."""
    from rich.table import Table

    split = result["split"]
    table = Table(title=f"{result['data']}  {split}, {result['images']:,} images, "
                        f"{'ten patches' if result['crops'] == 'ten' else 'centre crop'}", title_justify="left")
    table.add_column("model")
    table.add_column(f"top-1 ({split})", justify="right")
    table.add_column(f"top-5 ({split})", justify="right")
    for m in result["models"]:
        table.add_row(f"{m['path']} (epoch {m['epoch']})", f"{m['top1_error']:.2%}", f"{m['top5_error']:.2%}")
    if result["ensemble"]:
        e = result["ensemble"]
        table.add_row(f"[bold]{len(result['models'])} CNNs averaged[/bold]", f"[bold]{e['top1_error']:.2%}",
                      f"[bold]{e['top5_error']:.2%}")
    out.print(table)
    if per_class:
        rows = (result["ensemble"] or result["models"][0])["per_class"]
        pc = Table(title="top-1 error per class (worst first)", title_justify="left")
        for col in ("class", "images", "top-1 error"):
            pc.add_column(col, justify="left" if col == "class" else "right")
        for r in sorted(rows, key=lambda r: -(r["top1_error"] or 0)):
            err = "-" if r["top1_error"] is None else f"{r['top1_error']:.1%}"
            pc.add_row(result["classes"][r["class"]], str(r["images"]), err)
        out.print(pc)


def _show(result: dict, per_class: bool, as_json: bool) -> None:
    if not as_json:
        render(result, per_class)
        return
    if not per_class:
        for m in result["models"] + ([result["ensemble"]] if result["ensemble"] else []):
            m.pop("per_class", None)
    emit_json(result)


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
    no_verify: bool = no_verify_option(),
    as_json: bool = json_option(),
) -> None:
    """Top-1 and top-5 error of a checkpoint, as the paper reports them (section 6).

    The network is rebuilt from the checkpoint's metadata alone, with the mean image it was
    trained with. Each shard of the split is checked against its sha256 in dataset.json before
    its first use (remembered afterwards; --no-verify skips the check). With --data URL each shard
    is streamed and checked as it arrives (docs/cluster.md).

    Examples:
      alexcli eval runs/alexnet/ckpt-e090.safetensors --data shards/imagenet --crops ten
      alexcli eval runs/alexnet/ckpt-e090.safetensors --data https://data.example.org/imagenet
    """
    _show(_run([ckpt], data, split, crops, batch, workers, device, amp, no_verify), per_class, as_json)


def ensemble_command(
    ckpts: List[Path] = typer.Argument(..., help="Checkpoints to average (their class lists must match)."),
    data: Optional[str] = data_option("the first one's"),
    split: Split = split_option(defaults.EVAL_SPLIT, "The split to score."),
    crops: Crops = crops_option(),
    batch: int = typer.Option(defaults.BATCH, min=1, help="Images per batch (x10 patches with --crops ten)."),
    workers: int = workers_option(),
    device: Device = device_option(),
    amp: Amp = amp_option(),
    per_class: bool = typer.Option(False, "--per-class", help="Also show the ensemble's error per class."),
    no_verify: bool = no_verify_option(),
    as_json: bool = json_option(),
) -> None:
    """Each model's error and the error of their averaged softmax, as the paper's Table 2.

    Every batch is decoded once and scored by all the models; memory grows only by their weights.
    The split's shards are checked against dataset.json as for `alexcli eval`.

    Example: alexcli ensemble runs/a/ckpt-e090.safetensors runs/b/ckpt-e090.safetensors --data shards/imagenet
    """
    _show(_run(list(ckpts), data, split, crops, batch, workers, device, amp, no_verify), per_class, as_json)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("ensemble")(ensemble_command)
