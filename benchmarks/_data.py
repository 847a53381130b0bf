"""What the benchmarks share: finding and unpacking the sample photos, naming the CPU and the
software (`machine`), timing a call (`best_seconds`), turning --device into a torch.device (run as scripts, they import this from their own folder). The core
count is alexcli.env.cpu_cores, as for the package. Only the standard library is imported at the
top: pil_speed.py imports this without torch.

Where the photos come from, in order: the script's own option (a folder or an archive, e.g.
--source, --data, --tar), else the archive an environment variable names:

  ALEXCLI_SAMPLE_TAR   the ImageNet sample archive: a tar of train/<class>/<image> photos
                       (imagenet-sample-dev.tar, 500 photos, one per class)
  ALEXCLI_CIFAR_TAR    CIFAR-10's training images as train/<class>/*.jpg in a .tar.gz
                       (cifar10-train.tar.gz)

When neither is given each script says what it does instead: generated demo images (said so in
its output) or a one-line error. Nothing here knows where the archives live on a given machine.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

SAMPLE_ENV = "ALEXCLI_SAMPLE_TAR"
CIFAR_ENV = "ALEXCLI_CIFAR_TAR"


def extract_tar(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as tf:
        try:
            tf.extractall(dest, filter="data")  # Python >= 3.11.4 / 3.12: refuses unsafe members
        except TypeError:
            tf.extractall(dest)
    return dest


def archive(given: Path | None, env: str, option: str) -> tuple[Path | None, str]:
    """(the archive, where it came from): GIVEN (the value of OPTION) when set, else $ENV; None and
    a line saying that neither was given. An archive named but not there is a one-line error."""
    if given is not None:
        path, how = Path(given), option
    elif os.environ.get(env):
        path, how = Path(os.environ[env]), f"${env}"
    else:
        return None, f"no {option} given and ${env} is not set"
    if not path.is_file():
        sys.exit(f"error: {how} {path}: no such file")
    return path, f"{path} ({how})"


def source_tree(given: Path | None, env: str, option: str, tmp: Path) -> tuple[Path | None, str]:
    """A photo tree with train/<class>/<image> and where it came from: GIVEN itself when it is a
    folder; GIVEN, else the archive $ENV names, extracted to TMP/src; (None, why) when neither is
    given (the caller falls back or stops)."""
    if given is not None and Path(given).is_dir():
        root, origin = Path(given), f"{given} ({option})"
    elif given is not None and not Path(given).exists():
        sys.exit(f"error: {option} {given}: no such folder or archive")
    else:
        tar, origin = archive(given, env, option)
        if tar is None:
            return None, origin
        root = extract_tar(tar, tmp / "src")
        origin = f"{origin}, extracted"
    if not (root / "train").is_dir():
        sys.exit(f"error: {origin}: expected train/<class>/<image> in it")
    return root, origin


def torch_device(name: str):
    """--device auto|cpu|cuda as a torch.device, by alexcli.env.device_name (the rule `alexcli`
    applies): CUDA with the current device's index, so memory and name queries name one GPU. CUDA
    asked for but not visible is a one-line exit that says which torch this is."""
    import torch

    from alexcli.env import device_name
    from alexcli.errors import UsageError

    try:
        name = device_name(name)
    except UsageError as e:
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        sys.exit(f"error: {e} (torch {torch.__version__}, {built}); use --device cpu or auto")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device("cpu")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def best_seconds(fn, repeat: int) -> float:
    """The fastest of REPEAT calls of FN, in seconds."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine(device) -> dict:
    """The machine and the software a benchmark ran on, for its JSON: CPU, cores, versions, the PIL
    in use, and on CUDA the GPU and the settings the trainer sets."""
    import PIL.features
    import torch
    import torchvision

    from alexcli import __version__
    from alexcli.env import cpu_cores, pil_info

    try:
        import webdataset
        wds = getattr(webdataset, "__version__", "installed")
    except ImportError:
        wds = None
    info = {"cpu": cpu_model(), "cores": cpu_cores(), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "webdataset": wds,
            "alexcli": __version__, "pil": pil_info(),
            "libjpeg_turbo": PIL.features.version("jpg") if PIL.features.check_feature("libjpeg_turbo") else None,
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return info
