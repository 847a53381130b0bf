"""What this installation is: versions, which PIL is in use, devices. Used by `alexcli doctor`."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def pil_info() -> dict:
    """pillow-simd and Pillow both install the `PIL` package; report whose files are in use."""
    import PIL

    owner = "unknown"
    for dist in ("pillow-simd", "pillow"):
        try:
            d = md.distribution(dist)
        except md.PackageNotFoundError:
            continue
        owns = any(str(f).replace("\\", "/") == "PIL/__init__.py" for f in (d.files or []))
        if owns and d.version == PIL.__version__:
            owner = dist
            break
    return {"package": owner, "version": PIL.__version__, "simd": owner == "pillow-simd"}


def devices() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "torch_cuda_build": torch.version.cuda,
    }


def report() -> dict:
    from alexcli import __version__

    return {
        "alexcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in
                     ("torch", "torchvision", "webdataset", "safetensors", "numpy", "typer", "rich")},
        "pil": pil_info(),
        "devices": devices(),
    }
