from __future__ import annotations

from pathlib import Path

import typer

from alexcli.cli._ui import Reporter, emit_json, err, json_option, out

# The demo's network: the paper's structure at a quarter of its width on 64x64 crops of 72x72
# images (the ratio of 224 to 256), with alexcli's default initialisation (its stds scaled to the
# narrower layers, docs/design.md "Initialisation"). The demo's validation photos are few (200), so
# its figures are a smoke test of the tools, not results.
DEMO_SIZE, DEMO_CROP, DEMO_WIDTH, DEMO_BATCH = 72, 64, 0.25, 32


def demo_arch(num_classes: int):
    """The network both demo models train (every other field alexcli's default)."""
    from alexcli.model.registry import make_arch

    return make_arch("alexnet", num_classes=num_classes, crop=DEMO_CROP, width=DEMO_WIDTH)


def demo_train_config(data, out, seed: int, epochs: int):
    """One demo model's training run: batch 32, lr 0.01 divided by 10 after 2/3 of the epochs."""
    from alexcli.train.config import TrainConfig

    return TrainConfig(data=str(data), out=str(out), epochs=epochs, batch=DEMO_BATCH, seed=seed, schedule="steps",
                       lr_steps=(max(1, epochs * 2 // 3),), device="auto")


def demo_command(
    source: Path = typer.Option(Path("shards/demo-source"), help="Where the generated photos are written."),
    out_dir: Path = typer.Option(Path("shards/demo"), "--out", help="Where the prepared shards go."),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run", help="Where the two training runs and the pictures "
                                                               "go (replaced)."),
    per_class: int = typer.Option(100, min=1, help="Training images per class (8 classes; a quarter as many for val)."),
    epochs: int = typer.Option(30, min=1, help="Training epochs per model (the learning rate drops tenfold after 2/3)."),
    seed: int = typer.Option(0, help="Seed of the generated images and of the first model (the second: seed+1)."),
    workers: int = typer.Option(0, min=0, show_default=False, help="Processes converting images in prepare, this "
                                "one included (default 0: one per core)."),
    as_json: bool = json_option(),
) -> None:
    """Run alexcli end to end on a built-in data set drawn on the spot (no download).

    Draws 8 classes of photo-like images in ImageNet's folder layout (a few of them grayscale,
    CMYK, PNG or broken on purpose), prepares them into shards at 72x72, trains the paper's
    network twice (two seeds) at a quarter width on 64x64 crops, evaluates the first with ten
    patches, ensembles the two (Table 2), and draws the conv1 kernels (Figure 3) and the top-5
    predictions of a few validation photos (Figure 4). About 75 seconds on 2 idle CPU cores.

    Example: alexcli demo --epochs 10
    """
    from alexcli.cli.eval import render
    from alexcli.cli.prepare import render_summary
    from alexcli.data.dataset import open_split
    from alexcli.data.demo import CLASSES, make_demo
    from alexcli.data.prepare import PrepareConfig, prepare
    from alexcli.evaluate import score
    from alexcli.figures.kernels import write_kernels
    from alexcli.figures.predict import draw_predictions, predict
    from alexcli.model.registry import describe
    from alexcli.train.launch import train

    say = (lambda *a, **k: None) if as_json else out.print
    if not (source / "train").is_dir():
        err.print(f"drawing the demo photos into {source} ...")
        make_demo(source, train_per_class=per_class, val_per_class=max(1, per_class // 4), seed=seed)
    cfg = PrepareConfig(size=DEMO_SIZE, workers=workers, shard_size=100, overwrite=True)
    with Reporter(quiet=as_json) as report:
        prepared = prepare(source, out_dir, cfg, progress=report)
    if not as_json:
        render_summary(prepared)

    arch = demo_arch(len(CLASSES))
    runs = []
    for k in range(2):
        tcfg = demo_train_config(out_dir, run_dir / f"seed{seed + k}", seed + k, epochs)
        say(f"\nmodel {k + 1} of 2: {describe(arch)}, seed {seed + k} -> {tcfg.out}", soft_wrap=True)
        with Reporter(quiet=as_json) as report:
            runs.append(train(tcfg, arch, overwrite=True, progress=report))
    ckpts = [r["checkpoint"] for r in runs]

    val = open_split(out_dir, "val")
    ten = score(ckpts[:1], val, crops="ten", batch=64)
    table2 = score(ckpts, val, crops="center", batch=64)
    kernels = write_kernels(ckpts[0], run_dir / "kernels.png")
    photos = sorted(p for c in CLASSES[:4] for p in list((source / "val" / c).glob("*.JPEG"))[:1])
    result, pixels = predict(ckpts[0], photos)
    draw_predictions(result, pixels, run_dir / "predictions.png")
    if as_json:
        emit_json({"prepare": prepared, "train": runs, "eval_ten": ten, "ensemble": table2, "kernels": kernels,
                   "predictions": result})
        return
    say("")
    render(ten, per_class=False)
    render(table2, per_class=False)
    chance = 1 - 1 / len(CLASSES)
    first = ten["models"][0]
    say(f"\nvalidation top-1 error {first['top1_error']:.1%} with ten patches (chance: {chance:.1%}); "
        f"two models averaged: {table2['ensemble']['top1_error']:.1%} (centre patch)", soft_wrap=True)
    say(f"pictures: {run_dir / 'kernels.png'} (conv1 kernels, Figure 3), {run_dir / 'predictions.png'} "
        f"(top-5 of {len(photos)} val photos, Figure 4)", soft_wrap=True)
    say("next: alexcli prepare /data/imagenet && alexcli train --data shards/imagenet", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
