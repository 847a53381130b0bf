"""Benchmark: training images/s -- our input pipeline per core against torchvision's ImageFolder,
and our training step against torchvision's alexnet, in one process on one machine.

1. Input pipeline, one core (torch.set_num_threads(1), loader workers=0), images/s:

  ours decode           alexcli.data.stream.batches(train=True, workers=0) over shards prepared from
                        the source photos: read the tar, decode the 256x256 JPEGs, batch (uint8).
                        On a GPU this is all the CPU does per image; augmentation runs on the device.
  ours decode+augment   the same, then to_float and the default augmentation (mean,crop,flip,pca)
                        on the CPU as well, as when training on the CPU.
  ImageFolder           torchvision.datasets.ImageFolder over the source JPEGs with
                        Compose([Resize(256), RandomCrop(224), RandomHorizontalFlip(), ToTensor()]),
                        a shuffling DataLoader with num_workers=0 and the same batch size.

  Rounds interleave the three (slow drift and a neighbour's load hit all alike); the best round
  of each counts, and the per-round ratios are shown too. Target: ours decode >= 4x ImageFolder.
  With --breakdown (the default) it then times each step of both pipelines on its own.

2. Training step, images/s: forward, cross entropy, backward and SGD step on one synthetic batch
   already on the device, the same batch for every configuration (on the CPU with one torch thread
   unless --threads), through alexcli.train.step.TrainStep, the step `alexcli train` runs:

  ours fp32             build_model(Arch(num_classes=1000)) (the paper's net), eager, PaperSGD;
                        on CUDA with PyTorch's defaults, which run cuDNN convolutions in TF32
  ours fp32, TF32 off   the same with TF32 off for convolutions and matmuls (CUDA only): strict fp32
  torchvision fp32      torchvision.models.alexnet(num_classes=1000), eager, torch.optim.SGD
  ours bf16+CL          ours with bf16 autocast and channels-last
  ours bf16+CL, columns as separate convs   the same network as two columns of ungrouped
                        convolutions on one device (alexcli.model.columns.ColumnAlexNet, as
                        `--parallel columns --column-devices cuda:0,cuda:0`): what cuDNN's grouped
                        convolutions cost
  ours bf16+CL+compile  the same through torch.compile (--compile)
  ours bf16+CL+compile(CUDA graphs)   torch.compile(mode="reduce-overhead") (--cudagraphs): the
                        forward and backward replayed as CUDA graphs; "+SGD compiled": PaperSGD's
                        step through torch.compile as well
  torchvision bf16+CL, torchvision bf16+CL+compile   torchvision's under the same settings
  ... from the loader   shards -> loader with --workers processes (pinned memory) -> device
                        (non_blocking) -> TrainStep.inputs (to_float + augmentation) -> the fastest
                        of ours' bf16 steps above, once per --decode (cpu: PIL in the workers;
                        device: nvJPEG; mixed:F: the first F of each batch by nvJPEG, the rest by PIL),
  ... batch on device   against the same step (to_float + augmentation included) on a uint8 batch
                        already on the device. Target: from the loader >= 85% of on device.

  All but the first two run on CUDA only; --all runs them on the CPU too (slowly: to check them).
  --batch 128,512 times the configurations at each batch (the loader-fed step at the first).
  Each row also gives the achieved TFLOP/s: the FLOPs of one image's forward and backward, counted
  by torch.utils.flop_counter on the CPU (convolutions and matmuls; the SGD update's elementwise
  work is not counted), times images/s, and on a GPU whose dense bf16 peak is known, its share of
  that peak. Target on an H100/H200: the fastest step at batch 128 >= 25,000 images/s.

Data: --source DIR (an extracted train/<class>/<image> tree) or --source FILE (such a tree as an
archive), else the archive $ALEXCLI_SAMPLE_TAR names (the ImageNet sample archive, 500 ImageNet
photos), extracted to a temporary folder, else generated demo images of photo-like sizes (the
output says so). Shards: --shards DIR (a prepared data set with a train split), else
prepare(source, size=256, workers=1) into a temporary folder (not timed). The training loader is
endless: the loader-fed step cycles the photos.

  ALEXCLI_SAMPLE_TAR=/path/to/imagenet-sample-dev.tar .venv/bin/python benchmarks/train.py   # CPU: a minute
  python benchmarks/train.py --device cuda                # GPU: batch 128, 50 steps after 10
  python benchmarks/train.py --device cuda --compile --workers 12 --json > train.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _data import SAMPLE_ENV, best_seconds, machine, source_tree, torch_device  # noqa: E402  (benchmarks/_data.py)

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli import transforms as aug  # noqa: E402
from alexcli.env import autocast_for, cpu_cores  # noqa: E402
from alexcli.data import dataset, stream, tar  # noqa: E402
from alexcli.model.registry import Arch, build_model  # noqa: E402
from alexcli.specs import AugmentContext  # noqa: E402
from alexcli.choices import Decode  # noqa: E402
from alexcli.train.config import TrainConfig  # noqa: E402
from alexcli.train.optim import PaperSGD  # noqa: E402
from alexcli.train.step import TrainStep  # noqa: E402

SIZE, CROP = 256, 224                 # stored side, network input (sections 2 and 4.1)
AUGMENT = "mean,crop,flip,pca"        # the trainer's default --augment
LR = 0.01                             # section 5's learning rate (the speed does not depend on it)
STRICT = "ours fp32, TF32 off"          # the strict-fp32 baseline (CUDA only)
TARGETS = {"loader_vs_imagefolder": 4.0, "step_images_per_s": 25_000, "loader_fed_vs_on_device": 0.85}
# Dense bf16 tensor-core peaks (TFLOP/s, the vendors' data sheets, without sparsity), by the name
# CUDA reports; the first match counts, so the PCIe H100 comes before the SXM one.
BF16_PEAK = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.0),
             ("L4", 121.0))

OUT = sys.stdout  # the human-readable lines; stderr with --json, whose object alone goes to stdout


def say(*parts) -> None:
    print(*parts, file=OUT, flush=True)


# ---------------------------------------------------------------- machine

def header(m: dict) -> str:
    pil = m["pil"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores available"
             + (f"; GPU {m['gpu']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}" if m["gpu"] else "; no GPU used"),
             f"software: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
             f"webdataset {m['webdataset']}, alexcli {m['alexcli']}",
             f"PIL: {pil['package']} {pil['version']}" + (" (SIMD)" if pil["simd"] else "")
             + (f", libjpeg-turbo {m['libjpeg_turbo']}" if m["libjpeg_turbo"] else ", no libjpeg-turbo")
             + " (both pipelines decode with it)"]
    if m["gpu"]:
        lines.append(f"cuda settings: cudnn.benchmark={m['cudnn_benchmark']}, TF32 matmul={m['tf32']['matmul']}, "
                     f"TF32 cudnn={m['tf32']['cudnn']} (as the trainer sets them)")
    return "\n".join(lines)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- data

def find_source(args, tmp: Path) -> tuple[Path, str]:
    """The source photo tree (a root with train/<class>/<image>) and where it came from."""
    root, why = source_tree(args.source, SAMPLE_ENV, "--source", tmp)
    if root is not None:
        return root, why
    from alexcli.data.demo import make_demo

    root = tmp / "demo"
    say(f"NOTE: {why}; generating demo images (not real photos) in {root} ...")
    make_demo(root, train_per_class=63, val_per_class=0, seed=0, min_side=300, max_side=500, broken=False)
    return root, "GENERATED demo images, 504 of 300..500 px (no real photos found)"


def count_files(root: Path) -> tuple[int, int]:
    files = [p for p in (root / "train").rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def find_shards(args, src: Path | None, n_source: int, tmp: Path) -> tuple[Path, str]:
    if args.shards is not None:
        return args.shards, f"{args.shards} (--shards)"
    from alexcli.data.prepare import PrepareConfig, prepare

    out = tmp / "shards"
    # at least 16 shards (or one per loader worker), so every worker has shards of its own
    shard_size = max(1, n_source // max(16, args.workers))
    t0 = time.perf_counter()
    summary = prepare(src, out, PrepareConfig(size=SIZE, shard_size=shard_size, workers=1))
    return out, (f"prepared from the source in {time.perf_counter() - t0:.1f} s (not timed), "
                 f"{summary['written']} written, {summary['rejected']} rejected, {shard_size} per shard")


def augment_pipeline(shards: Path, device: torch.device):
    """The trainer's default augmentation, built as loop.py builds it, on DEVICE."""
    ctx = AugmentContext.from_stats(dataset.load_stats(shards), CROP, device)
    pipeline, _ = aug.build(aug.parse(AUGMENT), ctx)
    return pipeline


# ---------------------------------------------------------------- 1. input pipeline, one core

def run_ours(split, batch: int, n_batches: int, seed: int, pipeline=None) -> tuple[int, float]:
    """(images, seconds) of N_BATCHES batches of the training loader in this process, after one
    untimed batch (it includes filling the shuffle buffer: a start-up cost once per epoch)."""
    gen = torch.Generator().manual_seed(seed)
    it = stream.batches(split, batch, train=True, workers=0, seed=seed, limit=n_batches + 1)
    try:
        next(it)
        n, t0 = 0, time.perf_counter()
        for images, labels in it:
            if pipeline is not None:
                x = pipeline(aug.to_float(images), gen)
                assert x.shape[-1] == CROP
            n += len(labels)
        return n, time.perf_counter() - t0
    finally:
        it.close()


def make_imagefolder(src: Path, batch: int, seed: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(256), transforms.RandomCrop(224),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    ds = datasets.ImageFolder(str(src / "train"), transform=tf)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0,
                                           generator=torch.Generator().manual_seed(seed))


def run_imagefolder(dl, images: int) -> tuple[int, float]:
    """(images, seconds) of whole passes over the source until at least IMAGES are done."""
    n, t0 = 0, time.perf_counter()
    while n < images:
        for _x, y in dl:
            n += len(y)
    return n, time.perf_counter() - t0


def loader_bench(args, src: Path, split) -> dict:
    torch.set_num_threads(1)
    batch, repeat = args.loader_batch, args.repeat
    pipeline = augment_pipeline(split.folder, torch.device("cpu"))
    ds, dl = make_imagefolder(src, batch, seed=0)
    n_batches = max(1, math.ceil(args.images / batch))
    say(f"\n1. input pipeline, one core (1 torch thread, no loader workers), batch {batch}: "
        f"{n_batches * batch} images a round; {split.samples} prepared / {len(ds)} source images")
    # warm-up: page cache for shards and sources, lazy imports, first-call allocations
    run_ours(split, batch, max(1, split.samples // batch), seed=99, pipeline=pipeline)
    run_imagefolder(dl, 1)
    runs: dict[str, list] = {"ours decode": [], "ours decode+augment": [], "ImageFolder": []}
    for r in range(repeat):
        runs["ours decode"].append(run_ours(split, batch, n_batches, seed=r))
        runs["ours decode+augment"].append(run_ours(split, batch, n_batches, seed=r, pipeline=pipeline))
        runs["ImageFolder"].append(run_imagefolder(dl, n_batches * batch))
        say(f"  round {r + 1}/{repeat}: " + ", ".join(f"{k} {v[-1][0] / v[-1][1]:,.0f}/s" for k, v in runs.items()))
    rates = {k: [n / s for n, s in v] for k, v in runs.items()}
    best = {k: max(v) for k, v in rates.items()}
    median = {k: statistics.median(v) for k, v in rates.items()}
    # the ratio within a round (same moment, same neighbours) next to best / best
    per_round = [o / b for o, b in zip(rates["ours decode"], rates["ImageFolder"])]
    per_round_aug = [o / b for o, b in zip(rates["ours decode+augment"], rates["ImageFolder"])]
    say(f"\n  {'pipeline':<22} {'best/s':>9} {'median/s':>9} {'ms/image':>9} {'x ImageFolder':>14}")
    for k in runs:
        say(f"  {k:<22} {best[k]:>9,.0f} {median[k]:>9,.0f} {1e3 / best[k]:>9.3f} "
            f"{best[k] / best['ImageFolder']:>14.2f}")
    ratio = best["ours decode"] / best["ImageFolder"]
    target = TARGETS["loader_vs_imagefolder"]
    say(f"\n  ours decode / ImageFolder = {ratio:.2f} per core (best / best; within each round: "
        f"{', '.join(f'{x:.2f}' for x in per_round)}); target >= {target:.0f}: "
        f"{'met' if ratio >= target else 'NOT met'}")
    say(f"  ours decode+augment / ImageFolder = {best['ours decode+augment'] / best['ImageFolder']:.2f} "
        f"(augmentation on the CPU too, as when training on the CPU; within each round: "
        f"{', '.join(f'{x:.2f}' for x in per_round_aug)})")
    result = {"batch": batch, "images_per_round": n_batches * batch, "rounds": repeat,
              "images_per_s": best, "images_per_s_median": median, "images_per_s_rounds": rates,
              "ratio": ratio, "ratio_rounds": per_round,
              "ratio_with_augment": best["ours decode+augment"] / best["ImageFolder"],
              "target": target, "met": ratio >= target}
    if args.breakdown:
        result["breakdown_ms_per_image"] = breakdown(split, ds, pipeline, batch, repeat, best)
    return result


def _best_ms(fn, n: int, repeat: int) -> float:
    return best_seconds(fn, repeat) / max(1, n) * 1e3


def breakdown(split, ds, pipeline, batch: int, repeat: int, best: dict) -> dict:
    """ms per image of each step of both pipelines, each step in a loop of its own, best of REPEAT.
    Uses the stream's own two steps: the shard reader and the batch decoder."""
    import io

    import numpy as np
    from PIL import Image
    from torchvision import transforms

    say(f"\n  where the time per image goes (one core, each step in a loop of its own, best of {repeat}):")
    out: dict[str, float] = {}
    decode = stream.decode_batch
    jpgs: list[bytes] = []

    def read():
        jpgs.clear()
        for entry in split.shards:
            jpgs.extend(s.jpg for s in tar.read_samples(split.path(entry), entry["samples"]))
    n = split.samples
    out["ours: read the shards (tar, group, label)"] = _best_ms(read, n, repeat)
    chunks = [jpgs[i:i + batch] for i in range(0, len(jpgs) - batch + 1, batch)] or [jpgs]
    m = sum(map(len, chunks))
    out["ours: decode into a batch (decode_batch)"] = _best_ms(lambda: [decode(c) for c in chunks], m, repeat)
    work = sum(out.values())
    out["ours: the rest (shuffle buffer, labels, loop)"] = max(0.0, 1e3 / best["ours decode"] - work)

    def pil_decode():
        for j in jpgs:
            with Image.open(io.BytesIO(j)) as im:
                im.load()
    out["(ours: PIL decode alone, no copy out)"] = _best_ms(pil_decode, n, repeat)
    try:
        from torchvision.io import decode_jpeg

        frames = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]
        out["(ours: torchvision decode_jpeg alone)"] = _best_ms(lambda: [decode_jpeg(f) for f in frames], n, repeat)
    except Exception as exc:  # noqa: BLE001 -- a comparison line only
        say(f"  (no torchvision decode_jpeg: {exc})")
    try:  # not a dependency: a third libjpeg-turbo binding, timed when installed
        import simplejpeg

        out["(simplejpeg decode alone, exact)"] = _best_ms(
            lambda: [simplejpeg.decode_jpeg(j, colorspace="RGB") for j in jpgs], n, repeat)
        out["(simplejpeg, fast IDCT + upsampling, inexact)"] = _best_ms(
            lambda: [simplejpeg.decode_jpeg(j, colorspace="RGB", fastdct=True, fastupsample=True) for j in jpgs],
            n, repeat)
    except ImportError:
        pass
    xs = [decode(c) for c in chunks[:4]]
    k = sum(len(x) for x in xs)
    gen = torch.Generator().manual_seed(0)
    out["ours: to_float + augment on the CPU"] = _best_ms(lambda: [pipeline(aug.to_float(x), gen) for x in xs],
                                                          k, repeat)
    layout = "channels-last" if xs[0].is_contiguous(memory_format=torch.channels_last) else "NCHW"
    other = [x.contiguous() if layout == "channels-last" else x.contiguous(memory_format=torch.channels_last)
             for x in xs]
    other_name = "NCHW" if layout == "channels-last" else "channels-last"
    out[f"(ours: the same on an {other_name} batch)"] = _best_ms(
        lambda: [pipeline(aug.to_float(x), gen) for x in other], k, repeat)

    # ImageFolder's side, on (up to) 256 of the source images, step by step as its transform runs them
    paths = [p for p, _ in ds.samples[:256]]
    blobs = [Path(p).read_bytes() for p in paths]
    pil: list = []

    def src_decode():
        pil.clear()
        for p in paths:
            with Image.open(p) as im:  # as torchvision's pil_loader: open the file, convert("RGB")
                pil.append(im.convert("RGB"))
    k = len(paths)
    out["ImageFolder: read + decode the source (PIL)"] = _best_ms(src_decode, k, repeat)
    resize, crop, flip, to_tensor = (transforms.Resize(256), transforms.RandomCrop(224),
                                     transforms.RandomHorizontalFlip(), transforms.ToTensor())
    out["ImageFolder: Resize(256)"] = _best_ms(lambda: [resize(im) for im in pil], k, repeat)
    small = [resize(im) for im in pil]
    out["ImageFolder: RandomCrop + flip"] = _best_ms(lambda: [flip(crop(im)) for im in small], k, repeat)
    cropped = [flip(crop(im)) for im in small]
    out["ImageFolder: ToTensor"] = _best_ms(lambda: [to_tensor(im) for im in cropped], k, repeat)
    pairs = [(to_tensor(im), 0) for im in cropped]
    groups = [pairs[i:i + batch] for i in range(0, k - batch + 1, batch)]
    collate = torch.utils.data.default_collate
    out["ImageFolder: collate"] = _best_ms(lambda: [collate(g) for g in groups], sum(map(len, groups)), repeat)
    sizes = [im.size for im in pil]
    say(f"  (source images: mean {np.mean([w for w, _ in sizes]):.0f}x{np.mean([h for _, h in sizes]):.0f} px, "
        f"{np.mean(list(map(len, blobs))) / 1e3:.0f} KB; prepared: {split.size}x{split.size}, "
        f"{np.mean(list(map(len, jpgs))) / 1e3:.0f} KB; ours' batches are {layout})")
    say(f"  {'step':<48} {'ms/image':>9}")
    for key, ms in out.items():
        say(f"  {key:<48} {ms:>9.3f}")
    if "(ours: torchvision decode_jpeg alone)" in out:
        least = out["ours: read the shards (tar, group, label)"] + out["(ours: torchvision decode_jpeg alone)"]
        say(f"  ImageFolder end to end / (ours' shard reading + decode_jpeg) = {1e3 / best['ImageFolder'] / least:.2f}"
            f": the ratio if the loader cost no more than those two")
    return out


# ---------------------------------------------------------------- 2. training step

def make_step(model, opt, *, amp: bool, channels_last: bool, device: torch.device, pipeline=None, seed: int = 0):
    """`step(x, y) -> loss`: alexcli.train.step.TrainStep, the step `alexcli train` runs, built as
    loop.py builds it (bf16 autocast for AMP, the layout for CHANNELS_LAST).

    Without PIPELINE, X is a ready float batch at the crop: TrainStep.update on it in the step's
    memory format (forward, loss, backward, SGD). With PIPELINE, X is a uint8 batch on the device
    and goes through TrainStep.inputs first (to_float, the augmentation with a generator seeded
    with SEED, the layout), as in training. The TrainStep is the function's `train_step`."""
    train_step = TrainStep(model, opt, augment=pipeline, crop=CROP, channels_last=channels_last,
                           autocast=autocast_for("bf16" if amp else "none", device))
    gen = torch.Generator().manual_seed(seed)

    if pipeline is None:
        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return train_step.update(x.contiguous(memory_format=train_step.memory_format), y)[0]
    else:
        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return train_step.update(train_step.inputs(x, gen), y)[0]
    step.train_step = train_step
    return step


def without_tf32(step):
    """STEP with TF32 off for its convolutions and matmuls: fp32 in the strict sense. PyTorch's
    default runs cuDNN convolutions in TF32 (10-bit mantissa) on Ampere and later, so "fp32 eager"
    there is already half-way to a reduced-precision run; both baselines are reported. The flags
    are set around each step and restored, so the configurations can interleave."""
    def strict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return step(x, y)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return strict


def time_steps(step, batches, warmup: int, steps: int, device: torch.device) -> tuple[int, float, float]:
    """(images, seconds, last loss) of STEPS steps after WARMUP untimed ones, batches from BATCHES."""
    it = iter(batches)
    try:
        for _ in range(warmup):
            step(*next(it))
        sync(device)
        n, loss, t0 = 0, None, time.perf_counter()
        for _ in range(steps):
            x, y = next(it)
            loss = step(x, y)
            n += len(y)
        sync(device)
        took = time.perf_counter() - t0
    finally:
        if hasattr(it, "close"):
            it.close()  # a loader-fed generator stops its workers now, not when it is collected
    return n, took, float(loss) if loss is not None else math.nan


def graph_steps(step):
    """STEP for a model compiled with CUDA graphs (mode="reduce-overhead"): each call marks a new
    iteration, so the graphs' output buffers of the step before may be reused."""
    def marked(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return step(x, y).clone()
    marked.train_step = step.train_step
    return marked


def repeat_batch(x: torch.Tensor, y: torch.Tensor):
    """The same batch forever; an iterator without close(), so every configuration can share it."""
    return itertools.repeat((x, y))


def loader_fed(split, batch: int, workers: int, device: torch.device, limit: int, seed: int, decode: str = "cpu",
               share: float = 0.5):
    """The trainer's input path: loader (pinned memory on CUDA) -> device without blocking the host
    (with decode="device" the JPEGs are decoded there, as `train --decode device` does; "mixed": the
    first SHARE of each batch)."""
    cuda = device.type == "cuda"
    it = stream.batches(split, batch, train=True, workers=workers, seed=seed, pin=cuda, limit=limit, decode=decode,
                        share=share)
    try:
        for images, labels in it:
            yield stream.images_on(images, device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
    finally:
        it.close()


class Config:
    """One measured configuration: its step function and its timed runs."""

    def __init__(self, name: str, model, opt, step, warmup: int, graphs: bool = False):
        self.name, self.model, self.opt, self.step, self.warmup = name, model, opt, step, warmup
        self.graphs = graphs  # compiled with CUDA graphs: its steps go through graph_steps
        self.runs: list[tuple[int, float, float]] = []
        self.error: str | None = None

    @property
    def rate(self) -> float:
        return max((n / s for n, s, _ in self.runs), default=math.nan)

    def last(self) -> float:
        n, s, _ = self.runs[-1]
        return n / s


def build_ours(device: torch.device, *, channels_last: bool = False):
    torch.manual_seed(0)
    model = build_model(Arch(num_classes=1000))[0].to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, PaperSGD(model.parameters(), lr=LR)


def build_torchvision(device: torch.device, *, channels_last: bool = False):
    """torchvision.models.alexnet and the plain SGD with the paper's momentum and weight decay."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.alexnet(num_classes=1000).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)


def flops_per_image(model) -> float:
    """FLOPs of one image's forward and backward through a copy of MODEL (fp32, on the CPU, batch 2),
    counted by torch.utils.flop_counter: convolutions (grouped ones and the LRN's band convolution
    included) and matmuls. They do not depend on the batch, the precision or compilation."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu().float().to(memory_format=torch.contiguous_format)
    m.train()
    x, y = torch.randn(2, 3, CROP, CROP), torch.randint(0, 1000, (2,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return counter.get_total_flops() / 2


def bf16_peak(gpu: str | None) -> float | None:
    """The dense bf16 peak in TFLOP/s of the GPU named GPU, or None where it is not in BF16_PEAK."""
    for name, peak in BF16_PEAK:
        if gpu and name in gpu:
            return peak
    return None


def step_bench(args, device: torch.device, split, batch: int, loader: bool = True) -> dict:
    """The training step's configurations at BATCH; LOADER: also the loader-fed step."""

    cuda = device.type == "cuda"
    full = cuda or args.all
    torch.set_num_threads(args.threads)
    steps, warmup, repeat = args.steps, args.warmup, args.step_repeat
    say(f"\n2. training step on {device}" + ("" if cuda else f" ({torch.get_num_threads()} torch threads)")
        + f", batch {batch}, {steps} timed steps after {warmup} warm-up, best of {repeat} interleaved rounds; "
          "one synthetic batch already on the device")
    x = torch.randn(batch, 3, CROP, CROP, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    data = repeat_batch(x, y)
    configs = []
    model, opt = build_ours(device)
    configs.append(Config("ours fp32", model, opt,
                          make_step(model, opt, amp=False, channels_last=False, device=device), warmup))
    tv, tv_opt = build_torchvision(device)
    configs.append(Config("torchvision fp32", tv, tv_opt,
                          make_step(tv, tv_opt, amp=False, channels_last=False, device=device), warmup))
    if cuda:
        model, opt = build_ours(device)
        configs.append(Config(STRICT, model, opt, without_tf32(
            make_step(model, opt, amp=False, channels_last=False, device=device)), warmup))
    if full:
        model, opt = build_ours(device, channels_last=True)
        configs.append(Config("ours bf16+CL", model, opt,
                              make_step(model, opt, amp=True, channels_last=True, device=device), warmup))
        # the two columns as separate convolutions (groups=1 each, half the maps) instead of cuDNN's
        # grouped ones: ColumnAlexNet with both columns on this device, as --column-devices cuda:0,cuda:0
        from alexcli.model.columns import ColumnAlexNet

        model, _ = build_ours(device)
        cols = ColumnAlexNet(model, [device, device]).to(memory_format=torch.channels_last)
        cols_opt = PaperSGD(cols.parameters(), lr=LR)
        configs.append(Config("ours bf16+CL, columns as separate convs", cols, cols_opt,
                              make_step(cols, cols_opt, amp=True, channels_last=True, device=device), warmup))
        tv_cl = build_torchvision(device, channels_last=True)
        configs.append(Config("torchvision bf16+CL", *tv_cl,
                              make_step(*tv_cl, amp=True, channels_last=True, device=device), warmup))
        if args.compile:
            model, opt = build_ours(device, channels_last=True)
            runner = torch.compile(model)
            configs.append(Config("ours bf16+CL+compile", runner, opt,
                                  make_step(runner, opt, amp=True, channels_last=True, device=device),
                                  max(warmup, 3)))  # the first steps compile (forward and backward)
        # CUDA graphs: the forward and backward replayed as two graphs, without a launch per kernel;
        # then with the SGD update compiled too (PaperSGD's four foreach ops fused into a few kernels)
        for sgd_compiled in ((False, True) if args.cudagraphs else ()):
            model, opt = build_ours(device, channels_last=True)
            runner = torch.compile(model, mode="reduce-overhead")
            if sgd_compiled:
                opt.step = torch.compile(opt.step)
            configs.append(Config("ours bf16+CL+compile(CUDA graphs)" + ("+SGD compiled" if sgd_compiled else ""),
                                  runner, opt,
                                  graph_steps(make_step(runner, opt, amp=True, channels_last=True, device=device)),
                                  max(warmup, 5), graphs=True))
        if args.compile:
            tv_model, tv_opt2 = build_torchvision(device, channels_last=True)
            tv_runner = torch.compile(tv_model)
            configs.append(Config("torchvision bf16+CL+compile", tv_runner, tv_opt2,
                                  make_step(tv_runner, tv_opt2, amp=True, channels_last=True, device=device),
                                  max(warmup, 3)))
    elif args.compile or args.cudagraphs:
        say("  (--compile and --cudagraphs apply to the bf16 configuration, which runs on CUDA or with --all)")
    for r in range(repeat):
        for c in configs:
            if c.error:
                continue
            try:
                c.runs.append(time_steps(c.step, data, c.warmup if r == 0 else 0, steps, device))
            except Exception as exc:  # noqa: BLE001 -- e.g. torch.compile failing: report it and go on
                c.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                say(f"  {c.name}: FAILED: {c.error}")
        say(f"  round {r + 1}/{repeat}: " + ", ".join(f"{c.name} {c.last():,.0f}/s" for c in configs
                                                      if c.runs and not c.error))
    ok = [c for c in configs if c.runs and not c.error]
    mine = [c for c in ok if c.name.startswith("ours bf16+CL")]
    fastest = max(mine, key=lambda c: c.rate) if mine else None  # what the loader-fed step runs
    result = {"device": str(device), "batch": batch, "steps": steps, "warmup": warmup, "rounds": repeat,
              "images_per_s": {c.name: c.rate for c in ok},
              "errors": {c.name: c.error for c in configs if c.error}}
    diverged = [c.name for c in ok if not math.isfinite(c.runs[-1][2])]
    if diverged:
        say(f"  NOTE: the loss became non-finite in {', '.join(diverged)} (one random batch, lr {LR}); "
            f"the timings stand")

    rows = [(c.name, c.rate) for c in ok]
    if loader and full and fastest is not None and split is not None:
        rows += loader_fed_bench(args, device, split, fastest, batch, result)
    elif not full:
        say("  (bf16 + channels-last, --compile and the loader-fed step run on CUDA; --all runs them here too)")

    flops = {"ours": flops_per_image(configs[0].model), "torchvision": flops_per_image(tv)}
    peak = bf16_peak(torch.cuda.get_device_name(device) if cuda else None)
    result["gflops_per_image"] = {k: v / 1e9 for k, v in flops.items()}
    result["bf16_peak_tflops"] = peak
    result["tflops"] = {}
    base = result["images_per_s"].get("ours fp32", math.nan)
    say(f"\n  FLOPs of one image's forward + backward: ours {flops['ours'] / 1e9:.2f} G, torchvision "
        f"{flops['torchvision'] / 1e9:.2f} G" + (f"; bf16 peak of this GPU {peak:g} TFLOP/s" if peak else ""))
    w = max(44, *(len(name) for name, _ in rows))
    say(f"\n  {'configuration':<{w}} {'images/s':>10} {'ms/step':>9} {'x ours fp32':>12} {'TFLOP/s':>8}"
        + (f" {'of peak':>8}" if peak else ""))
    for name, rate in rows:
        tflops = rate * flops["torchvision" if name.startswith("torchvision") else "ours"] / 1e12
        result["tflops"][name] = tflops
        say(f"  {name:<{w}} {rate:>10,.1f} {batch / rate * 1e3:>9.1f} {rate / base:>12.2f} {tflops:>8.2f}"
            + (f" {tflops / peak:>8.1%}" if peak else ""))
    tv_rate = result["images_per_s"].get("torchvision fp32")
    if tv_rate:
        result["ours_vs_torchvision_fp32"] = base / tv_rate
        say(f"\n  ours fp32 / torchvision fp32 = {base / tv_rate:.2f} (the paper's net: two columns, LRN, "
            f"96-256-384-384-256 maps; torchvision's: one column, no LRN, 64-192-384-256-256)")
    for setting in ("bf16+CL", "bf16+CL+compile"):  # the same settings for both networks
        a, b = (result["images_per_s"].get(f"{net} {setting}") for net in ("ours", "torchvision"))
        if a and b:
            result[f"ours_vs_torchvision_{setting}"] = a / b
            say(f"  ours {setting} / torchvision {setting} = {a / b:.2f}")
    bf = result["images_per_s"].get("ours bf16+CL")
    if bf:
        result["bf16_cl_vs_fp32"] = bf / base
        say(f"  ours bf16+CL / ours fp32 = {bf / base:.2f}")
        comp = result["images_per_s"].get("ours bf16+CL+compile")
        if comp:
            result["bf16_cl_compile_vs_fp32"] = comp / base
            say(f"  ours bf16+CL+compile / ours fp32 = {comp / base:.2f}")
        strict = result["images_per_s"].get(STRICT)
        if strict:
            result["bf16_cl_vs_fp32_strict"] = bf / strict
            say(f"  ours bf16+CL / {STRICT} = {bf / strict:.2f}")
    best = max((rate for name, rate in result["images_per_s"].items() if name.startswith("ours")), default=None)
    if cuda and best and batch == 128:
        target = TARGETS["step_images_per_s"]
        result["step_target"] = {"images_per_s": best, "target": target, "met": best >= target}
        say(f"  fastest step of ours at batch 128: {best:,.0f} images/s (target >= {target:,} on an H100/H200: "
            f"{'met' if best >= target else 'NOT met'})")
    if "loader_fed" in result:
        lf = result["loader_fed"]
        for name, row in lf["by_decode"].items():
            say(f"  from the loader ({name}) / batch on device = {row['ratio']:.2f} (target >= {lf['target']:.2f} "
                f"on a GPU: {'met' if row['met'] else 'NOT met'})")
    return result


def loader_fed_bench(args, device: torch.device, split, fastest: Config, batch: int, result: dict) -> list:
    """The fastest step fed by the real loader, once for each --decode, against the same step on a
    batch already on the device."""
    cuda = device.type == "cuda"
    steps, repeat = args.steps, args.step_repeat
    workers = min(args.workers, len(split.shards))
    if workers < args.workers:
        say(f"  NOTE: {len(split.shards)} shards feed at most {workers} loader workers (--workers {args.workers})")
    pipeline = augment_pipeline(split.folder, device)
    step = make_step(fastest.model, fastest.opt, amp=True, channels_last=True, device=device, pipeline=pipeline)
    if fastest.graphs:
        step = graph_steps(step)
    first = stream.batches(split, batch, train=True, workers=0, limit=1)
    images, labels = next(first)
    first.close()
    resident = repeat_batch(images.to(device), labels.to(device))
    warm = max(args.warmup, 10 if cuda else 1)
    say(f"\n  {fastest.name} with to_float + {AUGMENT} on the device, fed by the loader ({workers} workers"
        f"{', pinned memory, non_blocking copies' if cuda else ''}; decoding: {', '.join(map(decode_name, args.decode))})"
        f" or on one uint8 batch already on the device; {steps} steps after {warm}, {repeat} rounds:")
    on_device = Config(f"{fastest.name}, batch on device", None, None, step, warm)
    fed = [Config(f"{fastest.name}, from the loader ({decode_name(d)})", None, None, step, warm) for d in args.decode]
    for r in range(repeat):
        on_device.runs.append(time_steps(step, resident, warm, steps, device))
        for (mode, share), c in zip(args.decode, fed):
            t0 = time.perf_counter()
            c.runs.append(time_steps(step, loader_fed(split, batch, workers, device, warm + steps, seed=r,
                                                      decode=mode, share=share), warm, steps, device))
            say(f"  round {r + 1}/{repeat}: on device {on_device.last():,.1f}/s, from the loader "
                f"({decode_name((mode, share))}) {c.last():,.1f}/s (the loader's whole call, worker start and "
                f"warm-up included: {time.perf_counter() - t0:.1f} s)")
    target = TARGETS["loader_fed_vs_on_device"]
    by_decode = {decode_name(d): {"images_per_s": c.rate, "ratio": c.rate / on_device.rate,
                                  "met": c.rate / on_device.rate >= target} for d, c in zip(args.decode, fed)}
    best = max(by_decode, key=lambda k: by_decode[k]["ratio"])
    result["loader_fed"] = {"workers": workers, "config": fastest.name, "warmup": warm, "decode": best,
                            "images_per_s": {"on_device": on_device.rate, "from_loader": by_decode[best]["images_per_s"]},
                            "ratio": by_decode[best]["ratio"], "target": target, "met": by_decode[best]["met"],
                            "by_decode": by_decode}
    return [(on_device.name, on_device.rate)] + [(c.name, c.rate) for c in fed]


def decode_name(decode: tuple[str, float]) -> str:
    mode, share = decode
    return {"cpu": "PIL in the workers", "device": "decoded on the device"}.get(
        mode, f"mixed: {share:g} of each batch on the device")


def _decodes(text: str) -> list[tuple[str, float]]:
    """--decode: cpu, device or mixed:SHARE (mixed alone: the trainer's default --decode-share),
    several separated by commas."""
    out = []
    for part in text.split(","):
        mode, _, share = part.strip().partition(":")
        try:
            value = float(share) if share else TrainConfig.decode_share
        except ValueError:
            value = math.nan
        if mode not in {d.value for d in Decode} or (share and mode != Decode.mixed) or not 0 < value < 1:
            raise argparse.ArgumentTypeError(f"expected cpu, device or mixed:SHARE (0 < SHARE < 1), separated by "
                                             f"commas, not {part!r}")
        out.append((mode, value))
    return out


# ---------------------------------------------------------------- main

def _batches(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size or several separated by commas, not {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=_batches, help="training-step batch, or several separated by commas (128,512) "
                                                  "[default: 128 on CUDA, 16 on the CPU]")
    p.add_argument("--loader-batch", type=int, default=64,
                   help="batch of the one-core pipeline comparison, both sides [default: %(default)s]")
    p.add_argument("--images", type=int, default=1000,
                   help="images a timed round of the pipeline comparison [default: %(default)s, 2 passes of the 500]")
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved rounds of the pipeline comparison [default: %(default)s]")
    p.add_argument("--steps", type=int, help="timed training steps a round [default: 50 on CUDA, 3 on the CPU]")
    p.add_argument("--warmup", type=int, help="untimed steps first [default: 10 on CUDA, 1 on the CPU]")
    p.add_argument("--step-repeat", type=int, help="rounds of the training steps [default: 3 on CUDA, 2 on the CPU]")
    p.add_argument("--workers", type=int,
                   help="loader processes for the loader-fed step [default: min(8, cores - 1) on CUDA, 1 on the CPU]")
    p.add_argument("--threads", type=int, help="torch threads for the training step on the CPU [default: 1, a "
                                               "per-core figure like part 1, steadier on a shared machine]")
    p.add_argument("--compile", action="store_true", help="also time ours bf16+CL through torch.compile")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also time ours bf16+CL through torch.compile(mode='reduce-overhead') (CUDA graphs), "
                        "with and without the SGD step compiled")
    p.add_argument("--all", action="store_true", help="run the CUDA-only measurements on the CPU too (slow)")
    p.add_argument("--decode", type=_decodes, default=[(Decode.cpu.value, TrainConfig.decode_share)],
                   help="where the loader-fed step decodes JPEGs: cpu (PIL in the loader processes), device "
                        "(nvJPEG on the GPU) or mixed:SHARE (the first SHARE of each batch on the GPU), as "
                        "`alexcli train --decode` and --decode-share; several separated by commas, each timed "
                        "[default: cpu]")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark, on by default as the trainer sets it on CUDA")
    p.add_argument("--source", type=Path, help="the source photos: DIR/train/<class>/<image>, or an archive of such "
                                               f"a tree [default: ${SAMPLE_ENV}; neither: demo images]")
    p.add_argument("--shards", type=Path, help="a prepared data set to read instead of preparing the source")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time each step of both pipelines on its own [default: on]")
    p.add_argument("--skip-loader", action="store_true", help="skip 1., the input pipeline comparison")
    p.add_argument("--skip-step", action="store_true", help="skip 2., the training step")
    p.add_argument("--loader-fed", action=argparse.BooleanOptionalAction, default=True,
                   help="time the loader-fed step after the step configurations (CUDA or --all) [default: on]")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the text goes to stderr)")
    args = p.parse_args(argv)
    for name in ("batch", "loader_batch", "images", "repeat", "steps", "step_repeat", "threads"):
        v = getattr(args, name)
        if v is not None and min(v if isinstance(v, list) else [v]) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.warmup is not None and args.warmup < 0) or (args.workers is not None and args.workers < 0):
        p.error("--warmup and --workers must be at least 0")
    return args


def main(argv=None) -> dict:
    global OUT
    args = parse_args(argv)
    if args.json:
        OUT = sys.stderr
    device = torch_device(args.device)
    cuda = device.type == "cuda"
    cores = cpu_cores()
    args.batch = args.batch or [128 if cuda else 16]
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.step_repeat = args.step_repeat or (3 if cuda else 2)
    args.workers = args.workers if args.workers is not None else (max(1, min(8, cores - 1)) if cuda else 1)
    args.threads = args.threads or (cores if cuda else 1)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    m = machine(device)
    say(header(m))
    result = {"machine": m, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    tmp = Path(tempfile.mkdtemp(prefix="alexcli-bench-train-"))
    try:
        need_loader = not args.skip_loader
        need_shards = need_loader or (not args.skip_step and (cuda or args.all))
        src, n_src, split = None, 0, None
        if need_loader or (need_shards and args.shards is None):
            src, origin = find_source(args, tmp)
            n_src, size_src = count_files(src)
            say(f"source: {origin}: {n_src} files, {size_src / 1e6:.1f} MB")
            result["source"] = {"origin": origin, "files": n_src, "bytes": size_src}
        if need_shards:
            shards, how = find_shards(args, src, n_src, tmp)
            split = dataset.open_split(shards, "train")
            say(f"shards: {how}: {split.samples} training images in {len(split.shards)} shards, "
                f"{split.size}x{split.size}")
            result["shards"] = {"how": how, "samples": split.samples, "shards": len(split.shards), "size": split.size}
            if split.size != SIZE:
                say(f"NOTE: the shards are {split.size}x{split.size}, not {SIZE}x{SIZE}: not the paper's setting")
        if need_loader:
            threads = torch.get_num_threads()
            result["loader"] = loader_bench(args, src, split)
            torch.set_num_threads(threads)
        if not args.skip_step:
            by_batch = {b: step_bench(args, device, split, b, loader=args.loader_fed and k == 0)
                        for k, b in enumerate(args.batch)}
            result["step"] = by_batch[args.batch[0]]
            if len(by_batch) > 1:
                result["step_by_batch"] = by_batch
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":  # the loader's worker processes re-import this module
    main()
