"""What this machine and installation are: versions, which PIL is in use, cores, devices; the
`--device` rule and the CPU tuning a training process applies. Used by every command."""

from __future__ import annotations

import os
import platform
from pathlib import Path


# importlib.metadata is imported where it is used: it brings the email package, 20-40 ms of the
# start of every command that imports this module.

def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow),
    the one count every default (prepare's workers, the loaders' processes) starts from."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_name(name: str) -> str:
    """--device auto|cpu|cuda as a torch device name ("cuda" or "cpu"), or a one-line error."""
    import torch

    from alexcli.choices import Device, choice
    from alexcli.errors import UsageError

    name = choice(Device, name, "--device")
    if name == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == Device.cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible")
    return name.value


_WATCHED: list[int] = []  # the parent pid this process already watches


def die_with_parent() -> None:
    """A worker process (prepare's pool, the training loader's) exits as soon as the main process
    is gone, kill -9 included, rather than run on: on Linux the kernel sends SIGKILL (prctl
    PR_SET_PDEATHSIG); elsewhere, and as a backstop, a thread watches the parent pid. Once per
    process."""
    import os
    import signal
    import threading
    import time

    parent = os.getppid()
    if parent in _WATCHED:
        return
    _WATCHED.append(parent)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def torchrun_world() -> tuple[int, int] | None:
    """(WORLD_SIZE, LOCAL_WORLD_SIZE) when torchrun launched this process (RANK and WORLD_SIZE set),
    else None. A malformed value is one line naming the variable."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    from alexcli.errors import UsageError

    sizes = []
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(name, os.environ["WORLD_SIZE"])
        if not (value.isdigit() and int(value) >= 1):
            raise UsageError(f"{name}={value!r} in the environment: expected a number of ranks (torchrun sets it)")
        sizes.append(int(value))
    return sizes[0], sizes[1]


def start_method() -> str:
    """How to start a worker process that does not need torch (prepare's pool): "fork" on Linux when
    this process runs no thread but the calling one and has not imported torch, else "spawn".
    A forked worker starts at once with this process's modules; a spawned one is a new interpreter
    that imports them again (a quarter of a second). Fork only where it is safe: a lock another
    thread holds at the fork stays held for ever in the child, torch's thread pools and CUDA do not
    survive a fork, and macOS's system libraries do not support it."""
    import sys
    import threading

    if sys.platform.startswith("linux") and threading.active_count() == 1 and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def autocast_for(amp: str, device):
    """A context factory for --amp on the torch DEVICE (None for fp32): training, eval and the
    benchmarks all run under it."""
    if amp == "bf16":
        import torch

        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def pil_info() -> dict:
    """pillow-simd and Pillow both install the `PIL` package; report whose files are in use."""
    import PIL

    owner = pil_owner(Path(PIL.__file__).parent.parent, PIL.__version__)
    return {"package": owner, "version": PIL.__version__, "simd": owner == "pillow-simd"}


_PIL_DISTS = ("pillow-simd", "pillow")  # in this order: the same version in both is pillow-simd's


def pil_owner(site: Path, version: str) -> str:
    """Which of _PIL_DISTS put the PIL of VERSION in folder SITE: the one whose wheel record lists
    PIL/__init__.py and whose version is VERSION (with both installed, the other's record lists
    the file too). It reads the `NAME-VERSION.dist-info` folders beside PIL, which takes about a
    millisecond; importlib.metadata (30 ms: its import and a walk of sys.path) only when there are
    none, as for an egg install."""
    found: dict[str, Path] = {}
    try:
        with os.scandir(site) as entries:
            for e in entries:
                if e.name.endswith(".dist-info") and "-" in e.name:
                    name, ver = e.name[:-len(".dist-info")].split("-", 1)
                    name = name.lower().replace("_", "-").replace(".", "-")
                    if name in _PIL_DISTS and ver == version:
                        found[name] = Path(e.path) / "RECORD"
    except OSError:
        pass
    if not found:
        return _pil_owner_from_metadata(version)
    for dist in (d for d in _PIL_DISTS if d in found):
        try:
            record = found[dist].read_text(encoding="utf-8")
        except OSError:
            continue
        if _lists_pil(line.split(",", 1)[0] for line in record.splitlines()):
            return dist
    return "unknown"


def _lists_pil(paths) -> bool:
    """Whether a distribution's file list (RECORD's paths) holds PIL/__init__.py."""
    return any(str(p).replace("\\", "/") == "PIL/__init__.py" for p in paths)


def _pil_owner_from_metadata(version: str) -> str:
    import importlib.metadata as md

    for dist in _PIL_DISTS:
        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            continue
        if _lists_pil(d.files or []) and d.version == version:
            return dist
    return "unknown"


def devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu_cores": cpu_cores(),
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_cuda_build": torch.version.cuda,
    }


def report() -> dict:
    from alexcli import __version__
    from alexcli.data import stats

    return {
        "alexcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in
                     ("torch", "torchvision", "webdataset", "safetensors", "numpy", "typer", "rich")},
        "pil": pil_info(),
        # prepare's statistics: "c" (alexcli/data/_pixsums.c, built by setup.py where a C compiler
        # is present) or "numpy" (the same exact sums in three times the time)
        "stats_kernel": stats.KERNEL,
        "devices": devices(),
    }


def tune_malloc() -> bool:
    """Keep freed memory in the process on Linux/glibc. By default glibc hands every freed block
    above its mmap threshold back to the OS, and a CPU training step frees and allocates tensors of
    a few MB hundreds of times, each time faulting in fresh zeroed pages. A 32 MB threshold (glibc's
    largest) and a 1 GB trim threshold are most of why `tune_cpu` makes a CIFAR-10 epoch on 2 cores
    1.52x faster (56.4 s -> 37.2 s; benchmarks/cifar.py --cpu-tuning default, docs/performance.md).
    Returns whether it was applied (not on other C libraries)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 * 2**20)) and bool(mallopt(m_trim_threshold, 2**30))


def tune_cpu() -> dict:
    """What a CPU training process sets once: the allocator (tune_malloc) and flushing denormal
    floats to zero. A ReLU net that dies at a too-high learning rate fills its layers with
    denormals, on which x86 arithmetic is many times slower: one sweep epoch at lr 0.03 took 600 s
    instead of 45 s. Values under 1e-38 do not change what a network learns."""
    import torch

    return {"malloc": tune_malloc(), "flush_denormal": bool(torch.set_flush_denormal(True))}
