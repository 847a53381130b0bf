"""Benchmark: where a training step's device time goes, per layer kind, for each step configuration.

`benchmarks/train.py` says how fast each configuration is; this says why. For each configuration
it runs warm-up steps, then profiles STEPS steps with torch.profiler and sums the device time of
every kernel (CUDA) or operator's own time (CPU) into groups: convolution, matmul (fc layers),
pooling, activation and dropout, loss, optimizer, layout copies, and the elementwise rest. LRN
runs as a 1x1 band convolution plus elementwise kernels, so it has no group of its own: the
bf16-cl-nolrn column against bf16-cl gives its cost. Printed per configuration as ms per
step and share, and side by side as the ratio to the first configuration, so a target such as
"bf16 + channels-last >= 3x fp32" can be traced to the layers that fall short of it.

Configurations (one synthetic batch already on the device, the paper's net at 1000 classes):
  fp32          PyTorch's defaults (TF32 convolutions on CUDA)
  fp32-strict   TF32 off (CUDA only)
  bf16-cl       bf16 autocast + channels-last
  bf16-cl-g1    the same with one column (groups=1): what the grouped convolutions cost
  bf16-cl-nolrn the same with norm=none: what LRN costs

  python benchmarks/profile_step.py --device cuda                 # about a minute on a GPU
  .venv/bin/python benchmarks/profile_step.py --batch 8 --steps 1  # CPU: checks the code
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alexcli.model.registry import Arch, build_model  # noqa: E402
from alexcli.train.optim import PaperSGD  # noqa: E402
from _data import torch_device  # noqa: E402  (benchmarks/_data.py)
from train import make_step, without_tf32  # noqa: E402  (benchmarks/train.py: the same step, timed there)

CONFIGS = {  # name: (Arch changes, bf16 autocast + channels-last, TF32 allowed)
    "fp32": ({}, False, True),
    "fp32-strict": ({}, False, False),
    "bf16-cl": ({}, True, True),
    "bf16-cl-g1": ({"groups": 1}, True, True),
    "bf16-cl-nolrn": ({"norm": "none"}, True, True),
}
# Kernel or operator name fragments -> group, first match wins (names are lower-cased).
# Kernel or operator name fragments -> group, first match wins (names are lower-cased). cuDNN's
# convolution kernels are implicit GEMMs ("..._fprop_implicit_gemm_..."), so they are matched
# before plain GEMMs; on Hopper cuBLAS's GEMMs are "nvjet_..." or "..._gemm_...". Kernels that fit
# no rule land in the last group; the top kernels are printed too, so nothing hides there.
GROUPS = [
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd", "cudnn")),
    ("matmul (fc)", ("nvjet", "gemm", "cublas", "addmm", "matmul", "linear", "aten::mm")),
    ("pooling", ("pool",)),
    ("activation, dropout", ("relu", "threshold", "dropout", "bernoulli", "masked_scale")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "softmax")),
    ("optimizer", ("foreach", "multi_tensor")),
    ("layout, casts, copies", ("copy", "contiguous", "to_copy", "transpose", "permute", "nchwtonhwc",
                               "nhwctonchw")),
]
TOP = 8  # kernels listed per configuration


def group_of(name: str) -> str:
    n = name.lower()
    for group, keys in GROUPS:
        if any(k in n for k in keys):
            return group
    return "elementwise, other"


def build(device: torch.device, name: str):
    changes, fast, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(Arch(num_classes=1000, **changes))[0].to(device)
    if fast:
        model = model.to(memory_format=torch.channels_last)
    return model, PaperSGD(model.parameters(), lr=0.01)


def config_step(model, opt, name: str, device: torch.device):
    """CONFIGS[name]'s training step, built as benchmarks/train.py builds its configurations."""
    _, fast, tf32 = CONFIGS[name]
    step = make_step(model, opt, amp=fast, channels_last=fast, device=device)
    return step if tf32 else without_tf32(step)


def profile(step, x, y, device: torch.device, warmup: int, steps: int) -> tuple[dict[str, float], float, list]:
    """(ms per step by group, wall ms per step, the TOP kernels) over STEPS profiled steps after WARMUP."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(x, y)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    import time

    with torch_profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    groups: dict[str, float] = defaultdict(float)
    kernels: list[tuple[float, str]] = []
    for ev in prof.key_averages():
        # self time: a kernel's own time on the device, or an operator's own CPU time without the
        # operators it called, so nothing is counted twice
        if cuda:
            us = getattr(ev, "self_device_time_total", None)
            us = ev.self_cuda_time_total if us is None else us
        else:
            us = ev.self_cpu_time_total
        if us:
            ms = us / 1e3 / steps
            groups[group_of(ev.key)] += ms
            kernels.append((ms, ev.key))
    top = [{"name": k, "ms": ms} for ms, k in sorted(kernels, reverse=True)[:TOP]]
    return dict(groups), wall, top


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="profiled steps per configuration [default: %(default)s]")
    p.add_argument("--warmup", type=int, default=5, help="unprofiled steps first [default: %(default)s]")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated, from: " + ", ".join(CONFIGS))
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table on stderr)")
    args = p.parse_args(argv)
    out = sys.stderr if args.json else sys.stdout
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    device = torch_device(args.device)
    if device.type != "cuda":
        names = [n for n in names if n != "fp32-strict"]  # TF32 is a CUDA setting
    torch.backends.cudnn.benchmark = True  # as the trainer sets it
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {where}; torch {torch.__version__}; batch {args.batch}; {args.steps} profiled steps "
          f"after {args.warmup}; {'kernel' if device.type == 'cuda' else 'operator'} time by group", file=out)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    result = {"device": where, "batch": args.batch, "steps": args.steps, "ms_per_step": {}, "wall_ms_per_step": {},
              "top": {}}
    for name in names:
        model, opt = build(device, name)
        groups, wall, top = profile(config_step(model, opt, name, device), x, y, device, args.warmup, args.steps)
        result["ms_per_step"][name] = groups
        result["top"][name] = top
        result["wall_ms_per_step"][name] = wall
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for name in names:
        print(f"\n{name}: the {TOP} {'kernels' if device.type == 'cuda' else 'operators'} with the most time "
              f"(ms per step)", file=out)
        for k in result["top"][name]:
            print(f"  {k['ms']:8.2f}  {k['name'][:110]}", file=out)
    order = [g for g, _ in GROUPS] + ["elementwise, other"]
    base = names[0]
    print(f"\n{'group (ms per step)':<24}" + "".join(f"{n:>15}" for n in names)
          + "".join(f"{'x ' + n:>17}" for n in names[1:]), file=out)
    total = "total (device)" if device.type == "cuda" else "total (profiled)"
    for g in order + [total, "wall clock"]:
        if g == total:
            vals = [sum(result["ms_per_step"][n].values()) for n in names]
        elif g == "wall clock":
            vals = [result["wall_ms_per_step"][n] for n in names]
        else:
            vals = [result["ms_per_step"][n].get(g, 0.0) for n in names]
        if not any(vals):
            continue
        ratios = "".join(f"{(vals[0] / v if v else float('nan')):>17.2f}" for v in vals[1:])
        print(f"{g:<24}" + "".join(f"{v:>15.2f}" for v in vals) + ratios, file=out)
    print(f"\n(x NAME: {base}'s time over NAME's, so above 1 is faster than {base})", file=out)
    if args.json:
        print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
