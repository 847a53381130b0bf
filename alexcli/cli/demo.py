from __future__ import annotations

from pathlib import Path

import typer

from alexcli.cli._ui import emit_json, err, out, progress


def demo_command(
    source: Path = typer.Option(Path("shards/demo-source"), help="Where the generated photos are written."),
    out_dir: Path = typer.Option(Path("shards/demo"), "--out", help="Where the prepared shards go."),
    per_class: int = typer.Option(40, help="Training images per class (8 classes; a quarter as many for val)."),
    size: int = typer.Option(64, help="Side of the prepared images (small, so the demo runs in seconds)."),
    seed: int = typer.Option(0, help="Seed of the generated images."),
    workers: int = typer.Option(0, help="Worker processes for prepare [default: all cores]."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Run alexcli end to end on a built-in data set drawn on the spot (no download).

    Draws 8 classes of photo-like images in ImageNet's folder layout, a few of them grayscale,
    CMYK, PNG or broken on purpose, then prepares them into shards.

    Example: alexcli demo --per-class 100
    """
    from alexcli.cli.prepare import render_summary
    from alexcli.data.demo import make_demo
    from alexcli.data.prepare import PrepareConfig, prepare

    if not (source / "train").is_dir():
        err.print(f"drawing the demo photos into {source} ...")
        make_demo(source, train_per_class=per_class, val_per_class=max(1, per_class // 4), seed=seed)
    cfg = PrepareConfig(size=size, workers=workers, shard_size=100, overwrite=True)
    with progress("prepare demo") as update:
        summary = prepare(source, out_dir, cfg, progress=update)
    if as_json:
        emit_json({"prepare": summary})
    else:
        render_summary(summary)
        out.print(f"\nnext: alexcli prepare /data/imagenet   (the same on real data)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
