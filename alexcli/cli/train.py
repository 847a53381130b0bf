from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli.cli._ui import emit_json, err, out


class TrainView:
    """The progress bar (loss, images/s, ETA) and one line per finished epoch, on stderr."""

    def __init__(self, quiet: bool = False):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                            TextColumn("eta"), TimeRemainingColumn(), TimeElapsedColumn(),
                            console=err, disable=quiet)
        self.task = None
        self.epochs = 0
        self.quiet = quiet

    def __call__(self, event: str, *args, **kw) -> None:
        if event == "start":
            info = args[0]
            self.epochs = info["epochs"]
            if not self.quiet:
                err.print(f"training on {info['device']} x{info['world']}, {info['parameters']:,} parameters, "
                          f"batch {info['batch']}, {info['steps']} steps/epoch, "
                          f"{info['loader_workers']} loader worker(s) per rank"
                          + (f"; resuming after epoch {info['start']}" if info["start"] else ""), soft_wrap=True)
            self.bar.start()
        elif event == "init_from":
            t = args[0]
            err.print(f"--init {t['path']}: loaded {len(t['loaded'])} tensors; re-initialised "
                      f"{', '.join(t['reinitialised']) or 'none'}"
                      + (f"; not used: {', '.join(t['unused'])}" if t["unused"] else ""), soft_wrap=True)
        elif event == "epoch":
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(f"epoch {kw['epoch']}/{self.epochs}", total=kw["steps"], loss="-", rate="")
        elif event == "step":
            t = self.bar.tasks[self.bar.task_ids.index(self.task)]
            elapsed = t.elapsed or 1e-9
            self.bar.update(self.task, completed=kw["n"], loss=f"{kw['loss']:.3f}",
                            rate=f"{kw['images'] / elapsed:,.0f} img/s")
        elif event == "epoch_end":
            m = kw["metrics"]
            val = (f"val top-1 {m['val_top1_error']:.1%} top-5 {m['val_top5_error']:.1%}"
                   if m["val_top1_error"] is not None else "no val split")
            line = (f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  train err {m['train_top1_error']:.1%}  "
                    f"{val}  lr {m['lr']:g}  {m['images_per_s']:,.0f} img/s  {m['seconds']:.1f} s")
            if kw.get("lr_dropped"):
                line += f"  -> lr {kw['new_lr']:g}"
            self.bar.console.print(line, soft_wrap=True)

    def close(self) -> None:
        self.bar.stop()


def train_command(
    data: Path = typer.Option(..., "--data", help="A prepared data set (alexcli prepare)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<name of --data>)."),
    epochs: int = typer.Option(90, help="Epochs to train (section 5: about 90); with --resume, the new total."),
    batch: int = typer.Option(128, help="Images per SGD step over all GPUs (section 5: 128)."),
    lr: float = typer.Option(0.01, help="Initial learning rate (section 5: 0.01)."),
    weight_decay: float = typer.Option(0.0005, help="Weight decay (section 5: 0.0005)."),
    schedule: str = typer.Option("plateau", help="plateau: lr/10 when val error stops improving, at most 3 times "
                                                 "(the paper); steps: lr/10 at --lr-steps."),
    patience: int = typer.Option(3, help="Epochs without val improvement before the plateau schedule divides lr."),
    lr_steps: str = typer.Option("", help="Epochs after which lr is divided by 10 with --schedule steps, e.g. 30,60,80."),
    augment: str = typer.Option("mean,crop,flip,pca", help="Augmentations in order, by registry name (alexcli plugins)."),
    layer: List[str] = typer.Option([], "--layer", help="Layer variant KIND=NAME (act, norm, pool), repeatable: "
                                                       "--layer norm=none --layer act=tanh."),
    arch_name: str = typer.Option("alexnet", "--arch", help="Architecture by registry name: alexnet (the paper's), "
                                                           "cifar-local (the four-layer CIFAR-10 net of Figure 1 "
                                                           "and section 3.3), or a plugin's (alexcli plugins)."),
    groups: Optional[int] = typer.Option(None, help="alexnet: 2 (default) the paper's two columns (groups on "
                                                    "conv2/4/5); 1: one column."),
    width: float = typer.Option(1.0, help="Channel multiplier for small experiments (structure kept)."),
    crop: Optional[int] = typer.Option(None, help="Input side; alexnet: 224 (default; paper, conv1 padding 2) or "
                                                  "227 (Caffe, padding 0); cifar-local: 24 (default) up to the "
                                                  "prepared size."),
    init: Optional[str] = typer.Option(None, help="Initialisation; alexnet: paper (default; N(0,0.01), biases 1), "
                                                  "caffe (biases 0.1, fc6/7 std 0.005), kaiming (He normal; leaves "
                                                  "the flat start at once); cifar-local: convnet (default; "
                                                  "cuda-convnet's initW) or kaiming. Or a checkpoint to fine-tune "
                                                  "from: its architecture and every layer whose shape fits are "
                                                  "taken, a classifier for other classes is new."),
    conv6: bool = typer.Option(False, "--conv6", help="Add the sixth convolutional layer of the paper's "
                                                      "pre-trained models (section 6)."),
    dropout: Optional[float] = typer.Option(None, help="alexnet: dropout in fc6 and fc7 (default 0.5, section 4.2)."),
    input_scale: Optional[float] = typer.Option(None, "--input-scale", help="Multiply the input (0..1 pixels "
                                                "minus the mean image) by this before conv1: 255 feeds the paper's "
                                                "raw pixel values, the scale its LRN constants act at. alexnet: 1 "
                                                "(default), cifar-local: 255 (default, as cuda-convnet)."),
    seed: int = typer.Option(0, help="Seed of initialisation, data order, augmentation and dropout."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda."),
    gpus: int = typer.Option(1, help="Data-parallel processes (DistributedDataParallel; gloo on CPU)."),
    parallel: str = typer.Option("data", help="data, or columns: the paper's split, one column per GPU (2 GPUs)."),
    amp: str = typer.Option("none", help="none or bf16 (autocast)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format (faster on GPUs)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    loader_workers: int = typer.Option(-1, help="Decoding processes per rank (default: on a GPU all cores but one per rank up to 8, on the CPU a quarter of them; at most one per shard)."),
    decode: str = typer.Option("cpu", help="Where training JPEGs are decoded: cpu (pillow-simd in the loader "
                                           "processes, the pixels prepare's statistics used) or device (nvJPEG "
                                           "on the GPU; the loader only reads, for machines with few or slow cores)."),
    keep: int = typer.Option(3, help="Epoch checkpoints to keep besides the best."),
    steps_per_epoch: int = typer.Option(0, help="Cap on steps per epoch (0: one pass over the training set)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out up to --epochs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in an --out that holds a run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the network's shapes and parameter count, then stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON on stdout."),
) -> None:
    """Train the paper's network on a prepared data set; one checkpoint per epoch.

    Writes RUN/ckpt-eNNN.safetensors (weights + everything eval needs), the trainer state for
    --resume, metrics.jsonl and curves.png. Every default is the paper's (section 5).

    Examples:
      alexcli train --data shards/imagenet --out runs/alexnet --gpus 2
      alexcli train --data shards/imagenet --out runs/alexnet --resume --epochs 100
      alexcli train --data shards/demo --width 0.25 --crop 64 --init kaiming --layer norm=none
      alexcli train --data shards/cifar10 --arch cifar-local --epochs 30 --lr 0.001 --weight-decay 0
      alexcli train --data shards/birds --init runs/alexnet/ckpt-e090.safetensors --conv6 --lr 0.001
    """
    from alexcli import plugins
    from alexcli.model.alexnet import Arch, build_model, count_parameters, make_arch, shapes, with_layers
    from alexcli.train.config import TrainConfig
    from alexcli.train.loop import describe, train
    from alexcli.errors import UsageError

    try:
        steps = tuple(int(s) for s in lr_steps.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--lr-steps {lr_steps!r}: expected epochs like 30,60,80") from None
    from alexcli.augment import parse as parse_augment

    out_dir = out_dir or Path("runs") / Path(data).resolve().name
    cfg = TrainConfig(data=str(data), out=str(out_dir), epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay,
                      schedule=schedule, patience=patience, lr_steps=steps, augment=tuple(parse_augment(augment)), seed=seed,
                      device=device, gpus=gpus, parallel=parallel, amp=amp, channels_last=channels_last,
                      compile=compile_, loader_workers=loader_workers, keep=keep, steps_per_epoch=steps_per_epoch,
                      decode=decode)
    from dataclasses import replace as _replace

    init_from = ""
    inits = getattr(plugins.get("architecture", arch_name), "inits", ())  # an unknown --arch fails here
    if init is not None and Path(init).is_file():  # fine-tuning: the architecture comes from the checkpoint
        from alexcli.train.checkpoint import read_meta

        init_from = init
        arch = Arch.from_dict(read_meta(init)["arch"])
        if dropout is not None:
            arch = _replace(arch, dropout=dropout)
        if input_scale is not None:
            arch = _replace(arch, input_scale=input_scale)
    elif init is None or init in inits or not inits:
        arch = make_arch(arch_name, crop=crop, width=width, groups=groups, init=init, dropout=dropout,
                         input_scale=input_scale)
    else:
        raise UsageError(f"--init {init!r}: neither a preset of {arch_name} ({', '.join(inits)}) nor a checkpoint file")
    arch = with_layers(_replace(arch, conv6=arch.conv6 or conv6), layer)
    cfg = _replace(cfg, init_from=init_from)
    if dry_run:
        from dataclasses import replace

        from alexcli.train.loader import open_split

        arch = replace(arch, num_classes=len(open_split(data, "train").classes))
        model, used = build_model(arch)
        info = {"arch": arch.to_dict(), "parameters": count_parameters(model), "shapes": shapes(model),
                "variants": used}
        if as_json:
            emit_json(info)
        else:
            out.print(describe(arch))
            for name, shape in info["shapes"].items():
                out.print(f"  {name:<6} {' x '.join(map(str, shape[1:]))}")
            out.print(f"{info['parameters']:,} parameters")
        return
    view = TrainView(quiet=False)
    try:
        summary = train(cfg, arch, resume=resume, overwrite=overwrite, progress=view)
    finally:
        view.close()
    if summary.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return
    if as_json:
        emit_json(summary)
        return
    last = summary["last"]
    out.print(f"{summary['out']}: trained to epoch {summary['epochs']}; last checkpoint {summary['checkpoint']}")
    if last and last["val_top1_error"] is not None:
        out.print(f"val top-1 error {last['val_top1_error']:.1%}, top-5 {last['val_top5_error']:.1%} "
                  f"(best top-1 {summary['best_val_top1_error']:.1%} at epoch {summary['best_epoch']})")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
