"""`alexcli runs`: the runs in a folder, read as they are: two real tiny runs (one finished, one
stopped mid-epoch), and folders a user breaks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_TRAIN, run_here


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs_dir(train_data, tmp_path_factory) -> Path:
    """runs/a/finished (2 of 2 epochs), runs/b/cut (SIGTERM at step 3 of epoch 2: a snapshot there),
    runs/c/garbage (a metrics.jsonl that is not JSON)."""
    from alexcli.train import step as step_mod

    root = tmp_path_factory.mktemp("runs")
    train = ["train", "--data", train_data, *TINY_TRAIN, "--epochs", "2"]
    done = run_here(*train, "--out", root / "a" / "finished")
    assert done.returncode == 0, done.stderr
    calls = {"n": 0}
    real = step_mod.TrainStep.__call__

    def call(self, *a):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # 6 steps an epoch: step 3 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_mod.TrainStep, "__call__", call)
        cut = run_here(*train, "--out", root / "b" / "cut")
    assert cut.returncode == 143, cut.stderr
    (root / "c" / "garbage").mkdir(parents=True)
    (root / "c" / "garbage" / "metrics.jsonl").write_text("this is not json\n")
    return root


def listed(root: Path) -> dict[str, dict]:
    r = run_here("runs", root, "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == sorted(row["path"] for row in rows)
    return {row["path"]: row for row in rows}


def copy_run(runs_dir: Path, tmp_path: Path, name: str = "a/finished") -> Path:
    dst = tmp_path / "runs" / "r"
    shutil.copytree(runs_dir / name, dst)
    return dst


def test_json_gives_each_run_exact_values(runs_dir):
    rows = listed(runs_dir)
    assert list(rows) == ["a/finished", "b/cut", "c/garbage"]

    fin, m = rows["a/finished"], metric_rows(runs_dir / "a" / "finished")
    best = min(m, key=lambda r: r["val_top1_error"])
    assert (fin["kind"], fin["status"], fin["reason"], fin["epochs_done"], fin["epochs"]) == \
           ("train", "finished", None, 2, 2)
    assert fin["best_val_top1_error"] == min(r["val_top1_error"] for r in m)
    assert (fin["best_epoch"], fin["best_val_top5_error"]) == (best["epoch"], best["val_top5_error"])
    assert fin["last_train_loss"] == m[-1]["train_loss"]
    assert (fin["init"], fin["init_from"], fin["arch"], fin["variants"]) == \
           ("kaiming", None, "alexnet", "alexnet relu/lrn/overlap w0.125 c64")
    assert fin["stopped_at"] is None and fin["lock"] is None

    cut, m = rows["b/cut"], metric_rows(runs_dir / "b" / "cut")
    assert [r["epoch"] for r in m] == [1]
    assert (cut["status"], cut["epochs_done"], cut["epochs"], cut["stopped_at"]) == \
           ("interrupted", 1, 2, {"epoch": 2, "step": 3})
    assert (cut["best_epoch"], cut["best_val_top1_error"], cut["best_val_top5_error"], cut["last_train_loss"]) == \
           (1, m[0]["val_top1_error"], m[0]["val_top5_error"], m[0]["train_loss"])

    bad = rows["c/garbage"]
    assert bad["status"] == "unreadable" and bad["reason"] == "metrics.jsonl: line 1 is not JSON (damaged)"
    assert bad["epochs_done"] == 0 and bad["best_val_top1_error"] is None


def test_table_shows_every_run_and_its_status(runs_dir, monkeypatch):
    from alexcli.cli._ui import out

    monkeypatch.setattr(out.console(), "width", 250)  # one line per row
    r = run_here("runs", runs_dir)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│")}
    assert set(lines) == {"a/finished", "b/cut", "c/garbage"}
    assert "2/2" in lines["a/finished"] and "finished" in lines["a/finished"]
    assert "alexnet relu/lrn/overlap w0.125 c64" in lines["a/finished"] and "kaiming" in lines["a/finished"]
    assert "1/2" in lines["b/cut"] and "interrupted at epoch 2 step 3" in lines["b/cut"]
    assert "unreadable: metrics.jsonl: line 1 is not JSON" in lines["c/garbage"]


def test_a_locked_folder_is_running_and_no_lock_file_is_left(runs_dir, tmp_path):
    from alexcli.io import LOCK_NAME, FolderLock

    run = copy_run(runs_dir, tmp_path)
    with FolderLock(run, "train"):
        row = listed(run.parent)["r"]
        assert (row["status"], row["lock"]["command"], row["lock"]["pid"]) == ("running", "train", os.getpid())
    assert not (run / LOCK_NAME).exists()
    assert listed(run.parent)["r"]["status"] == "finished"
    assert not (run / LOCK_NAME).exists()  # testing the lock made no file
    # a lock file a kill -9 left behind (nobody holds its flock): finished, and the file is left as it was
    stale = json.dumps({"command": "train", "pid": 1, "host": "gone"})
    (run / LOCK_NAME).write_text(stale)
    assert listed(run.parent)["r"]["status"] == "finished"
    assert (run / LOCK_NAME).read_text() == stale


def test_a_run_without_val_split_has_no_best(runs_dir, tmp_path):
    run = copy_run(runs_dir, tmp_path)
    rows = [dict(r, val_top1_error=None, val_top5_error=None, val_loss=None) for r in metric_rows(run)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = listed(run.parent)["r"]
    assert (row["status"], row["best_epoch"], row["best_val_top1_error"], row["best_val_top5_error"]) == \
           ("finished", None, None, None)
    assert row["last_train_loss"] == rows[-1]["train_loss"]
    r = run_here("runs", run.parent)
    assert r.returncode == 0 and " - " in r.stdout


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b"\x00" * 7, "ckpt-e002.safetensors: not a safetensors file (SafetensorError: Error while deserializing header"),
    (lambda b: b.replace(b"kaiming", b"kaimin0", 1), "ckpt-e002.safetensors: metadata does not match the sha256"),
])
def test_a_damaged_checkpoint_is_its_own_row(runs_dir, tmp_path, damage, reason):
    run = copy_run(runs_dir, tmp_path)
    shutil.copytree(runs_dir / "b" / "cut", tmp_path / "runs" / "s")
    ckpt = run / "ckpt-e002.safetensors"
    ckpt.write_bytes(damage(ckpt.read_bytes()))
    rows = listed(run.parent)
    assert rows["r"]["status"] == "unreadable" and rows["r"]["reason"].startswith(reason)
    assert rows["r"]["epochs_done"] == 2 and rows["r"]["best_val_top1_error"] is not None  # what could be read
    assert rows["s"]["status"] == "interrupted"


def test_missing_folder_is_one_line_and_exit_2(tmp_path):
    r = run_here("runs", tmp_path / "nope")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"error: {tmp_path / 'nope'}: no such folder") and r.stderr.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert run_here("runs", tmp_path / "file").returncode == 2


def test_a_folder_without_runs_says_so_and_exits_0(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    r = run_here("runs", tmp_path / "empty")
    assert (r.returncode, r.stdout.strip()) == (0, f"no training runs under {tmp_path / 'empty'}")
    r = run_here("runs", tmp_path / "empty", "--json")
    assert (r.returncode, json.loads(r.stdout)) == (0, [])


def test_the_folder_itself_and_experiment_folders(runs_dir, tmp_path):
    run = copy_run(runs_dir, tmp_path)
    assert listed(run)["."]["status"] == "finished"
    exp = tmp_path / "runs" / "exp"
    (exp / "fits").mkdir(parents=True)
    (exp / "fits" / "0123.json").write_text("{}")
    assert listed(run.parent)["exp"]["status"] == "interrupted"
    results = {"experiment": "relu-vs-tanh", "config": {"epochs": 3},
               "variants": {"relu": {"arch": {"init": "convnet"}}, "tanh": {"arch": {"init": "convnet"}}},
               "runs": {"relu": [{"seed": 0, "diverged": False}], "tanh": [{"seed": 0, "diverged": True}]}}
    (exp / "results.json").write_text(json.dumps(results))
    row = listed(run.parent)["exp"]
    assert (row["kind"], row["status"], row["arch"], row["variants"], row["epochs"], row["reason"]) == \
           ("experiment", "finished", "experiment relu-vs-tanh", "relu, tanh", 3, "diverged: tanh seed 0")
    assert "fits" not in " ".join(listed(run.parent))  # not searched


def test_listing_imports_no_torch(runs_dir):
    code = ("import sys; from alexcli.runs import list_runs; rows = list_runs(sys.argv[1]); "
            "assert 'torch' not in sys.modules; print(len(rows))")
    r = subprocess.run([sys.executable, "-c", code, str(runs_dir)], capture_output=True, text=True, timeout=600)
    assert (r.returncode, r.stdout.strip()) == (0, "3"), r.stderr
