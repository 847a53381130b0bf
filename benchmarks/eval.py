"""Benchmark: eval images/s (centre crop, ten patches) against the training step, and an ensemble of 3 against 3 separate evals.

One process, the same prepared shards and the same device for everything. Three checkpoints of the
network --arch names (the paper's by default; cifar-local is the four-layer CIFAR net; random
weights: speed does not depend on them) are written to a temporary folder; then it times, each
after a warm-up pass:

  eval centre     alexcli.evaluate.score([model]) with --crops center (models loaded beforehand)
  eval ten        the same with --crops ten (on a GPU the ten patches of a batch as one pass, on the
                  CPU one pass per patch position: alexcli.evaluate.model_probs)
  3 separate      score([a]), score([b]), score([c]) one after another: three decodes of every image
  ensemble of 3   score([a, b, c]): each batch decoded once and scored by the three models
  train step      alexcli.train.step.TrainStep on the same network (train mode), PaperSGD and the
                  default augmentation (mean,crop,flip,pca), --batch images already decoded and on
                  the device: to_float + augmentation, forward, cross entropy, backward, SGD step,
                  the step `alexcli train` runs. Timed after the eval rows, with
                  alexcli.env.tune_cpu() applied first on the CPU, as `alexcli train` applies it
                  (`alexcli eval` applies whatever alexcli.evaluate.score does itself).

Target: eval patches/s (centre: one per image; ten: ten per image) at least 2x the training
step's images/s -- forward alone, no gradients. The eval rows include reading and decoding the
shards in --workers processes (0: in this process), as `alexcli eval` does; the train step does
not include the loader.

Target: the ensemble at least 2x faster than the 3 separate evals. That holds where decoding is a
large share of the cost (a GPU, or a small network on the CPU: --width); on a CPU the full-width
network's arithmetic dominates and the ratio tends to 1 -- the script prints both figures.

Threads: on the CPU torch's default (every core, what `alexcli eval` and `alexcli train` use)
unless --threads.

Data: --shards DIR (a prepared data set with a val or train split), else the ImageNet sample
archive that $ALEXCLI_SAMPLE_TAR names, prepared at 256x256 into a temporary folder, else the
generated demo set (the output says which), prepared at 256x256 (at 32x32, 128 val images per class,
for --arch cifar-local).

  ALEXCLI_SAMPLE_TAR=/path/to/imagenet-sample-dev.tar .venv/bin/python benchmarks/eval.py   # CPU: quarter width
  .venv/bin/python benchmarks/eval.py --arch cifar-local            # the CIFAR net on 32x32 images, crop 24
  .venv/bin/python benchmarks/eval.py --arch cifar-local --shards shards/cifar10
  python3 benchmarks/eval.py --device cuda --width 1 --amp bf16 --workers 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from _data import SAMPLE_ENV, source_tree, torch_device  # noqa: E402  (benchmarks/_data.py)

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli import __version__  # noqa: E402
from alexcli.env import autocast_for, cpu_cores, pil_info  # noqa: E402
from alexcli.evaluate import load_scored, score  # noqa: E402
from alexcli import checkpoint as ck  # noqa: E402
from alexcli.data import dataset  # noqa: E402
from alexcli.data import stream  # noqa: E402
from alexcli.model.registry import build_model, make_arch  # noqa: E402
from alexcli.specs import AugmentContext  # noqa: E402
from alexcli.train.optim import PaperSGD, param_groups  # noqa: E402
from alexcli.train.step import TrainStep  # noqa: E402
from alexcli import transforms  # noqa: E402

TRAIN_AUGMENT = ["mean", "crop", "flip", "pca"]  # alexcli train's default --augment


def make_shards(tmp: Path, size: int) -> tuple[Path, str]:
    """The ImageNet sample ($ALEXCLI_SAMPLE_TAR), else generated demo images, prepared at SIZE x SIZE."""
    from alexcli.data.prepare import PrepareConfig, prepare

    src, origin = source_tree(None, SAMPLE_ENV, "--shards", tmp)
    if src is None:
        from alexcli.data.demo import make_demo

        src = tmp / "demo"
        print(f"NOTE: {origin}; generating demo images (not real photos) in {src} ...", flush=True)
        if size >= 256:
            make_demo(src, train_per_class=40, val_per_class=10, seed=0, min_side=300, max_side=500)
        else:  # small images (the CIFAR net): more of them, so a pass is many batches
            make_demo(src, train_per_class=10, val_per_class=128, seed=0, min_side=size, max_side=size * 3 // 2)
        origin = "GENERATED demo images (no real photos)"
    out = tmp / "shards"
    prepare(src, out, PrepareConfig(size=size, shard_size=64 if size >= 256 else 256, workers=1))
    return out, f"{origin}, prepared at {size}x{size}"


def bench_arch(name: str, num_classes: int, width: float | None, crop: int):
    return make_arch(name, num_classes=num_classes, width=width, crop=crop)


def make_checkpoints(tmp: Path, split, name: str, width: float | None, crop: int) -> list[str]:
    stats = dataset.load_stats(split.folder)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        arch = bench_arch(name, len(split.classes), width, crop)
        model, variants = build_model(arch)
        meta = {"arch": arch.to_dict(), "variants": variants, "augment": ["mean", "crop", "flip", "pca"],
                "classes": split.classes, "data": {"size": split.size}, "epoch": 0}
        path = tmp / f"bench-{i}.safetensors"
        ck.save_checkpoint(path, model.state_dict(), {"mean_image": stats["mean_image"].float()}, meta)
        paths.append(str(path))
    return paths


def timed(fn, device) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def train_batch(split, batch: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH decoded uint8 images of SPLIT and their labels on DEV (the split cycled if it is smaller)."""
    images, labels, n = [], [], 0
    while n < batch:
        for im, lb in stream.batches(split, batch, train=False, workers=0):
            images.append(im.contiguous())
            labels.append(lb)
            n += len(lb)
            if n >= batch:
                break
    return torch.cat(images)[:batch].to(dev), torch.cat(labels)[:batch].to(dev)


def make_train_step(split, name: str, width: float | None, crop: int, dev, autocast) -> TrainStep:
    """The step `alexcli train` builds: the network in train mode, PaperSGD with the paper's
    defaults over param_groups, the default augmentation from the split's statistics."""
    torch.manual_seed(0)
    model, _ = build_model(bench_arch(name, len(split.classes), width, crop))
    model = model.to(dev).train()
    opt = PaperSGD(param_groups(model, 5e-4))
    ctx = AugmentContext.from_stats(dataset.load_stats(split.folder), crop, dev)
    pipeline, _ = transforms.build(TRAIN_AUGMENT, ctx)
    return TrainStep(model, opt, augment=pipeline, crop=crop, autocast=autocast)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="a prepared data set [default: the ImageNet sample archive "
                                                f"${SAMPLE_ENV} names, prepared; neither: demo images]")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--arch", default="alexnet", help="a registered architecture: alexnet (the paper's) or "
                                                      "cifar-local (the CIFAR net) [default: alexnet]")
    ap.add_argument("--width", type=float, default=None, help="network width [default: alexnet: 1 on cuda, 0.25 on "
                                                              "cpu; other archs: their own]")
    ap.add_argument("--crop", type=int, default=None, help="[default: alexnet: 224 of 256 images, else 7/8 of the "
                                                           "size; other archs: their own (cifar-local: 24)]")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU [default: torch's, every core]")
    ap.add_argument("--train-steps", type=int, default=None, help="timed training steps per pass [default: as many "
                                                                  "batches as one eval pass, at least 5]")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="decoding processes (0: in this process)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"])
    ap.add_argument("--repeat", type=int, default=2, help="timed passes of each; the best is kept")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.shards is not None and not (args.shards / "dataset.json").is_file():
        ap.error(f"--shards {args.shards}: not a prepared data set (no dataset.json)")
    dev = torch_device(args.device)
    device = dev.type  # "cuda" or "cpu", as score() and the JSON take it
    paper = args.arch == "alexnet"
    own = make_arch(args.arch)  # the architecture's own defaults (an unknown name fails here)
    width = args.width if args.width is not None else ((1.0 if device == "cuda" else 0.25) if paper else None)
    autocast = autocast_for(args.amp, dev)
    if device == "cpu" and args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        size = 256 if paper else max(32, own.crop * 4 // 3 // 2 * 2)  # cifar-local: 32x32 images, crop 24
        shards, origin = (args.shards, f"{args.shards} (--shards)") if args.shards else make_shards(tmp, size)
        name = "val" if _has(shards, "val") else "train"
        split = dataset.open_split(shards, name)
        if args.crop is not None:
            crop = args.crop
        elif paper:
            crop = 224 if split.size >= 256 else max(64, (split.size * 7 // 8) // 2 * 2)  # the paper: 224 of 256
        else:
            crop = own.crop
        if crop > split.size:
            ap.error(f"crop {crop} is larger than the {split.size}x{split.size} images of {shards}")
        # loaded once, outside the timing: a 60M-parameter checkpoint takes about a second to read,
        # verify and build, which on a 500-image sample would hide the scoring rate
        ckpts = [load_scored(p, torch.device(device))
                 for p in make_checkpoints(tmp, split, args.arch, width, crop)]
        width = ckpts[0].meta["arch"].get("width", width)

        def run(paths, crops="center"):
            return lambda: score(paths, split, crops=crops, batch=args.batch, workers=args.workers,
                                 device=device, autocast=autocast)

        cases = {"eval centre": run(ckpts[:1]), "eval ten": run(ckpts[:1], "ten"),
                 "3 separate": lambda: [run([c])() for c in ckpts], "ensemble of 3": run(ckpts)}
        for fn in cases.values():  # warm-up: page cache, cudnn autotune, worker start
            fn()
        best = {k: min(timed(fn, device) for _ in range(args.repeat)) for k, fn in cases.items()}

        # the training step, after the eval rows: tune_cpu() (what `alexcli train` sets on the CPU)
        # is process-wide and cannot be undone, so eval runs as `alexcli eval` would
        tuned = None
        if device == "cpu":
            from alexcli.env import tune_cpu

            tuned = tune_cpu()
        step = make_train_step(split, args.arch, width, crop, dev, autocast)
        images, labels = train_batch(split, args.batch, dev)
        gen = torch.Generator().manual_seed(0)
        steps = args.train_steps or max(5, -(-split.samples // args.batch))

        def train_pass():
            for _ in range(steps):
                loss, _ = step(images, labels, gen)
            float(loss)  # the last step done (a device sync)

        for _ in range(3):  # warm-up: allocator, cudnn autotune
            step(images, labels, gen)
        train_s = min(timed(train_pass, device) for _ in range(args.repeat))

    n = split.samples
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    result = {"machine": f"{platform.processor() or platform.machine()}, {cpu_cores()} cores"
                         + (f", {gpu}" if gpu else ""),
              "device": device, "torch": torch.__version__, "pil": pil_info(), "alexcli": __version__,
              "data": origin, "images": n, "split": name, "size": split.size, "arch": args.arch, "crop": crop,
              "width": width, "batch": args.batch, "workers": args.workers, "amp": args.amp,
              "threads": torch.get_num_threads() if device == "cpu" else None,
              "images_per_s": {k: n / v for k, v in best.items()},
              "ensemble_speedup": best["3 separate"] / best["ensemble of 3"]}
    train_rate = steps * args.batch / train_s
    patches = {"eval centre": n / best["eval centre"], "eval ten": 10 * n / best["eval ten"]}
    result["train_step"] = {"images_per_s": train_rate, "steps": steps, "tune_cpu": tuned}
    result["eval_patches_per_s"] = patches
    result["eval_vs_train"] = {k: v / train_rate for k, v in patches.items()}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    threads = f", {result['threads']} torch threads" if device == "cpu" else ""
    print(f"{result['machine']}; {device}{threads}; torch {torch.__version__}; PIL {result['pil']['package']} "
          f"{result['pil']['version']}; {n} {name} images {split.size}x{split.size}, {args.arch}, crop {crop}, "
          f"width {width}, batch {args.batch}, {args.workers} loader workers, amp {args.amp}")
    print(f"data: {origin}")
    for k, v in result["images_per_s"].items():
        extra = {"ensemble of 3": "  (per model: x3)", "eval ten": f"  ({10 * v:,.0f} patches/s)"}.get(k, "")
        print(f"  {k:<14} {v:>9,.0f} images/s{extra}")
    print(f"  {'train step':<14} {train_rate:>9,.0f} images/s  (forward + backward + SGD, batch {args.batch}, "
          f"{steps} steps" + (", tune_cpu applied" if tuned else "") + ")")
    print(f"ensemble of 3 / 3 separate evals: {result['ensemble_speedup']:.2f}x faster (target >= 2)")
    for k, v in patches.items():
        r = result["eval_vs_train"][k]
        print(f"{k} patches/s / train step images/s: {v:,.0f} / {train_rate:,.0f} = {r:.2f}x (target >= 2)"
              + ("" if r >= 2 else "  BELOW TARGET"))


def _has(folder, split) -> bool:
    return dataset.has_split(dataset.read_manifest(folder), split)


if __name__ == "__main__":
    main()
