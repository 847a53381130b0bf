from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli.cli._ui import data_folder as _data_folder, device_name as _device, emit_json, out, progress


def _run(ckpts: list[Path], data: Optional[Path], split: str, crops: str, batch: int, workers: int, device: str,
         amp: str) -> dict:
    import torch

    from alexcli.errors import UsageError
    from alexcli.evaluate import score
    from alexcli.train import loader

    if not ckpts:
        raise UsageError("give at least one checkpoint")
    if amp not in ("none", "bf16"):
        raise UsageError(f"--amp must be none or bf16, not {amp!r}")
    dev = _device(device)
    sp = loader.open_split(_data_folder(data, ckpts[0]), split)
    if workers < 0:
        workers = loader.auto_workers(sp, 1, max(0, (torch.get_num_threads() if dev == "cpu" else 8) // 4))
    autocast = (lambda: torch.autocast(device_type=dev, dtype=torch.bfloat16)) if amp == "bf16" else None
    with progress(f"{'ensemble' if len(ckpts) > 1 else 'eval'} {split}") as update:
        return score([str(c) for c in ckpts], sp, crops=crops, batch=batch, workers=workers, device=dev,
                     autocast=autocast, progress=update)


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


def _strip_per_class(result: dict, keep: bool) -> dict:
    if not keep:
        for m in result["models"] + ([result["ensemble"]] if result["ensemble"] else []):
            m.pop("per_class", None)
    return result


def eval_command(
    ckpt: Path = typer.Argument(..., help="A checkpoint (ckpt-eNNN.safetensors) from alexcli train."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data set (default: the one it was trained on)."),
    split: str = typer.Option("val", help="Split to score: val, test or train."),
    crops: str = typer.Option("center", help="center: the central 224 patch; ten: the four corners, the centre "
                                             "and their reflections, softmax averaged (section 4.1)."),
    batch: int = typer.Option(128, help="Images per batch (x10 patches with --crops ten)."),
    workers: int = typer.Option(-1, help="Decoding processes (default: a quarter of the cores, one per shard)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: str = typer.Option("none", help="none or bf16."),
    per_class: bool = typer.Option(False, "--per-class", help="Also show each class's top-1 error."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Top-1 and top-5 error of a checkpoint, as the paper reports them (section 6).

    The network is rebuilt from the checkpoint's metadata alone, with the mean image it was
    trained with.

    Example: alexcli eval runs/alexnet/ckpt-e090.safetensors --data shards/imagenet --crops ten
    """
    result = _run([ckpt], data, split, crops, batch, workers, device, amp)
    if as_json:
        emit_json(_strip_per_class(result, per_class))
    else:
        render(result, per_class)


def ensemble_command(
    ckpts: List[Path] = typer.Argument(..., help="Checkpoints to average (their class lists must match)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared data set (default: the first one's)."),
    split: str = typer.Option("val", help="Split to score."),
    crops: str = typer.Option("center", help="center or ten (section 4.1)."),
    batch: int = typer.Option(128, help="Images per batch."),
    workers: int = typer.Option(-1, help="Decoding processes (default: a quarter of the cores, one per shard)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    amp: str = typer.Option("none", help="none or bf16."),
    per_class: bool = typer.Option(False, "--per-class", help="Also show the ensemble's error per class."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Each model's error and the error of their averaged softmax, as the paper's Table 2.

    Every batch is decoded once and scored by all the models; memory grows only by their weights.

    Example: alexcli ensemble runs/a/ckpt-e090.safetensors runs/b/ckpt-e090.safetensors --data shards/imagenet
    """
    result = _run(list(ckpts), data, split, crops, batch, workers, device, amp)
    if as_json:
        emit_json(_strip_per_class(result, per_class))
    else:
        render(result, per_class)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("ensemble")(ensemble_command)
