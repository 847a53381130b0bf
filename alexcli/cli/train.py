from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from alexcli.choices import Amp, Decode, Device, Parallel, ScheduleKind, ValSplit, comma_list
from alexcli.cli._ui import WORKERS_RULE, Reporter, emit_json, json_option, no_verify_option, out
from alexcli.model.arch import Arch as A
from alexcli.train.config import TrainConfig as C


def train_command(
    ctx: typer.Context,
    data: str = typer.Option(..., "--data", help="A prepared data set (alexcli prepare): a folder, or a URL of "
                                                  "one: https://host/in1k, s3://bucket/in1k (any fsspec URL, "
                                                  "with fsspec and its backend), or pipe:CMD with {} for each "
                                                  "file's name, e.g. 'pipe:aws s3 cp s3://bucket/in1k/{} -'; "
                                                  "shards are streamed and checked (docs/cluster.md)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run folder (default: runs/<name of --data>)."),
    epochs: int = typer.Option(C.epochs, min=1, help="Epochs to train (section 5: about 90); with --resume, the "
                                                      "new total (default: the run's)."),
    batch: int = typer.Option(C.batch, min=1, help="Images per SGD step over all GPUs (section 5: 128)."),
    lr: float = typer.Option(C.lr, min=0.0, help="Initial learning rate (section 5: 0.01)."),
    weight_decay: float = typer.Option(C.weight_decay, min=0.0, help="Weight decay (section 5: 0.0005)."),
    schedule: ScheduleKind = typer.Option(C.schedule, help="plateau: lr/10 when val error stops improving, at "
                                                           "most 3 times (the paper); steps: lr/10 after each of "
                                                           "--lr-steps; constant; cosine: from --lr towards 0 over "
                                                           "the run. All but plateau train without a val split."),
    warmup: int = typer.Option(C.warmup, min=0, help="Epochs of linear warm-up first: epoch e of W trains at "
                                                     "lr x e/(W+1)."),
    val_split: ValSplit = typer.Option(C.val_split, help="The split scored after each epoch (the plateau schedule "
                                                         "watches it); none: do not validate."),
    patience: int = typer.Option(C.patience, min=1, help="Epochs without val improvement before the plateau "
                                                         "schedule divides lr."),
    lr_steps: str = typer.Option("", help="Epochs after which --schedule steps divides lr by 10, e.g. 30,60,80 "
                                          "(default: after a third and two thirds of --epochs)."),
    augment: str = typer.Option(",".join(C.augment), help="Augmentations in order, by registry name (alexcli plugins)."),
    layer: List[str] = typer.Option([], "--layer", help="Layer variant KIND=NAME (activation or act, norm, pool), "
                                                       "repeatable: --layer norm=none --layer activation=tanh."),
    arch_name: str = typer.Option(A.name, "--arch", help="Architecture by registry name: alexnet (the paper's), "
                                                         "cifar-local (the four-layer CIFAR-10 net of Figure 1 "
                                                         "and section 3.3), or a plugin's (alexcli plugins)."),
    groups: Optional[int] = typer.Option(None, min=1, max=2, help="alexnet: 2 (default) the paper's two columns "
                                                                  "(groups on conv2/4/5); 1: one column."),
    width: float = typer.Option(A.width, min=0.0, max=4.0, help="Channel multiplier for small experiments, in (0, 4] (structure kept)."),
    crop: Optional[int] = typer.Option(None, min=1, help="Input side; alexnet: 224 (default; paper, conv1 padding 2) "
                                                         "or 227 (Caffe, padding 0); cifar-local: 24 (default) up "
                                                         "to the prepared size."),
    init: Optional[str] = typer.Option(None, help="Initialisation; alexnet: convnet2 (default; the paper's N(0, "
                                                  "0.01) and biases of 1 with std 0.03 in conv3-5, as Krizhevsky's "
                                                  "cuda-convnet2), paper (section 5 as written; stays at chance), "
                                                  "caffe (bvlc_alexnet's), kaiming (He normal, input scale 1); "
                                                  "stds scale with the layers' fan-in at other --width/--crop "
                                                  "(docs/design.md). cifar-local: convnet (default; cuda-convnet's "
                                                  "initW) or kaiming. Or a checkpoint to fine-tune from: its "
                                                  "architecture and every layer whose shape fits are taken, a "
                                                  "classifier for other classes is new."),
    conv6: bool = typer.Option(False, "--conv6", help="Add the sixth convolutional layer of the paper's "
                                                      "pre-trained models (section 6)."),
    dropout: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="alexnet: dropout in fc6 and fc7, in [0, 1) (default 0.5, "
                                                       "section 4.2)."),
    input_scale: Optional[float] = typer.Option(None, "--input-scale", min=0.0, max=1e4, help="Multiply the input (0..1 pixels "
                                                "minus the mean image) by this before conv1: 255 feeds the paper's "
                                                "raw pixel values, the scale its LRN constants act at. Default: the "
                                                "--init preset's (255; kaiming 1); cifar-local 255, as cuda-convnet."),
    seed: int = typer.Option(C.seed, help="Seed of initialisation, data order, augmentation and dropout."),
    device: Device = typer.Option(C.device, help="auto (CUDA when a GPU is visible), cpu or cuda."),
    gpus: int = typer.Option(C.gpus, min=1, help="Data-parallel processes (DistributedDataParallel; gloo on CPU)."),
    rank_devices: str = typer.Option("", "--rank-devices", show_default=False,
                                     help="Each rank's GPU with --gpus N (default cuda:0 to cuda:N-1), e.g. "
                                          "cuda:0,cuda:0 for two ranks on one GPU: they talk over gloo, as NCCL "
                                          "refuses that (to check the multi-GPU code on one GPU; slower)."),
    parallel: Parallel = typer.Option(C.parallel, help="data, or columns: the paper's split, one column per GPU "
                                                       "(2 GPUs)."),
    column_devices: str = typer.Option("", "--column-devices", show_default=False,
                                       help="The two columns' devices with --parallel columns (default cuda:0,cuda:1; "
                                            "cpu,cpu on the CPU), e.g. cuda:0,cuda:0 for both on one GPU."),
    amp: Amp = typer.Option(C.amp, help="none (fp32) or bf16 autocast."),
    channels_last: bool = typer.Option(C.channels_last, "--channels-last", help="Channels-last memory format "
                                                                                "(faster on GPUs)."),
    compile_: bool = typer.Option(C.compile, "--compile", help="torch.compile the model."),
    loader_workers: int = typer.Option(C.loader_workers, min=-1, show_default=False,
                                       help=f"Decoding processes per rank ({WORKERS_RULE})."),
    decode: Decode = typer.Option(C.decode, help="Where training JPEGs are decoded: cpu (pillow-simd in the loader "
                                                 "processes, the pixels prepare's statistics used) or device (nvJPEG "
                                                 "on the GPU; the loader only reads, for machines with few or slow "
                                                 "cores) or mixed (the first --decode-share of every batch on the "
                                                 "GPU, the rest in the loader)."),
    decode_share: Optional[float] = typer.Option(None, "--decode-share", show_default=False,
                                                 help=f"With --decode mixed: the part of every batch decoded on the "
                                                      f"GPU, its first round(share x batch) images (default "
                                                      f"{C.decode_share}; benchmarks/decode.py suggests one for a "
                                                      f"machine)."),
    keep: int = typer.Option(C.keep, min=0, help="Epoch checkpoints to keep besides the best."),
    steps_per_epoch: int = typer.Option(C.steps_per_epoch, min=0, help="Cap on steps per epoch (0: one pass over "
                                                                       "the training set)."),
    save_every: int = typer.Option(C.save_every, min=0, help="Steps between mid-epoch snapshots, so a stopped job "
                                                             "loses at most these (default: a quarter of an "
                                                             "ImageNet epoch at batch 128; 0: epoch ends only). "
                                                             "SIGTERM and Ctrl-C also save one before exiting."),
    chance_steps: int = typer.Option(C.chance_steps, min=0, help="Steps after which a run whose training loss "
                                                                 "is still ln(classes) is told so, with a hint "
                                                                 "(0: never)."),
    tensorboard: str = typer.Option(C.tensorboard, "--tensorboard", metavar="DIR", show_default=False,
                                    help="Also log to TensorBoard, in DIR: loss, lr and images/s at every progress "
                                         "update, each epoch's metrics and conv1's kernels, and the settings "
                                         "(HParams). auto: RUN/tensorboard, the run's own (it moves with the run; "
                                         "a fresh start or --overwrite clears it). An option cannot take an "
                                         "optional value, so the folder is always named: auto, or one per run "
                                         "such as tb/NAME to compare runs with tensorboard --logdir tb. Needs "
                                         "pip install 'alexcli[tensorboard]'. With --resume, '' stops logging."),
    no_verify: bool = no_verify_option(),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (from its last epoch or "
                                                        "snapshot) with the run's own settings; only --epochs, "
                                                        "--keep, --loader-workers, --save-every, --no-verify, "
                                                        "--device, --column-devices, --rank-devices, --chance-steps and "
                                                        "--tensorboard may differ."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in an --out that holds a run."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the network's shapes and parameter count, then stop."),
    as_json: bool = json_option(),
) -> None:
    """Train the paper's network on a prepared data set; one checkpoint per epoch.

    Writes RUN/ckpt-eNNN.safetensors (weights + everything eval needs), the trainer state for
    --resume, metrics.jsonl, curves.png and best.safetensors (the epoch with the lowest val top-1
    error: a hard link to its checkpoint; eval RUN scores it). Every default is the paper's (section 5) but the
    initialisation: convnet2, the paper's with Krizhevsky's own conv3-5 scales (docs/design.md).

    Examples:
      alexcli train --data shards/imagenet --out runs/alexnet --gpus 2
      alexcli train --data https://data.example.org/imagenet --out runs/alexnet --gpus 8
      alexcli train --data shards/imagenet --out runs/alexnet --resume
      alexcli train --data shards/imagenet --out runs/alexnet --resume --epochs 100
      alexcli train --data shards/imagenet --out runs/alexnet --tensorboard auto
      alexcli train --data shards/demo --out runs/small --width 0.25 --crop 64 --batch 32 --epochs 30
      alexcli train --data shards/cifar10 --arch cifar-local --epochs 30 --lr 0.001 --weight-decay 0
      alexcli train --data shards/birds --init runs/alexnet/ckpt-e090.safetensors --conv6 --lr 0.001
    """
    from dataclasses import replace

    from alexcli.errors import UsageError
    from alexcli.transforms import parse as parse_augment

    if decode_share is not None and decode != Decode.mixed and not resume:
        raise UsageError(f"--decode-share {decode_share}: it splits the batches of --decode mixed; add that")
    steps_like = "epochs like 30,60,80"
    try:
        steps = tuple(int(s) for s in comma_list(lr_steps, "--lr-steps", steps_like))
    except ValueError:
        raise UsageError(f"--lr-steps {lr_steps!r}: expected {steps_like}") from None
    from alexcli.data.remote import DataLocation

    out_dir = out_dir or Path("runs") / DataLocation(data).name
    cfg = C(data=data, out=str(out_dir), epochs=epochs, batch=batch, lr=lr, weight_decay=weight_decay,
            schedule=schedule, patience=patience, lr_steps=steps, warmup=warmup, val_split=val_split, augment=tuple(parse_augment(augment)), seed=seed,
            device=device, gpus=gpus, parallel=parallel, amp=amp, channels_last=channels_last, compile=compile_,
            column_devices=tuple(comma_list(column_devices, "--column-devices", "two devices like cuda:0,cuda:1")),
            rank_devices=tuple(comma_list(rank_devices, "--rank-devices", "one device per rank like cuda:0,cuda:1")),
            loader_workers=loader_workers, keep=keep, steps_per_epoch=steps_per_epoch, decode=decode,
            decode_share=C.decode_share if decode_share is None else decode_share,
            save_every=save_every, verify=not no_verify, chance_steps=chance_steps, tensorboard=tensorboard)
    arch, init_from = _arch(arch_name, init, crop=crop, width=width, groups=groups, dropout=dropout,
                            input_scale=input_scale, conv6=conv6, layer=layer)
    cfg = replace(cfg, init_from=init_from)
    if dry_run:  # every check a real run makes before it touches --out, then the network's shapes
        from alexcli.env import torchrun_world
        from alexcli.model.registry import check_init
        from alexcli.train.launch import check_crop
        from alexcli.train.loop import Data

        cfg.validate(torchrun_world())
        arch.validate()
        check_init(arch)  # the network's own settings first, then the data's
        checked = Data(replace(cfg, verify=False))  # the data set, --val-split, the schedule's need of val, --batch
        check_crop(arch, data)
        _dry_run(arch, len(checked.train.classes), as_json)
        return
    from alexcli.train.launch import train

    given = _given(ctx, cfg, arch, layer) if resume else None
    with Reporter() as report:
        summary = train(cfg, arch, resume=resume, overwrite=overwrite, given=given, progress=report)
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


# command-line parameter -> the TrainConfig or Arch field it sets (where the names differ)
_FIELD = {"compile_": "compile", "no_verify": "verify", "arch_name": "name"}
_NOT_SETTINGS = {"ctx", "data", "out_dir", "resume", "overwrite", "dry_run", "as_json", "layer", "init"}


def _given(ctx: typer.Context, cfg, arch, layer: list[str]) -> dict:
    """The settings this command line gives explicitly, as {field: value}: what --resume compares
    with the run's (an option left out keeps the run's value)."""
    given = {}
    for param in ctx.params:
        if param in _NOT_SETTINGS or ctx.get_parameter_source(param).name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        field = _FIELD.get(param, param)
        given[field] = getattr(cfg, field) if hasattr(cfg, field) else getattr(arch, field)
    if ctx.get_parameter_source("init").name not in ("DEFAULT", "DEFAULT_MAP"):
        given.update({"init_from": cfg.init_from} if cfg.init_from else {"init": arch.init})
    from alexcli.model.registry import LAYER_ALIASES

    for spec in layer:
        kind = spec.partition("=")[0].strip()
        kind = LAYER_ALIASES.get(kind, kind)
        if hasattr(arch, kind):
            given[kind] = getattr(arch, kind)
    return given


def _arch(name: str, init: Optional[str], *, conv6: bool, layer: list[str], **fields):
    """The Arch the options describe, and the checkpoint to fine-tune from ("" for none). With
    --init CKPT the architecture is the checkpoint's; only dropout and input scale may change."""
    from dataclasses import replace

    from alexcli.checkpoint import read_meta
    from alexcli.errors import UsageError
    from alexcli.model.registry import architecture, make_arch, with_layers

    inits = architecture(name).inits  # an unknown --arch fails here, naming the ones there are
    if init is not None and Path(init).is_file():  # fine-tuning: the architecture comes from the checkpoint
        arch = A.from_dict(read_meta(init)["arch"])
        arch = replace(arch, **{k: fields[k] for k in ("dropout", "input_scale") if fields[k] is not None})
        init_from = init
    elif init is None or init in inits:
        arch, init_from = make_arch(name, init=init, **fields), ""
    else:
        raise UsageError(f"--init {init!r}: neither a preset of {name} ({', '.join(inits)}) nor a checkpoint file")
    return with_layers(replace(arch, conv6=arch.conv6 or conv6), layer), init_from


def _dry_run(arch, num_classes: int, as_json: bool) -> None:
    from dataclasses import replace

    from alexcli.model.registry import build_model, count_parameters, describe, shapes

    arch = replace(arch, num_classes=num_classes)
    model, used = build_model(arch)
    info = {"arch": arch.to_dict(), "parameters": count_parameters(model), "shapes": shapes(model), "variants": used}
    if as_json:
        emit_json(info)
        return
    out.print(describe(arch))
    for name, shape in info["shapes"].items():
        out.print(f"  {name:<6} {' x '.join(map(str, shape[1:]))}")
    out.print(f"{info['parameters']:,} parameters")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
