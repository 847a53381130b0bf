"""scripts/device_check.sh, the one run a session lent a GPU gets: checked here without running its
steps, so that a broken script is found before device time is spent on it (a fresh machine costs
minutes; the whole lease is 15). The script runs with a stand-in for Python that records each
command and prints "{}"; the CUDA settings are the ones checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"
MAX_FILES_BACK = 8  # the device returns at most 8 files


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    log, out = tmp / "commands.log", tmp / "out"
    fake = tmp / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
if [[ "$1" == "-" ]]; then exec {sys.executable} "$@"; fi  # the script's own small merge step
if [[ "$1" == "-m" && "$2" == "pip" ]]; then exit 0; fi
echo "{{}}"
""")
    fake.chmod(0o755)
    env = dict(os.environ, DEVICE="cuda", PY=str(fake), OUT=str(out), BUDGET="400",
               PATH=f"{tmp}:{os.environ['PATH']}")
    (tmp / "nvidia-smi").write_text("#!/bin/sh\necho 'name, memory.total'\n")
    (tmp / "nvidia-smi").chmod(0o755)
    r = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    return r, log.read_text().splitlines(), out


def test_the_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_step_runs_and_none_fails(dry):
    r, commands, _ = dry
    assert r.returncode == 0, r.stdout + r.stderr
    steps = re.findall(r"^=== (.+): exit 0 after \d+ s ===$", r.stdout, re.M)
    assert len(steps) == 9, r.stdout  # 8 numbered parts; the 4th is train, then eval of its checkpoint
    assert "device_check: 0 step(s) failed" in r.stdout


def test_at_most_eight_files_come_back_and_the_header_names_them(dry):
    _, _, out = dry
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(names) <= MAX_FILES_BACK, names
    header = SCRIPT.read_text().split("set -uo pipefail")[0]
    for name in names:
        assert name in header, f"{name} is written to $OUT but the script's header does not list it"


def test_the_benchmarks_accept_the_options_the_script_gives(dry, tmp_path):
    """train.py and decode.py parse what the script passes them (a misspelt option would cost a
    device run). The sample's shards are made by `--prepare` and not in a fresh clone: an empty
    folder stands in for them (decode.py checks that --shards is a folder)."""
    _, commands, _ = dry
    here = str(tmp_path)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import decode
        import train
    finally:  # benchmarks/ stays off the path, and its top-level module names out of sys.modules
        sys.path.remove(str(REPO / "benchmarks"))
        for name in ("train", "decode", "_data"):
            sys.modules.pop(name, None)
    seen = {"train": 0, "decode": 0}
    for line in commands:
        words = [here if w == "shards/imagenet-sample" else w for w in line.split()]
        if not words or not words[0].startswith("benchmarks/"):
            continue
        name = Path(words[0]).stem
        if name in seen:
            (train if name == "train" else decode).parse_args(words[1:])
            seen[name] += 1
    assert seen == {"train": 2, "decode": 1}, commands


def test_the_gpu_runs_include_the_multi_gpu_code_on_one_gpu(dry):
    _, commands, _ = dry
    text = "\n".join(commands)
    assert "--gpus 2 --rank-devices cuda:0,cuda:0" in text
    assert "tests/test_columns.py" in text and "tests/test_ranks.py" in text
    assert "--decode cpu,device,mixed:0.5" in text


def test_the_two_training_runs_are_merged_into_one_file(dry):
    import json

    _, _, out = dry
    merged = json.loads((out / "train.json").read_text())
    assert merged == {"gpus1": {}, "gpus1_metrics": [], "gpus2_shared": {}}  # the stand-in printed {}
