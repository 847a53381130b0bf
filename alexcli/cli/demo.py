from __future__ import annotations

from pathlib import Path

import typer

from alexcli.cli._ui import emit_json, err, out, progress

# The demo's network: the paper's structure at a quarter of its width on 64x64 crops of 72x72
# images (the ratio of 224 to 256), with He initialisation: the paper's N(0, 0.01) start sits
# at chance for a long time on a net this small (see README, "Initialisation").
DEMO_SIZE, DEMO_CROP, DEMO_WIDTH = 72, 64, 0.25


def demo_command(
    source: Path = typer.Option(Path("shards/demo-source"), help="Where the generated photos are written."),
    out_dir: Path = typer.Option(Path("shards/demo"), "--out", help="Where the prepared shards go."),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run", help="Where the training run goes (replaced)."),
    per_class: int = typer.Option(100, help="Training images per class (8 classes; a quarter as many for val)."),
    epochs: int = typer.Option(30, help="Training epochs (the learning rate drops tenfold after 2/3 of them)."),
    seed: int = typer.Option(0, help="Seed of the generated images and of training."),
    workers: int = typer.Option(0, help="Worker processes for prepare [default: all cores]."),
    as_json: bool = typer.Option(False, "--json", help="Print the summaries as JSON on stdout."),
) -> None:
    """Run alexcli end to end on a built-in data set drawn on the spot (no download).

    Draws 8 classes of photo-like images in ImageNet's folder layout (a few of them grayscale,
    CMYK, PNG or broken on purpose), prepares them into shards at 72x72, then trains the
    paper's network at a quarter width on 64x64 crops and reports its validation error.
    About a minute on 2 CPU cores.

    Example: alexcli demo --epochs 10
    """
    from alexcli.cli.prepare import render_summary
    from alexcli.cli.train import TrainView
    from alexcli.data.demo import CLASSES, make_demo
    from alexcli.data.prepare import PrepareConfig, prepare
    from alexcli.model.alexnet import Arch
    from alexcli.train.config import TrainConfig
    from alexcli.train.loop import describe, train

    if not (source / "train").is_dir():
        err.print(f"drawing the demo photos into {source} ...")
        make_demo(source, train_per_class=per_class, val_per_class=max(1, per_class // 4), seed=seed)
    cfg = PrepareConfig(size=DEMO_SIZE, workers=workers, shard_size=100, overwrite=True)
    with progress("prepare demo") as update:
        prepared = prepare(source, out_dir, cfg, progress=update)
    if not as_json:
        render_summary(prepared)
    arch = Arch(num_classes=len(CLASSES), crop=DEMO_CROP, width=DEMO_WIDTH, init="kaiming")
    tcfg = TrainConfig(data=str(out_dir), out=str(run_dir), epochs=epochs, batch=32, seed=seed,
                       schedule="steps", lr_steps=(max(1, epochs * 2 // 3),), device="auto")
    if not as_json:
        out.print(f"\ntraining {describe(arch)} into {run_dir}", soft_wrap=True)
    view = TrainView(quiet=as_json)
    try:
        trained = train(tcfg, arch, overwrite=True, progress=view)
    finally:
        view.close()
    if as_json:
        emit_json({"prepare": prepared, "train": trained})
        return
    last = trained["last"]
    chance = 1 - 1 / len(CLASSES)
    out.print(f"\nvalidation top-1 error {last['val_top1_error']:.1%} (chance: {chance:.1%}), "
              f"top-5 {last['val_top5_error']:.1%}; checkpoint {trained['checkpoint']}", soft_wrap=True)
    out.print(f"next: alexcli prepare /data/imagenet && alexcli train --data shards/imagenet")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
