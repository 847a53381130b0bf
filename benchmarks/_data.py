"""What the benchmarks share: unpacking the sample photos, naming the CPU (run as scripts, they
import this from their own folder)."""

from __future__ import annotations

import platform
import tarfile
from pathlib import Path


def extract_tar(tar: Path, dest: Path) -> Path:
    with tarfile.open(tar) as tf:
        try:
            tf.extractall(dest, filter="data")  # Python >= 3.11.4 / 3.12: refuses unsafe members
        except TypeError:
            tf.extractall(dest)
    return dest


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
