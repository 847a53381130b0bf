"""Shared fixtures: every test makes its own small images; nothing outside the repository is needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexcli.data.demo import make_demo
from alexcli.data.prepare import PrepareConfig, prepare

SMALL = dict(train_per_class=6, val_per_class=2, min_side=24, max_side=70)


# Limits on waiting for a subprocess are there to end a hung test, not to measure speed: generous
# enough for 2 cores shared with other jobs, so a slow run is never a failure.
RUN_TIMEOUT = 1200


def run_cli(*args: str, cwd=None, env=None, timeout=RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `python -m alexcli ARGS` as a user would; returns the completed process."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "alexcli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# Typer words its own refusals of an option's value by version: 0.29 through pydantic ("Invalid
# value for '--size': Input should be less than or equal to 2048", "Value error, 'five' is not one
# of ..."), 0.28 and older through click ("100000 is not in the range 8<=x<=2048.", "'five' is not
# one of ..."). These patterns accept either and require what a user reads in both: the option, and
# the limit or the accepted values.
def out_of_range(option: str, bound) -> re.Pattern:
    """Typer's refusal of OPTION's value beyond BOUND (a min= or max= of the option)."""
    o, b = re.escape(option), re.escape(str(bound))
    return re.compile(rf"Invalid value for '{o}': (Input should be (less|greater) than or equal to {b}\b"
                      rf"|\S+ is not in the range \S*{b}\b)")


def not_one_of(option: str, value: str, values: str) -> re.Pattern:
    """Typer's refusal of VALUE for OPTION (a Choice), listing VALUES ("'center', 'ten'")."""
    return re.compile(rf"Invalid value for '{re.escape(option)}': (Value error, )?'{re.escape(value)}' is not "
                      rf"one of {re.escape(values)}")


def says(stderr: str, expected: str | re.Pattern) -> bool:
    """Whether STDERR holds EXPECTED: a string as it is, a pattern where it matches."""
    return bool(expected.search(stderr)) if isinstance(expected, re.Pattern) else expected in stderr


def weights(path) -> dict:
    """The model tensors of a checkpoint file."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def assert_same_weights(a, b) -> None:
    """Checkpoints A and B hold bit-identical weights."""
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def run_here(*args) -> subprocess.CompletedProcess:
    """`alexcli ARGS` in this process: what run_cli checks (exit code, stdout, stderr) without an
    interpreter and torch starting for every run (about 3 s each on 2 cores). For what needs a
    process of its own (signals, kill -9, a clean registry), use run_cli."""
    import contextlib
    import io

    from alexcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(["alexcli", *map(str, args)], code, out.getvalue(), err.getvalue())


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = RUN_TIMEOUT, log=None) -> None:
    """Poll CONDITION() until it holds while PROC runs: for tests that signal a process at a point
    it reports (a marker file it writes), never after a fixed sleep. Fails at once if PROC ends
    first, with its output (its pipes, or the file LOG); TIMEOUT only ends a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            printed = Path(log).read_text(errors="replace") if log else " ".join(
                s for s in proc.communicate() if s)
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}: {printed}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting until {what} (hung?)")
        time.sleep(0.02)


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
