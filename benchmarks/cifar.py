"""Benchmark: one CIFAR-10 epoch of the four-layer net (alexcli experiment), and where its time goes.

One process, the same data, the same net and device for every row, each after a warm-up:

  in-memory epoch   alexcli.experiment.fit.Fit.train_epoch: a permutation, one gather per batch
                    from the uint8 tensor in memory, then the Fit's step (alexcli.train.step.TrainStep:
                    to float, the augmentations, forward, backward, SGD)
  model only        the same number of TrainStep.update calls (forward + backward + SGD) on inputs
                    TrainStep.inputs made beforehand: the arithmetic alone
  streaming epoch   alexcli.train.step.train_epoch with the same step, fed by `alexcli train`'s shard
                    stream (alexcli.data.stream.batches: JPEGs decoded again every epoch; --workers
                    processes, 0 = in the main process): the baseline

It prints each epoch's time scaled to the full training split, the share of the in-memory epoch
spent outside the model's forward and backward (1 - model only / in-memory), and how many times
faster the in-memory epoch is than the streaming one.

Data: --data DIR (alexcli prepare SRC --size 32 --holdout 0.1), else the CIFAR-10 archive that
$ALEXCLI_CIFAR_TAR names (train/<class>/*.jpg, .tar.gz), prepared into a temporary folder the same
way (not timed); with neither it stops with a one-line error.

  ALEXCLI_CIFAR_TAR=/path/to/cifar10-train.tar.gz .venv/bin/python benchmarks/cifar.py   # Figure 1's net
  .venv/bin/python benchmarks/cifar.py --data shards/cifar10  # relu, no normalisation, 32x32 (Figure 1's net)
  .venv/bin/python benchmarks/cifar.py --variant lrn          # the lrn experiment's net: LRN, 24x24 crops, flips
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from _data import CIFAR_ENV, cpu_model, source_tree, torch_device  # noqa: E402  (benchmarks/_data.py)

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli.data import dataset, stream  # noqa: E402
from alexcli.env import cpu_cores  # noqa: E402
from alexcli.data.memory import load_split  # noqa: E402
from alexcli.experiment.fit import Fit  # noqa: E402
from alexcli.experiment.plans import ExperimentConfig, plans  # noqa: E402
from alexcli.model.registry import make_arch  # noqa: E402
from alexcli.train.step import train_epoch  # noqa: E402


def prepared_cifar(tmp: Path) -> Path:
    """The CIFAR-10 archive $ALEXCLI_CIFAR_TAR names, extracted and prepared at 32x32 (not timed)."""
    src, why = source_tree(None, CIFAR_ENV, "--data", tmp)
    if src is None:
        sys.exit(f"error: {why}: give --data DIR (a prepared CIFAR-10) or set ${CIFAR_ENV} to the CIFAR-10 "
                 f"archive (train/<class>/*.jpg, .tar.gz)")
    from alexcli.data.prepare import PrepareConfig, prepare

    print(f"data: {why}; preparing it at 32x32 (not timed) ...", file=sys.stderr, flush=True)
    out = tmp / "cifar10"
    prepare(src, out, PrepareConfig(size=32, holdout=0.1, shard_size=5000))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def lrn_backward_ratio(device, repeat: int = 10) -> tuple[float, float]:
    """ms per forward + backward of the built-in LRN on conv1's maps of a 24-crop batch of 128:
    autograd through the formula (the GPU path) and the hand-written CPU backward."""
    from alexcli.model.layers import _LRNFunction, lrn_paper

    lrn = lrn_paper(64)
    x = (torch.randn(128, 64, 24, 24, device=device) * 20).requires_grad_()
    g = torch.randn_like(x)
    band = lrn._band(64, 1, x)

    def formula():
        y = x * (F.conv2d(x * x, band) * lrn.alpha + lrn.k).pow(-lrn.beta)
        y.backward(g)

    def ours():
        _LRNFunction.apply(x, band, lrn.alpha, lrn.beta, lrn.k).backward(g)

    out = []
    for fn in (formula, ours):
        fn()
        out.append(min(timed(lambda: [fn() for _ in range(repeat)]) for _ in range(2)) / repeat * 1000)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared CIFAR-10 (size 32) [default: the archive "
                                              f"${CIFAR_ENV} names, prepared]")
    ap.add_argument("--variant", choices=("relu", "tanh", "lrn"), default="relu")
    ap.add_argument("--images", type=int, default=5000, help="training images per timed epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="streaming loader's decode processes")
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds (best of)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cpu-tuning", choices=("tuned", "default"), default="tuned",
                    help="tuned: alexcli.env.tune_cpu() as `alexcli experiment` does on the CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch_device(args.device)
    if args.cpu_tuning == "tuned":
        from alexcli.env import tune_cpu

        tune_cpu()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepared_cifar(Path(tmp))
        full = dataset.open_split(data, "train").samples
        train = load_split(data, "train", limit=args.images).to(device)
        stats = dataset.load_stats(data)
        cfg = ExperimentConfig(data=str(data), out=tmp, batch=args.batch)
        name = "lrn" if args.variant == "lrn" else "relu-vs-tanh"
        plan = next(p for p in plans(name, cfg, 24 if name == "lrn" else 32) if p.label in (args.variant, "lrn"))
        arch = make_arch("cifar-local", num_classes=len(train.classes), **plan.arch_fields)
        fit = Fit(plan, arch, train, None, stats, lr=0.001, epochs=1, seed=0, batch=args.batch, momentum=0.9,
                  device=device)
        steps = -(-len(train) // args.batch)
        quiet = lambda *a, **k: None  # noqa: E731

        step = fit.step  # alexcli.train.step.TrainStep: the step `alexcli experiment` and `alexcli train` run

        # the arithmetic alone: the same steps on inputs made beforehand (to float, augmented, cropped)
        g = torch.Generator().manual_seed(0)
        made = []
        with torch.no_grad():
            for i in range(steps):
                idx = torch.arange(i * args.batch, min(len(train), (i + 1) * args.batch), device=device)
                made.append((step.inputs(train.images[idx], g), train.labels[idx]))

        def model_only():
            fit.net.train()
            for x, y in made:
                step.update(x, y)

        split = dataset.open_split(data, "train")

        def streaming():
            batches = stream.batches(split, args.batch, train=True, workers=args.workers, seed=0, epoch=1,
                                     limit=steps, pin=device.type == "cuda")
            train_epoch(step, batches, g, device, steps=steps, logged=quiet)

        rows = {"in-memory epoch": lambda: fit.train_epoch(1, steps, quiet), "model only": model_only,
                "streaming epoch": streaming}
        best = {k: float("inf") for k in rows}
        for k, fn in rows.items():  # warm-up
            fn()
        for _ in range(args.repeat):  # interleaved rounds: drift on a shared machine hits every row alike
            for k, fn in rows.items():
                best[k] = min(best[k], timed(fn))

    scale = full / len(train)
    outside = 1 - best["model only"] / best["in-memory epoch"]
    ratio = best["streaming epoch"] / best["in-memory epoch"]
    result = {"variant": args.variant, "crop": arch.crop, "images_timed": len(train), "train_images": full,
              "batch": args.batch, "device": device.type,
              "machine": f"{cpu_model()}, {cpu_cores()} cores" + (
                  f", {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""),
              "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
              "cpu_tuning": args.cpu_tuning,
              "epoch_seconds": {k: v * scale for k, v in best.items()},
              "images_per_s": {k: len(train) / v for k, v in best.items()},
              "share_outside_model": outside, "streaming_over_memory": ratio}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['machine']}; torch {result['torch']}, {result['threads']} threads, cpu tuning "
          f"{args.cpu_tuning}; {args.variant} net, crop {arch.crop}, batch {args.batch}, "
          f"{len(train):,} images per timed epoch (best of {args.repeat})")
    for k in rows:
        print(f"  {k:<16} {result['epoch_seconds'][k]:7.1f} s per {full:,}-image epoch  "
              f"{result['images_per_s'][k]:8,.0f} img/s")
    print(f"share of the in-memory epoch outside the model's forward/backward: {outside:.1%}")
    print(f"in-memory epoch vs streaming ({args.workers} workers): {ratio:.2f}x faster")
    if args.variant == "lrn" and device.type == "cpu":
        a, b = lrn_backward_ratio(device)
        print(f"LRN layer forward+backward: autograd {a:.1f} ms, hand-written backward {b:.1f} ms: {a / b:.2f}x")


if __name__ == "__main__":
    main()
