"""Benchmark: the input pipeline per core against torchvision's ImageFolder, and the training step.

One process; each comparison runs both sides in this process on the same data and device.

  loader      images/s on one core (torch threads 1, no worker processes):
                ours         alexcli's shard loader: read the prepared shards, decode the 256x256 JPEGs
                ours+aug     the same plus the batch augmentations (mean, crop, flip, pca) on the CPU,
                             which a GPU run does on the GPU
                imagefolder  torchvision ImageFolder over the source JPEGs with Resize(256),
                             RandomCrop(224), RandomHorizontalFlip, ToTensor (a DataLoader, no workers)
              target: ours >= 4x imagefolder per core
  step        training images/s (forward, backward, SGD update) on data already on the device:
                torchvision  torchvision.models.alexnet (the later one-weird-trick net), fp32
                ours fp32    the paper's network, fp32 eager
                ours fast    bf16 autocast + channels-last (+ torch.compile with --compile)
                ours+loader  ours fast fed by the real loader (--workers processes, pinned memory,
                             augmentation on the device) instead of one batch already on the device
              targets (GPU): ours fast >= 3x ours fp32; ours+loader >= 85% of ours fast

Data: the 500 ImageNet photos of ../shared/data/imagenet-sample-dev.tar when present (else the
generated demo set drawn at 300-500 px), prepared at 256x256 into a temporary folder, or --shards
and --source. The training step uses 1000 classes; the loader cycles the 500 photos.

  .venv/bin/python benchmarks/train.py                 # CPU: loader figures, a few small steps
  python3 benchmarks/train.py --device cuda --workers 12 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore", category=UserWarning)

from alexcli import __version__  # noqa: E402
from alexcli import augment as aug  # noqa: E402
from alexcli.env import pil_info  # noqa: E402
from alexcli.model.alexnet import Arch, build_model  # noqa: E402
from alexcli.train import loader  # noqa: E402
from alexcli.train.optim import PaperSGD  # noqa: E402

SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample-dev.tar"


def sources(tmp: Path) -> Path:
    src = tmp / "src"
    if SAMPLE.is_file():
        with tarfile.open(SAMPLE) as tar:
            tar.extractall(src, filter="data")
    else:
        from alexcli.data.demo import make_demo

        make_demo(src, train_per_class=60, val_per_class=0, seed=0, min_side=300, max_side=500)
    return src


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(fn, n_images: int, device, repeat: int = 3) -> float:
    """Best images/s of REPEAT timed calls of FN (each handling n_images), after one warm-up call."""
    fn()
    best = 0.0
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = max(best, n_images / (time.perf_counter() - t))
    return best


def loader_rates(split, source: Path, batch: int, n: int) -> dict:
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    stats = loader.load_data_stats(split.folder)
    ctx = aug.AugmentContext(224, stats["mean_image"].float(), stats["pca_eigval"].float(), stats["pca_eigvec"].float())
    pipeline, _ = aug.build(list(aug.DEFAULT_AUGMENT), ctx)
    gen = torch.Generator().manual_seed(0)
    steps = n // batch

    def ours():
        for _x, _y in loader.batches(split, batch, train=True, workers=0, limit=steps):
            pass

    def ours_aug():
        for x, _y in loader.batches(split, batch, train=True, workers=0, limit=steps):
            pipeline(aug.to_float(x), gen)

    tf = transforms.Compose([transforms.Resize(256), transforms.RandomCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    folder = datasets.ImageFolder(str(source / "train"), tf)

    def imagefolder():
        dl = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=0)
        for i, _ in enumerate(dl):
            if i + 1 >= steps:
                break

    cpu = torch.device("cpu")
    r = {"ours": rate(ours, steps * batch, cpu), "ours+aug": rate(ours_aug, steps * batch, cpu),
         "imagefolder": rate(imagefolder, steps * batch, cpu)}
    torch.set_num_threads(os.cpu_count() or 1)
    return r


def step_fn(model, opt, autocast, channels_last: bool):
    def step(x, y):
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if autocast:
            with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                logits = model(x)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def step_rates(split, device, batch: int, steps: int, workers: int, compile_: bool) -> dict:
    import torchvision

    x = torch.rand(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    out = {}

    def synthetic(step):
        def run():
            for _ in range(steps):
                step(x, y)
        return run

    theirs = torchvision.models.alexnet(num_classes=1000).to(device)
    out["torchvision fp32"] = rate(synthetic(step_fn(theirs, torch.optim.SGD(theirs.parameters(), lr=0.01,
                                                                           momentum=0.9), None, False)),
                                   steps * batch, device)
    del theirs
    ours, _ = build_model(Arch(num_classes=1000, init="caffe"))
    ours = ours.to(device)
    out["ours fp32"] = rate(synthetic(step_fn(ours, PaperSGD(ours.parameters()), None, False)), steps * batch, device)
    if device.type != "cuda":
        return out
    fast_model = ours.to(memory_format=torch.channels_last)
    runner = torch.compile(fast_model) if compile_ else fast_model
    fast = step_fn(runner, PaperSGD(fast_model.parameters()), True, True)
    key = "ours bf16+cl" + ("+compile" if compile_ else "")
    out[key] = rate(synthetic(fast), steps * batch, device)

    # the same step with augmentation on the device, from a uint8 batch already there vs from the loader
    stats = loader.load_data_stats(split.folder)
    ctx = aug.AugmentContext(224, *(stats[k].float().to(device) for k in ("mean_image", "pca_eigval", "pca_eigvec")))
    pipeline, _ = aug.build(list(aug.DEFAULT_AUGMENT), ctx)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (batch,), device=device)  # the sample's classes are < 1000 anyway
    resident = next(loader.batches(split, batch, train=True, workers=0, limit=1))[0].to(device)

    def on_device():
        for _ in range(steps):
            fast(pipeline(aug.to_float(resident), gen), labels)

    def from_loader():
        for images, lab in loader.batches(split, batch, train=True, workers=workers, pin=True, limit=steps):
            images = images.to(device, non_blocking=True)
            fast(pipeline(aug.to_float(images), gen), lab.to(device, non_blocking=True))

    out[key + " aug, data on GPU"] = rate(on_device, steps * batch, device)
    out[key + " aug, real loader"] = rate(from_loader, steps * batch, device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="[default: 128 on cuda, 16 on cpu]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per pass [default: 50 on cuda, 2 on cpu]")
    ap.add_argument("--workers", type=int, default=8, help="loader processes for the real-loader step (cuda)")
    ap.add_argument("--images", type=int, default=1024, help="images per timed pass of the loader comparison")
    ap.add_argument("--shards", type=Path, help="a prepared data set at 256x256 (default: prepare the sample)")
    ap.add_argument("--source", type=Path, help="the source tree for ImageFolder (with --shards)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile to the fast step")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is visible")
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    batch = args.batch or (128 if device.type == "cuda" else 16)
    steps = args.steps or (50 if device.type == "cuda" else 2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        if args.shards:
            shards, source = args.shards, args.source
        else:
            from alexcli.data.prepare import PrepareConfig, prepare

            source = sources(tmp)
            shards = tmp / "shards"
            prepare(source, shards, PrepareConfig(size=256, shard_size=32, workers=1))
        split = loader.open_split(shards, "train")
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
                             + (f", {torch.cuda.get_device_name(0)}" if device.type == "cuda" else ""),
                  "torch": torch.__version__, "alexcli": __version__, "pil": pil_info(), "device": str(device),
                  "batch": batch, "steps": steps, "images": split.samples}
        if not args.skip_loader:
            if source is None:
                sys.exit("error: --shards needs --source for the ImageFolder baseline (or use --skip-loader)")
            result["loader_images_per_s_per_core"] = lr = loader_rates(split, source, 64, args.images)
            result["loader_ratio"] = lr["ours"] / lr["imagefolder"]
        if not args.skip_step:
            result["step_images_per_s"] = sr = step_rates(split, device, batch, steps, args.workers, args.compile)
            if device.type == "cuda":
                fast = [k for k in sr if k.startswith("ours bf16") and "aug" not in k][0]
                result["fast_over_fp32"] = sr[fast] / sr["ours fp32"]
                result["loader_over_resident"] = sr[fast + " aug, real loader"] / sr[fast + " aug, data on GPU"]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    pil = result["pil"]
    print(f"{result['machine']}; torch {result['torch']}; PIL {pil['package']} {pil['version']}; "
          f"{result['images']} photos; batch {batch}")
    if "loader_ratio" in result:
        for k, v in result["loader_images_per_s_per_core"].items():
            print(f"  loader {k:<12} {v:>8,.0f} images/s per core")
        print(f"  ours / imagefolder = {result['loader_ratio']:.2f}x (target >= 4)")
    if "step_images_per_s" in result:
        for k, v in result["step_images_per_s"].items():
            print(f"  step {k:<38} {v:>8,.0f} images/s")
        if "fast_over_fp32" in result:
            print(f"  bf16+channels-last / fp32 eager = {result['fast_over_fp32']:.2f}x (target >= 3)")
            print(f"  real loader / data on GPU = {result['loader_over_resident']:.0%} (target >= 85%)")


if __name__ == "__main__":
    main()
