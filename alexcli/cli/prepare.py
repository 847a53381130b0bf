from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from alexcli.choices import Resample
from alexcli.cli._ui import Reporter, emit_json, json_option, out
from alexcli.data.config import MAX_SIZE, PrepareConfig as P


def render_summary(s: dict) -> None:
    table = Table(title=f"{s['out']}  ({s['status']}, {s['classes']} classes)", title_justify="left")
    for col in ("split", "found", "written", "rejected", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, v in s["splits"].items():
        table.add_row(split, f"{v['found']:,}", f"{v['written']:,}", f"{v['rejected']:,}", str(v["shards"]))
    out.print(table)
    out.print(f"{s['found']:,} found = {s['written']:,} written + {s['rejected']:,} rejected"
              + (f" (reasons in {s['rejected_file']})" if s["rejected"] else ""))
    for note in s.get("notes", []):
        out.print(f"note: {note}")
    rate = f", {s['images_per_s']:,.0f} images/s" if s.get("images_per_s") else ""
    pil = s["pil"]
    out.print(f"{s['seconds']:.1f} s{rate}; PIL: {pil['package']} {pil['version']}")


def prepare_command(
    src: Path = typer.Argument(..., help="Source tree: SRC/train/<class>/<image>, optionally SRC/val and SRC/test."),
    out_dir: Path = typer.Option(None, "--out", help="Output folder (default: shards/<name of SRC>)."),
    size: int = typer.Option(P.size, min=8, max=MAX_SIZE, help="Side of the square images written (section 2: 256). A JPEG "
                                                 "that is already RGB and size x size is copied unchanged (CIFAR at "
                                                 "--size 32)."),
    quality: int = typer.Option(P.quality, min=1, max=100, help="JPEG quality of the written images."),
    resample: Resample = typer.Option(P.resample, help="Resize filter."),
    seed: int = typer.Option(P.seed, help="Seed of the shuffle of training samples across shards."),
    shard_size: int = typer.Option(P.shard_size, min=1, help="Samples per shard."),
    workers: int = typer.Option(P.workers, min=0, help="Worker processes (0: all cores)."),
    holdout: float = typer.Option(P.holdout, min=0, max=1, help="Hold out this fraction (0 to 1) of each class of train/ as the "
                                                  "val split (for a source without val/, e.g. CIFAR-10's training "
                                                  "folder)."),
    max_pixels: int = typer.Option(P.max_pixels, min=1, help="Reject sources with more pixels than this."),
    strict: bool = typer.Option(False, "--strict", help="Fail if any file has to be rejected."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different data set in --out."),
    as_json: bool = json_option(),
) -> None:
    """Resize images to SIZE x SIZE, compute the mean image and RGB PCA, write WebDataset shards.

    Each image is rescaled so its shorter side is --size and the central square is kept
    (the paper's section 2). Files that cannot be used are listed in rejected.json with the
    reason. Interrupted, the same command continues where it stopped.

    Examples:
      alexcli prepare /data/imagenet --out shards/imagenet --workers 16
      alexcli prepare /data/cifar10 --size 32 --holdout 0.1 --out shards/cifar10
    """
    from alexcli.data.prepare import prepare

    out_dir = out_dir or Path("shards") / Path(src).resolve().name
    cfg = P(size=size, quality=quality, resample=resample, max_pixels=max_pixels, seed=seed, shard_size=shard_size,
            workers=workers, holdout=holdout, strict=strict, overwrite=overwrite)
    with Reporter() as report:
        summary = prepare(src, out_dir, cfg, progress=report)
    if as_json:
        emit_json(summary)
    else:
        render_summary(summary)


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare_command)
