"""A disk that fills up under prepare and train: one line naming the file and the space, nothing
half-written under a final name, and the same command finishes once there is room.

The small disk is a real tmpfs, mounted in a private user and mount namespace (`unshare -rm`), so
no root is needed and nothing outside the test sees it. Where the machine does not allow that (no
user namespaces, no unshare), the tests are skipped with the reason."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alexcli.data.prepare import PrepareConfig, prepare
from conftest import TINY_TRAIN


def _probe() -> str | None:
    """None if a tmpfs can be mounted here without root, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


WHY = _probe()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"disk-full tests need a small tmpfs: {WHY}")


def on_small_disk(tmp_path: Path, kb: int, steps: list[str]) -> Path:
    """Run STEPS (shell lines; $DISK is the mount point) with a KB-sized tmpfs mounted at
    tmp_path/disk, each step's exit code in tmp_path/rc<i> and stderr in tmp_path/err<i>."""
    disk = tmp_path / "disk"
    disk.mkdir()
    lines = [f"mount -t tmpfs -o size={kb}k tmpfs {shlex.quote(str(disk))} || exit 99", f"DISK={shlex.quote(str(disk))}"]
    for i, step in enumerate(steps):
        lines.append(f"{step} 2> {tmp_path}/err{i}; echo $? > {tmp_path}/rc{i}")
    r = subprocess.run(["unshare", "-rm", "bash", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=600)
    assert r.returncode != 99, r.stderr
    return tmp_path


def rc(tmp_path: Path, i: int) -> int:
    return int((tmp_path / f"rc{i}").read_text())


def last_line(tmp_path: Path, i: int) -> str:
    return (tmp_path / f"err{i}").read_text().strip().splitlines()[-1]


def alexcli(*args) -> str:
    return " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "alexcli", *args])


def test_prepare_on_a_full_disk_fails_in_one_line_and_finishes_when_there_is_room(demo_src, tmp_path):
    ref = tmp_path / "ref"
    prepare(demo_src, ref, PrepareConfig(size=32, shard_size=16, workers=1))
    cmd = alexcli("prepare", demo_src, "--out", "$DISK/out", "--size", "32", "--shard-size", "16",
                  "--workers", "1").replace("'$DISK/out'", '"$DISK/out"')
    listing = f"{tmp_path}/files.json"
    on_small_disk(tmp_path, 48, [
        cmd,
        f"{sys.executable} -c \"import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); "
        f"json.dump(sorted(str(p.relative_to(d)) for p in d.rglob('*') if p.is_file()), open(sys.argv[2], 'w'))\" "
        f"\"$DISK/out\" {listing}",
        "mount -o remount,size=20m \"$DISK\"",
        cmd,
        f"cp -r \"$DISK/out\" {tmp_path}/copy",
    ])
    assert rc(tmp_path, 0) == 1
    line = last_line(tmp_path, 0)
    assert line.startswith(f"error: {tmp_path / 'disk' / 'out'}/") and ": no space left on device (" in line, line
    assert "free some space and run the same command again" in line and "images still to write" in line, line
    left = json.loads(Path(listing).read_text())
    assert not [n for n in left if n.endswith(".tmp")], left  # nothing half-written
    assert "dataset.json" not in left
    for name in left:  # every shard under its final name is complete: its record was written first
        if name.endswith(".tar"):
            assert f".partial/{name[:-4]}.safetensors" in left, left
    assert rc(tmp_path, 3) == 0, (tmp_path / "err3").read_text()
    for p in sorted(ref.glob("*.tar")) + [ref / "stats.safetensors"]:
        assert (tmp_path / "copy" / p.name).read_bytes() == p.read_bytes(), p.name


def test_train_on_a_full_disk_fails_in_one_line_and_a_rerun_works(train_data, tmp_path):
    cmd = alexcli("train", "--data", train_data, "--out", "$DISK/run", *TINY_TRAIN, "--epochs", "1",
                  "--steps-per-epoch", "2").replace("'$DISK/run'", '"$DISK/run"')
    on_small_disk(tmp_path, 256, [
        cmd,
        f"ls -A \"$DISK/run\" > {tmp_path}/left.txt",
        "mount -o remount,size=50m \"$DISK\"",
        cmd + " --resume",
        cmd,
        f"ls -A \"$DISK/run\" > {tmp_path}/after.txt",
    ])
    assert rc(tmp_path, 0) == 1
    line = last_line(tmp_path, 0)
    assert line.startswith(f"error: {tmp_path / 'disk' / 'run' / 'ckpt-e001.safetensors'}: no space left on device ("), line
    assert "this file needs" in line and "MB" in line, line
    assert (tmp_path / "left.txt").read_text().split() == []  # no .tmp, no lock, no half checkpoint
    assert rc(tmp_path, 3) == 2 and "run the same command without --resume to start it" in last_line(tmp_path, 3)
    assert rc(tmp_path, 4) == 0, (tmp_path / "err4").read_text()
    assert "ckpt-e001.safetensors" in (tmp_path / "after.txt").read_text().split()
