"""Benchmark: one CIFAR-10 epoch of the four-layer net (alexcli experiment), and where its time goes.

One process, the same data, the same net and device for every row, each after a warm-up:

  in-memory epoch   alexcli.experiment.Fit.train_epoch: a permutation, one gather per batch from
                    the uint8 tensor in memory, to float, the augmentations, forward, backward, SGD
  model only        the same number of forward + backward + SGD steps on batches made beforehand:
                    the arithmetic alone
  streaming epoch   the same steps fed by `alexcli train`'s shard loader (JPEGs decoded again every
                    epoch; --workers processes, 0 = in the main process): the baseline

It prints each epoch's time scaled to the full training split, the share of the in-memory epoch
spent outside the model's forward and backward (1 - model only / in-memory), and how many times
faster the in-memory epoch is than the streaming one.

Data: --data DIR (alexcli prepare SRC --size 32 --holdout 0.1), else ../shared/data's
cifar10-train.tar.gz prepared into a temporary folder.

  .venv/bin/python benchmarks/cifar.py                       # relu, no normalisation, 32x32 (Figure 1's net)
  .venv/bin/python benchmarks/cifar.py --variant lrn          # the lrn experiment's net: LRN, 24x24 crops, flips
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _data import cpu_model, extract_tar  # noqa: E402  (benchmarks/_data.py)

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli import augment as aug  # noqa: E402
from alexcli.experiment import ExperimentConfig, Fit, plans  # noqa: E402
from alexcli.model.alexnet import make_arch  # noqa: E402
from alexcli.train import loader  # noqa: E402
from alexcli.train.memory import load_split  # noqa: E402


def prepared_cifar(tmp: Path) -> Path:
    tar = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
    if not tar.is_file():
        sys.exit(f"no --data given and {tar} is not here")
    from alexcli.data.prepare import PrepareConfig, prepare

    src = extract_tar(tar, tmp / "src")
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
    ap.add_argument("--data", type=Path)
    ap.add_argument("--variant", choices=("relu", "tanh", "lrn"), default="relu")
    ap.add_argument("--images", type=int, default=5000, help="training images per timed epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="streaming loader's decode processes")
    ap.add_argument("--repeat", type=int, default=2, help="timed rounds (best of)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-tuning", choices=("tuned", "default"), default="tuned",
                    help="tuned: alexcli.env.tune_cpu() as `alexcli experiment` does on the CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.cpu_tuning == "tuned":
        from alexcli.env import tune_cpu

        tune_cpu()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or prepared_cifar(Path(tmp))
        full = loader.open_split(data, "train").samples
        train = load_split(data, "train", limit=args.images).to(device)
        stats = loader.load_data_stats(data)
        cfg = ExperimentConfig(data=str(data), out=tmp, batch=args.batch)
        name = "lrn" if args.variant == "lrn" else "relu-vs-tanh"
        plan = next(p for p in plans(name, cfg, 24 if name == "lrn" else 32) if p.label in (args.variant, "lrn"))
        arch = make_arch("cifar-local", num_classes=len(train.classes), **plan.arch_fields)
        fit = Fit(plan, arch, train, None, stats, lr=0.001, epochs=1, seed=0, batch=args.batch, momentum=0.9,
                  device=device)
        steps = -(-len(train) // args.batch)
        quiet = lambda *a, **k: None  # noqa: E731

        # the arithmetic alone: the same steps on batches made beforehand
        g = torch.Generator().manual_seed(0)
        made = []
        for i in range(steps):
            idx = torch.arange(i * args.batch, min(len(train), (i + 1) * args.batch))
            x = fit.pipeline(aug.to_float(train.images[idx.to(device)]), g)
            made.append((aug.center_crop(x, arch.crop).contiguous(), train.labels[idx.to(device)]))

        def model_only():
            fit.net.train()
            for x, y in made:
                loss = F.cross_entropy(fit.net(x), y)
                fit.opt.zero_grad(set_to_none=True)
                loss.backward()
                fit.opt.step()

        split = loader.open_split(data, "train")

        def streaming():
            fit.net.train()
            for images, labels in loader.batches(split, args.batch, train=True, workers=args.workers, seed=0,
                                                 epoch=1, limit=steps, pin=device.type == "cuda"):
                x = fit.pipeline(aug.to_float(loader.images_on(images, device)), g)
                x = aug.center_crop(x, arch.crop).contiguous()
                loss = F.cross_entropy(fit.net(x), labels.to(device))
                fit.opt.zero_grad(set_to_none=True)
                loss.backward()
                fit.opt.step()

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
              "batch": args.batch, "device": str(device),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores" + (
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
