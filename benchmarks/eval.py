"""Benchmark: eval images/s (centre crop, ten patches) and an ensemble of 3 against 3 separate evals.

One process, the same prepared shards and the same device for everything. Three checkpoints of the
paper's network (random weights: speed does not depend on them) are written to a temporary folder;
then it times, each after a warm-up pass:

  eval centre     alexcli.evaluate.score([model]) with --crops center (models loaded beforehand)
  eval ten        the same with --crops ten (the ten patches of each image as one batch)
  3 separate      score([a]), score([b]), score([c]) one after another: three decodes of every image
  ensemble of 3   score([a, b, c]): each batch decoded once and scored by the three models

Target: the ensemble at least 2x faster than the 3 separate evals. That holds where decoding is a
large share of the cost (a GPU, or a small network on the CPU: --width); on a CPU the full-width
network's arithmetic dominates and the ratio tends to 1 -- the script prints both figures.

Data: --shards DIR (a prepared data set with a val or train split), else the ImageNet sample
archive that $ALEXCLI_SAMPLE_TAR names, prepared at 256x256 into a temporary folder, else the
generated demo set (the output says which).

  ALEXCLI_SAMPLE_TAR=/path/to/imagenet-sample-dev.tar .venv/bin/python benchmarks/eval.py   # CPU: quarter width
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
from alexcli.model.registry import Arch, build_model  # noqa: E402


def make_shards(tmp: Path) -> tuple[Path, str]:
    """The ImageNet sample ($ALEXCLI_SAMPLE_TAR), else generated demo images, prepared at 256x256."""
    from alexcli.data.prepare import PrepareConfig, prepare

    src, origin = source_tree(None, SAMPLE_ENV, "--shards", tmp)
    if src is None:
        from alexcli.data.demo import make_demo

        src = tmp / "demo"
        print(f"NOTE: {origin}; generating demo images (not real photos) in {src} ...", flush=True)
        make_demo(src, train_per_class=40, val_per_class=10, seed=0, min_side=300, max_side=500)
        origin = "GENERATED demo images (no real photos)"
    out = tmp / "shards"
    prepare(src, out, PrepareConfig(size=256, shard_size=64, workers=1))
    return out, f"{origin}, prepared at 256x256"


def make_checkpoints(tmp: Path, split, width: float, crop: int) -> list[str]:
    stats = dataset.load_stats(split.folder)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        arch = Arch(num_classes=len(split.classes), width=width, crop=crop)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="a prepared data set [default: the ImageNet sample archive "
                                                f"${SAMPLE_ENV} names, prepared; neither: demo images]")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--width", type=float, default=None, help="network width [default: 1 on cuda, 0.25 on cpu]")
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
    width = args.width if args.width is not None else (1.0 if device == "cuda" else 0.25)
    autocast = autocast_for(args.amp, dev)
    if device == "cpu":
        torch.set_num_threads(max(1, cpu_cores() // 2))

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        shards, origin = (args.shards, f"{args.shards} (--shards)") if args.shards else make_shards(tmp)
        name = "val" if _has(shards, "val") else "train"
        split = dataset.open_split(shards, name)
        crop = 224 if split.size >= 256 else max(64, (split.size * 7 // 8) // 2 * 2)  # the paper: 224 of 256
        # loaded once, outside the timing: a 60M-parameter checkpoint takes about a second to read,
        # verify and build, which on a 500-image sample would hide the scoring rate
        ckpts = [load_scored(p, torch.device(device)) for p in make_checkpoints(tmp, split, width, crop)]

        def run(paths, crops="center"):
            return lambda: score(paths, split, crops=crops, batch=args.batch, workers=args.workers,
                                 device=device, autocast=autocast)

        cases = {"eval centre": run(ckpts[:1]), "eval ten": run(ckpts[:1], "ten"),
                 "3 separate": lambda: [run([c])() for c in ckpts], "ensemble of 3": run(ckpts)}
        for fn in cases.values():  # warm-up: page cache, cudnn autotune, worker start
            fn()
        best = {k: min(timed(fn, device) for _ in range(args.repeat)) for k, fn in cases.items()}

    n = split.samples
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    result = {"machine": f"{platform.processor() or platform.machine()}, {cpu_cores()} cores"
                         + (f", {gpu}" if gpu else ""),
              "device": device, "torch": torch.__version__, "pil": pil_info(), "alexcli": __version__,
              "data": origin, "images": n, "split": name, "size": split.size, "crop": crop, "width": width, "batch": args.batch,
              "workers": args.workers, "amp": args.amp,
              "images_per_s": {k: n / v for k, v in best.items()},
              "ensemble_speedup": best["3 separate"] / best["ensemble of 3"]}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['machine']}; {device}; torch {torch.__version__}; PIL {result['pil']['package']} "
          f"{result['pil']['version']}; {n} {name} images {split.size}x{split.size}, crop {crop}, width {width}, "
          f"batch {args.batch}, {args.workers} loader workers, amp {args.amp}")
    print(f"data: {origin}")
    for k, v in result["images_per_s"].items():
        print(f"  {k:<14} {v:>9,.0f} images/s" + ("  (per model: x3)" if k == "ensemble of 3" else ""))
    print(f"ensemble of 3 / 3 separate evals: {result['ensemble_speedup']:.2f}x faster (target >= 2)")


def _has(folder, split) -> bool:
    return dataset.has_split(dataset.read_manifest(folder), split)


if __name__ == "__main__":
    main()
