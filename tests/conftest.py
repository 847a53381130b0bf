"""Shared fixtures: every test makes its own small images; nothing outside the repository is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexcli.data.demo import make_demo
from alexcli.data.prepare import PrepareConfig, prepare

SMALL = dict(train_per_class=6, val_per_class=2, min_side=24, max_side=70)


def run_cli(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m alexcli ARGS` as a user would; returns the completed process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "alexcli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-src")
    make_demo(root, seed=1, **SMALL)
    return root


@pytest.fixture(scope="session")
def prepared(demo_src, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared") / "demo"
    summary = prepare(demo_src, out, PrepareConfig(size=32, shard_size=16, workers=1, seed=3))
    return out, summary


# The smallest crop AlexNet's conv stack takes is 64x64: train on 72x72 with 64 crops.
TINY_TRAIN = ["--width", "0.125", "--crop", "64", "--batch", "8", "--init", "kaiming", "--loader-workers", "0",
              "--schedule", "steps", "--lr-steps", "2"]


@pytest.fixture(scope="session")
def train_data(demo_src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data") / "demo72"
    prepare(demo_src, out, PrepareConfig(size=72, shard_size=12, workers=1, seed=0))
    return out
