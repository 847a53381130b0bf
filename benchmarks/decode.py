"""Benchmark: where the training shards' JPEGs can be decoded and how fast (PIL in one process and
in N at once, nvJPEG on the GPU), and how far nvJPEG's pixels are from PIL's (the loader keeping up).

All rows use the same --images JPEGs of the train split (default 512, repeated where it has fewer),
held in memory, in batches of --batch:

1. CPU, one process, 1 torch thread, ms/image and images/s, best of --repeat passes:
  PIL decode_batch          alexcli.data.stream.decode_batch, what the training loader runs (PIL,
                            pillow-simd where installed)
  torchvision decode_jpeg   torchvision.io.decode_jpeg on the CPU (libjpeg-turbo), stacked likewise
2. CPU, N processes at once (--procs, default 1, half the cores, cores - 1; forked, 1 torch thread
   each), each decoding all the JPEGs with decode_batch, each of --repeat passes started together by
   a barrier: images/s = N x images / the slowest one's time (the best pass), ms/image per process
   (their mean), scaling = that / one process's images/s (ideal: N).
3. GPU (CUDA only): stream.images_on(stream.pack(batch)), nvJPEG through torchvision as `train
   --decode device` runs it, at --batch, 2x and 4x (at most --images), after 3 warm-up calls,
   synchronised, best of --repeat rounds of at least 1024 images: with pack() in the timed loop and
   with the batches packed beforehand (in training the loader processes pack), and pack's ms/batch.
4. Pixels, nvJPEG vs PIL (on the CPU: torchvision's CPU decoder vs PIL, labelled so) over the
   distinct images: max and mean |diff|, the share of values that differ, the mean signed diff per
   channel, in 0..255 levels. For scale, the std per channel in levels of the paper's PCA colour
   noise as alexcli.transforms.pca adds it (alpha ~ N(0, 0.1) per eigenvector, noise = eigvecs @
   (alpha * eigvals), eigvals of the 0..1 covariance: x255), from the data set's stats
   (dataset.load_stats), else from PIL's pixels of these images (said so).
5. What it means: the CPU's images/s at the largest N against the GPU's, and the share F of every
   batch the GPU must decode (`train --decode mixed --decode-share F`: the first round(F x B) images
   on the GPU, the rest by PIL in the loader processes) for the CPU to keep up with --step-rate
   (default 25,000 images/s, the step's target on an H100/H200): F >= 1 - cpu/step. If the GPU's
   decode adds to the step's time, the rate at F is 1 / (1/step + F/gpu); the F where the CPU just
   keeps up is given too. Decode alone: reading, shuffling and the main process's work come on top.

A part that fails prints `part N FAILED: ...` and the next goes on; the exit code is 0 unless nothing
was measured. Data: --shards DIR (a prepared data set), else shards/imagenet-sample, else 128
generated demo images (not photos; said so) prepared at 256x256 into a temporary folder. Shards are
read by alexcli.data.tar.read_samples, the training loader's reader.

  .venv/bin/python benchmarks/decode.py --device cpu                  # CPU: about 15 s on 2 cores
  python3 benchmarks/decode.py --device cuda --json > decode.json     # GPU: well under a minute
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from _data import best_seconds, machine, torch_device  # noqa: E402  (benchmarks/_data.py)

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli.data import dataset, stream  # noqa: E402
from alexcli.env import cpu_cores, pil_info  # noqa: E402

DEFAULT_SHARDS = REPO / "shards" / "imagenet-sample"
GPU_ROUND = 1024  # images at least in a timed GPU round
OUT = sys.stdout  # the human-readable lines; stderr with --json, whose object alone goes to stdout


def say(*parts) -> None:
    print(*parts, file=OUT, flush=True)


def failed(result: dict, part: str, exc: BaseException) -> None:
    msg = result.setdefault("failed", {})[part] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    say(f"part {part} FAILED: {msg}")


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def tv_decode(jpgs: list[bytes]) -> torch.Tensor:
    """torchvision's CPU decoder (libjpeg-turbo) over a batch, stacked as decode_batch's are."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image codecs deprecated
        frames = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpgs]
        return torch.stack(decode_jpeg(frames, mode=ImageReadMode.RGB))


# ---------------------------------------------------------------- data

def read_jpgs(split, cap: int) -> list[bytes]:
    """The first CAP JPEGs of SPLIT's shards, read by the training loader's reader."""
    from alexcli.data.tar import read_samples

    jpgs: list[bytes] = []
    for entry in split.shards:
        for s in read_samples(split.path(entry), entry["samples"]):
            jpgs.append(s.jpg)
            if len(jpgs) >= cap:
                return jpgs
    return jpgs


def demo_jpgs(tmp: Path, cap: int):
    """(JPEGs, where from, split): 128 demo images prepared at 256x256."""
    from alexcli.data.config import PrepareConfig
    from alexcli.data.demo import make_demo
    from alexcli.data.prepare import prepare

    src = tmp / "demo"
    make_demo(src, train_per_class=16, val_per_class=0, seed=0, min_side=256, max_side=384, broken=False)
    prepare(src, tmp / "shards", PrepareConfig(size=256, shard_size=32, workers=min(4, cpu_cores())))
    split = dataset.open_split(tmp / "shards", "train")
    return read_jpgs(split, cap), "GENERATED demo images (not photos), prepared at 256x256", split


# ---------------------------------------------------------------- 1. and 2. the CPU

def cpu_one(jpgs: list[bytes], batch: int, repeat: int, result: dict) -> None:
    say(f"\n1. CPU decode, one process, 1 torch thread, batches of {batch}, best of {repeat}:")
    rows = result["cpu_one"] = {}
    for name, fn, note in (("PIL decode_batch", stream.decode_batch, pil_info()["package"]),
                           ("torchvision decode_jpeg", tv_decode, "CPU, libjpeg-turbo")):
        try:
            parts = chunks(jpgs, batch)
            fn(parts[0])  # warm-up
            s = best_seconds(lambda: [fn(c) for c in parts], repeat)
            rows[name] = {"images_per_s": len(jpgs) / s, "ms_per_image": s / len(jpgs) * 1e3}
            say(f"  {name:<24} {s / len(jpgs) * 1e3:7.3f} ms/image {len(jpgs) / s:9,.0f} images/s ({note})")
        except Exception as exc:  # noqa: BLE001
            failed(result, f"1 ({name})", exc)
    if not rows:
        del result["cpu_one"]


def _proc(jpgs: list[bytes], batch: int, repeat: int, barrier, queue) -> None:
    """One decoding process: warm up on a batch, then REPEAT passes over all JPEGs, each started
    together with the others' by the barrier; reports the pass times."""
    try:
        torch.set_num_threads(1)
        parts, times = chunks(jpgs, batch), []
        stream.decode_batch(parts[0])
        for _ in range(repeat):
            barrier.wait(timeout=60)
            t0 = time.perf_counter()
            for c in parts:
                stream.decode_batch(c)
            times.append(time.perf_counter() - t0)
        queue.put(("ok", times))
    except BaseException as exc:  # noqa: BLE001 -- the parent says what went wrong
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
        barrier.abort()  # nobody waits for this one


def cpu_procs(jpgs: list[bytes], batch: int, repeat: int, procs: list[int], result: dict) -> None:
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    say(f"\n2. CPU decode, N processes at once ({ctx.get_start_method()}ed, 1 torch thread each), each decoding the "
        f"{len(jpgs)} JPEGs with decode_batch, best of {repeat}:\n  {'N':>3} {'images/s':>10} "
        f"{'ms/image/process':>17} {'scaling':>8}")
    rows = result["cpu_procs"] = {}
    one = result.get("cpu_one", {}).get("PIL decode_batch", {}).get("images_per_s")
    for n in procs:
        workers = []
        try:
            barrier, queue = ctx.Barrier(n + 1), ctx.Queue()
            workers = [ctx.Process(target=_proc, args=(jpgs, batch, repeat, barrier, queue), daemon=True)
                       for _ in range(n)]
            for w in workers:
                w.start()
            try:
                for _ in range(repeat):
                    barrier.wait(timeout=60)
            except threading.BrokenBarrierError:
                raise RuntimeError(f"a process failed: {queue.get(timeout=5)[1]}") from None
            got = [queue.get(timeout=120) for _ in workers]
            errors = [v for k, v in got if k != "ok"]
            if errors:
                raise RuntimeError(f"{len(errors)} of {n} processes: {errors[0]}")
            r = min(range(repeat), key=lambda i: max(t[i] for _, t in got))  # the pass whose slowest was fastest
            times = [t[r] for _, t in got]
            rate = n * len(jpgs) / max(times)
            one = rate if n == 1 else one  # the scaling's base: one process in the same conditions
            rows[str(n)] = row = {"images_per_s": rate, "ms_per_image_per_process": sum(times) / n / len(jpgs) * 1e3,
                                  "slowest_s": max(times), "scaling": rate / one if one else None}
            say(f"  {n:>3} {rate:>10,.0f} {row['ms_per_image_per_process']:>17.3f} {row['scaling'] or math.nan:>8.2f}")
        except Exception as exc:  # noqa: BLE001
            failed(result, f"2 (N={n})", exc)
        finally:
            for w in workers:
                w.join(timeout=10)
                if w.is_alive():
                    w.terminate()
    if not rows:
        del result["cpu_procs"]


# ---------------------------------------------------------------- 3. and 4. the GPU, the pixels

def gpu_decode(jpgs: list[bytes], device: torch.device, batch: int, repeat: int, result: dict) -> None:
    passes = math.ceil(GPU_ROUND / len(jpgs))
    say(f"\n3. GPU decode, stream.images_on (nvJPEG through torchvision) on {device}, {passes * len(jpgs)} images "
        f"a round, best of {repeat} after 3 warm-up calls:\n  {'batch':>6} {'images/s, pack in loop':>23} "
        f"{'packed beforehand':>18} {'pack ms/batch':>14}")
    rows = result["gpu"] = {}
    for b in [b for b in (batch, 2 * batch, 4 * batch) if b <= len(jpgs)] or [len(jpgs)]:
        try:
            parts = chunks(jpgs, b)
            packed = [stream.pack(c) for c in parts]
            for _ in range(3):
                stream.images_on(packed[0], device)

            def run(with_pack: bool) -> None:
                torch.cuda.synchronize(device)
                for _ in range(passes):
                    for c, p in zip(parts, packed):
                        stream.images_on(stream.pack(c) if with_pack else p, device)
                torch.cuda.synchronize(device)

            n = passes * len(jpgs)
            rate, packed_rate = n / best_seconds(lambda: run(True), repeat), n / best_seconds(lambda: run(False), repeat)
            pack_ms = best_seconds(lambda: [stream.pack(c) for c in parts], repeat) / len(parts) * 1e3
            rows[str(b)] = {"images_per_s": rate, "images_per_s_packed": packed_rate, "pack_ms_per_batch": pack_ms}
            say(f"  {b:>6} {rate:>23,.0f} {packed_rate:>18,.0f} {pack_ms:>14.2f}")
        except Exception as exc:  # noqa: BLE001 -- e.g. out of memory: report it, try no larger batch
            failed(result, f"3 (batch {b})", exc)
            break
    if not rows:
        del result["gpu"]


def pixel_diff(jpgs: list[bytes], split, device: torch.device, batch: int, result: dict) -> None:
    cuda = device.type == "cuda"
    what = "nvJPEG (GPU) vs PIL" if cuda else "torchvision's CPU decode_jpeg vs PIL (no GPU here)"
    say(f"\n4. pixels, {what}, over {len(jpgs)} distinct images, in 0..255 levels:")
    stats = dataset.load_stats(split.folder)
    eigval, eigvec = stats["pca_eigval"].double(), stats["pca_eigvec"].double()
    d_max, differ, values = 0, 0, 0
    d_abs, d_signed = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    for c in chunks(jpgs, batch):
        ref = stream.decode_batch(c).to(torch.int16)
        other = stream.images_on(stream.pack(c), device).cpu() if cuda else tv_decode(c)
        d = other.to(torch.int16) - ref
        a = d.abs()
        d_max, differ, values = max(d_max, int(a.max())), differ + int((a != 0).sum()), values + d.numel()
        d_abs += a.sum((0, 2, 3))
        d_signed += d.sum((0, 2, 3))
    row = result["pixels"] = {
        "compared": what, "images": len(jpgs), "max_abs": d_max, "mean_abs": float(d_abs.sum()) / values,
        "mean_abs_per_channel": (d_abs / (values / 3)).tolist(), "share_differing": differ / values,
        "mean_signed_per_channel": (d_signed / (values / 3)).tolist()}
    say(f"  max |diff| {d_max}, mean |diff| {row['mean_abs']:.3f} (R,G,B "
        f"{', '.join(f'{v:.3f}' for v in row['mean_abs_per_channel'])}), values differing "
        f"{row['share_differing']:.1%}, mean signed diff R,G,B "
        f"{', '.join(f'{v:+.3f}' for v in row['mean_signed_per_channel'])}")
    from alexcli.transforms import PCA_STD

    # noise_c = sum_k eigvec[c, k] * alpha_k * eigval_k, alpha_k ~ N(0, PCA_STD) independent; x255: levels
    std = row["pca_noise_std_per_channel"] = (PCA_STD * 255 * ((eigvec * eigval[None, :]) ** 2).sum(1).sqrt()).tolist()
    say(f"  {'nvJPEG' if cuda else 'torchvision-CPU'}-vs-PIL mean |diff| is {row['mean_abs']:.3f} levels against the "
        f"PCA noise's per-channel std of {', '.join(f'{v:.2f}' for v in std)} levels (R,G,B)")


# ---------------------------------------------------------------- 5. what it means

def meaning(step: float, batch: int, cores: int, result: dict) -> None:
    procs, one = result.get("cpu_procs", {}), result.get("cpu_one", {}).get("PIL decode_batch")
    if procs:
        n = max(procs, key=int)
        cpu, how = procs[n]["images_per_s"], f"{n} processes (part 2)"
    elif one:
        cpu, how = one["images_per_s"] * max(1, cores - 1), f"ESTIMATED: 1 process's rate x {max(1, cores - 1)}"
    else:
        return say("\n5. what it means: no CPU rate, nothing to say")
    gpu_rows = result.get("gpu", {})
    gpu_batch = str(batch) if str(batch) in gpu_rows else next(iter(gpu_rows), None)
    gpu = gpu_rows[gpu_batch]["images_per_s_packed"] if gpu_batch else None
    share = min(1.0, max(0.0, 1 - cpu / step))
    out = result["meaning"] = {"cpu_images_per_s": cpu, "cpu_from": how, "gpu_images_per_s": gpu,
                               "step_rate": step, "decode_share_min": share}
    say(f"\n5. what it means, against a training step of {step:,.0f} images/s:\n  CPU decode with {how}: "
        f"{cpu:,.0f} images/s; " + (f"GPU decode (batch {gpu_batch}, packed beforehand): {gpu:,.0f} images/s"
                                    if gpu else "no GPU rate"))
    default = str(min(stream.MAX_GPU_LOADER_WORKERS, cores - 1))  # stream.loader_workers on a GPU
    if default in procs and default != max(procs, key=int):
        say(f"  (with the trainer's default number of loader workers here, {default}: "
            f"{procs[default]['images_per_s']:,.0f} images/s)")
    say(f"  for the CPU processes to keep up, the GPU must decode at least F = 1 - cpu/step = {share:.2f} of every "
        f"batch: try `alexcli train --decode mixed --decode-share {math.ceil(share * 100) / 100:.2f}`")
    if gpu:
        at_share = 1 / (1 / step + share / gpu)
        best = min(1.0, max(0.0, (1 / cpu - 1 / step) / (1 / cpu + 1 / gpu)))  # where (1 - F) r = cpu
        best_rate = 1 / (1 / step + best / gpu)
        out.update(rate_at_share_if_serial=at_share, decode_share_balanced=best, rate_balanced=best_rate)
        say(f"  if the GPU's decode adds to the step's time: {at_share:,.0f} images/s at F = {share:.2f}; the CPU "
            f"just keeps up at F = {best:.2f}, {best_rate:,.0f} images/s")
    say("  (decode alone: reading, shuffling and the main process's own work come on top)")


# ---------------------------------------------------------------- main

def _procs(text: str) -> list[int]:
    try:
        ns = sorted({int(n) for n in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected process counts separated by commas, not {text!r}")
    if ns[0] < 1:
        raise argparse.ArgumentTypeError("process counts must be at least 1")
    return ns


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a prepared data set [default: shards/imagenet-sample, else demo images]")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128, help="JPEGs a batch [default: %(default)s]")
    p.add_argument("--repeat", type=int, default=3, help="timed passes, the best counts [default: %(default)s]")
    p.add_argument("--procs", type=_procs, help="process counts of part 2 [default: 1, half the cores, cores - 1]")
    p.add_argument("--images", type=int, default=512, help="JPEGs used [default: %(default)s]")
    p.add_argument("--step-rate", type=float, default=25_000.0, help="the training step's images/s [default: 25000]")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the text goes to stderr)")
    args = p.parse_args(argv)
    for name in ("batch", "repeat", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.step_rate <= 0:
        p.error("--step-rate must be positive")
    if args.shards is not None and not args.shards.is_dir():
        p.error(f"--shards {args.shards}: {'not a folder' if args.shards.exists() else 'no such folder'}")
    cores = cpu_cores()
    args.procs = args.procs or sorted({1, max(1, cores // 2), max(1, cores - 1)} | ({cores} if cores == 2 else set()))
    return p, args


def main(argv=None) -> int:
    global OUT
    p, args = parse_args(argv)
    OUT = sys.stderr if args.json else sys.stdout
    device = torch_device(args.device)
    torch.set_num_threads(1)  # decoding is one thread a process; nvJPEG needs no CPU threads of torch's
    m = machine(device)
    say(f"machine: {m['cpu']}, {m['cores']} cores; " + (f"GPU {m['gpu']}, CUDA {m['cuda']}" if m["gpu"] else "no GPU"))
    say(f"software: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, webdataset "
        f"{m['webdataset']}, alexcli {m['alexcli']}, PIL {m['pil']['package']} {m['pil']['version']}, "
        f"libjpeg-turbo {m['libjpeg_turbo']}")
    result = {"machine": m, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    tmp = Path(tempfile.mkdtemp(prefix="alexcli-bench-decode-"))
    try:
        folder, split = args.shards or (DEFAULT_SHARDS if DEFAULT_SHARDS.is_dir() else None), None
        if folder is not None:
            try:
                split = dataset.open_split(folder, "train")
                jpgs = read_jpgs(split, args.images)
            except Exception as exc:  # noqa: BLE001 -- not a prepared data set, an unreadable shard
                p.error(f"{folder}: {exc}")
            origin = str(folder)
        else:
            say(f"NOTE: no {DEFAULT_SHARDS.relative_to(REPO)} and no --shards: generating demo images in {tmp} ...")
            t0 = time.perf_counter()
            jpgs, origin, split = demo_jpgs(tmp, args.images)
            origin += f" in {time.perf_counter() - t0:.1f} s (not timed)"
        if not jpgs:
            p.error(f"{origin}: no JPEGs in the train split")
        distinct, jpgs = jpgs, (jpgs * math.ceil(args.images / len(jpgs)))[:max(args.images, len(jpgs))]
        say(f"data: {origin}: {len(distinct)} distinct JPEGs of {sum(map(len, distinct)) / len(distinct) / 1e3:.1f} kB "
            f"on average" + (f", repeated to {len(jpgs)}" if len(jpgs) > len(distinct) else ""))
        result["data"] = {"origin": origin, "distinct": len(distinct), "images": len(jpgs),
                          "mean_bytes": sum(map(len, distinct)) / len(distinct)}
        parts = [("1", cpu_one, (jpgs, args.batch, args.repeat)),
                 ("2", cpu_procs, (jpgs, args.batch, args.repeat, args.procs)),  # before any CUDA work: they fork
                 ("3", gpu_decode, (jpgs, device, args.batch, args.repeat)),
                 ("4", pixel_diff, (distinct, split, device, args.batch)),
                 ("5", meaning, (args.step_rate, args.batch, m["cores"]))]
        for name, fn, fargs in parts:
            if name == "3" and device.type != "cuda":
                say("\n3. GPU decode: skipped (no CUDA device)")
                continue
            try:
                fn(*fargs, result)
            except Exception as exc:  # noqa: BLE001 -- each part on its own
                failed(result, name, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0 if any(k in result for k in ("cpu_one", "cpu_procs", "gpu", "pixels")) else 1


if __name__ == "__main__":
    sys.exit(main())
