"""train as an unlucky user meets it: stopped by the scheduler, killed at random steps, a cut
metrics.jsonl, a resume with other options, a second run into the same folder, options that make no
sense, files in --out that are not alexcli's."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alexcli.io import FolderLock
from conftest import RUN_TIMEOUT, TINY_TRAIN, assert_same_weights, run_here, says, wait_for

EPOCHS = "2"
LAST = f"ckpt-e00{EPOCHS}.safetensors"
SNAP = ["--save-every", "2"]  # 6 steps an epoch here: snapshots at steps 2 and 4


@pytest.fixture
def cli():
    return run_here


def train_in(cli, data, out, *extra) -> subprocess.CompletedProcess:
    return cli("train", "--data", data, "--out", out, *TINY_TRAIN, *extra)


def train_cmd(data, out, *extra) -> list[str]:
    return [sys.executable, "-m", "alexcli", "train", "--data", str(data), "--out", str(out), *TINY_TRAIN, *extra]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory):
    """An uninterrupted run with snapshots: the weights every stopped and resumed run must end with."""
    from alexcli.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--data", str(train_data), "--out", str(out), *TINY_TRAIN, "--epochs", EPOCHS, *SNAP]) == 0
    assert not list(out.glob("*-s0*")), "an epoch's snapshots are removed when it commits"
    return out


def test_snapshots_do_not_change_the_weights(reference, train_data, tmp_path, cli):
    out = tmp_path / "plain"
    assert train_in(cli, train_data, out, "--epochs", EPOCHS, "--save-every", "0").returncode == 0
    assert_same_weights(reference / LAST, out / LAST)


def signal_mid_run(data, out: Path, marker: str, sig: int, tmp_path: Path) -> tuple[int, str]:
    """Start a run with snapshots, send SIG once the file MARKER appears in OUT; (exit code, stderr)."""
    log = tmp_path / f"{out.name}.stderr"
    with open(log, "w") as err:  # a file, not a pipe nobody reads while the run goes on
        proc = subprocess.Popen(train_cmd(data, out, "--epochs", EPOCHS, *SNAP), stdout=subprocess.DEVNULL, stderr=err)
        wait_for((out / marker).exists, proc, f"the run wrote {marker}", log=log)
        proc.send_signal(sig)
        proc.wait(timeout=RUN_TIMEOUT)
    return proc.returncode, log.read_text()


def test_sigterm_saves_a_snapshot_and_resume_is_bit_identical(reference, train_data, tmp_path, cli):
    out = tmp_path / "term"
    code, err = signal_mid_run(train_data, out, "state-e002-s000002.json", signal.SIGTERM, tmp_path)
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM "), last
    assert last.endswith(f"continue with: alexcli train --data {train_data} --out {out} --resume"), last
    saved = last.split("; saved ")[1].split(";")[0]
    assert Path(saved).is_file()  # an ordinary checkpoint: eval reads it
    assert not list(out.glob("*.tmp"))
    r = train_in(cli, train_data, out, "--resume")  # the run's own --epochs (not the default 90)
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch 2 step" in r.stderr, r.stderr
    assert_same_weights(reference / LAST, out / LAST)
    assert [m["epoch"] for m in rows(out)] == [1, 2]
    assert not list(out.glob("*-s0*"))


def test_sigint_mid_epoch_is_exit_130_with_the_resume_command(train_data, tmp_path):
    out = tmp_path / "int"
    code, err = signal_mid_run(train_data, out, "state-e001-s000002.json", signal.SIGINT, tmp_path)
    assert code == 130, err
    assert "stopped by SIGINT" in err and f"--out {out} --resume" in err


def test_kill_9_at_random_moments_then_resume_is_bit_identical(reference, train_data, tmp_path, cli):
    """Several tries, each killed at a random moment of the run (snapshot writes included)."""
    rng = random.Random(2012)
    lengths = []
    for attempt in range(3):
        out = tmp_path / f"kill{attempt}"
        proc = subprocess.Popen(train_cmd(train_data, out, "--epochs", EPOCHS, *SNAP),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: any(out.glob("ckpt-e001-s000002.safetensors*")), proc, "training was under way")
        time.sleep(rng.uniform(0, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        r = train_in(cli, train_data, out, "--resume") if not (out / f"state-e00{EPOCHS}.json").exists() else None
        if r is not None and "holds no saved position yet" in r.stderr:  # killed before the first save
            r = train_in(cli, train_data, out, "--epochs", EPOCHS, *SNAP)
        if r is not None:
            assert r.returncode == 0, r.stderr
        lengths.append(r is not None)
        assert_same_weights(reference / LAST, out / LAST)
        assert [m["epoch"] for m in rows(out)] == [1, 2]
    assert any(lengths), "every kill came after the run had finished: the test did not test resuming"


def test_stop_at_a_chosen_step_in_process_resumes_mid_epoch(train_data, tmp_path, monkeypatch):
    """Deterministic: SIGTERM arrives during step 3 of epoch 2; the run saves step 3 and stops."""
    from alexcli.errors import Stopped
    from alexcli.model.registry import make_arch
    from alexcli.train import step as step_mod
    from alexcli.train.config import TrainConfig
    from alexcli.train.launch import train as train_lib

    def config(out):
        return TrainConfig(data=str(train_data), out=str(out), epochs=2, batch=8, loader_workers=0,
                           schedule="steps", lr_steps=(2,), save_every=0)

    arch = make_arch("alexnet", init="kaiming", width=0.125, crop=64)
    train_lib(config(tmp_path / "whole"), arch)

    calls = {"n": 0}
    real = step_mod.TrainStep.__call__

    def call(self, *a):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # epoch 2, step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a)

    monkeypatch.setattr(step_mod.TrainStep, "__call__", call)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM at epoch 2 step 3/6; saved .*ckpt-e002-s000003") as e:
        train_lib(config(tmp_path / "cut"), arch)
    assert e.value.exit_code == 143
    monkeypatch.setattr(step_mod.TrainStep, "__call__", real)
    cut = tmp_path / "cut"
    assert sorted(p.name for p in cut.glob("*-s0*")) == ["ckpt-e002-s000003.safetensors",
                                                         "state-e002-s000003.json", "state-e002-s000003.safetensors"]
    summary = train_lib(config(cut), arch, resume=True)
    assert summary["started_at"] == 1
    assert_same_weights(tmp_path / "whole" / "ckpt-e002.safetensors", cut / "ckpt-e002.safetensors")
    whole, resumed = rows(tmp_path / "whole"), rows(cut)
    for a, b in zip(whole, resumed):  # the epoch's sums survive the stop: the same metrics
        assert (a["train_loss"], a["train_top1_error"], a["val_top1_error"]) == \
               (b["train_loss"], b["train_top1_error"], b["val_top1_error"])
    assert resumed[1]["resumed_at_step"] == 3


def test_sigterm_during_validation_stops_after_that_epoch_and_resume_is_identical(train_data, tmp_path, monkeypatch):
    """SIGTERM while epoch 1 is being validated: the validation and the epoch's commit finish
    (its metrics row has the val error), the run stops "after epoch 1" with no mid-epoch snapshot,
    and the resumed run ends with the weights and metrics of one that was never stopped."""
    from alexcli.errors import Stopped
    from alexcli.model.registry import make_arch
    from alexcli.train import loop
    from alexcli.train.config import TrainConfig
    from alexcli.train.launch import train as train_lib

    def config(out):
        return TrainConfig(data=str(train_data), out=str(out), epochs=2, batch=8, loader_workers=0,
                           schedule="steps", lr_steps=(2,), save_every=0)

    arch = make_arch("alexnet", init="kaiming", width=0.125, crop=64)
    train_lib(config(tmp_path / "whole"), arch)

    real = loop.evaluate_split
    calls = []

    def evaluate(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during the validation of epoch 1
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluate_split", evaluate)
    cut = tmp_path / "cut"
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after epoch 1; saved .*ckpt-e001.safetensors") as e:
        train_lib(config(cut), arch)
    assert e.value.exit_code == 143 and len(calls) == 1
    assert not list(cut.glob("*-s0*"))  # the epoch was complete: nothing mid-epoch to save
    assert [m["epoch"] for m in rows(cut)] == [1] and rows(cut)[0]["val_top1_error"] is not None
    monkeypatch.setattr(loop, "evaluate_split", real)
    assert train_lib(config(cut), arch, resume=True)["started_at"] == 1  # epochs done before this run
    assert_same_weights(tmp_path / "whole" / "ckpt-e002.safetensors", cut / "ckpt-e002.safetensors")
    for a, b in zip(rows(tmp_path / "whole"), rows(cut), strict=True):
        assert (a["train_loss"], a["val_top1_error"]) == (b["train_loss"], b["val_top1_error"])


def test_cut_metrics_file_is_rebuilt_on_resume(train_data, tmp_path, cli):
    out = tmp_path / "m"
    assert train_in(cli, train_data, out, "--epochs", "2").returncode == 0
    text = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(text[: len(text) * 2 // 3])  # cut in the middle of a row
    r = train_in(cli, train_data, out, "--resume", "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert [m["epoch"] for m in rows(out)] == [1, 2, 3]


def test_resume_refuses_options_that_differ_naming_each(train_data, tmp_path, demo_src, tmp_path_factory, cli):
    out = tmp_path / "r"
    assert train_in(cli, train_data, out, "--epochs", "1").returncode == 0
    r = cli("train", "--data", train_data, "--out", out, "--resume", "--epochs", "2", "--lr", "0.1",
            "--batch", "4", "--width", "0.25")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert line.startswith("error: --resume: --lr 0.1 (the run: 0.01); --batch 4 (the run: 8); --width 0.25 "
                           "(the run: 0.125): these cannot change when a run continues"), line
    assert len(line.splitlines()) == 1
    r = cli("train", "--data", train_data, "--out", out, "--resume", "--layer", "norm=none")
    assert r.returncode == 2 and r.stderr.strip().startswith(  # named as typed (it said --norm none)
        "error: --resume: --layer norm=none (the run: norm=lrn): these cannot change"), r.stderr
    other = tmp_path_factory.mktemp("other") / "d"
    from alexcli.data.prepare import PrepareConfig, prepare

    prepare(demo_src, other, PrepareConfig(size=72, shard_size=12, workers=1, seed=5))  # another shuffle
    r = cli("train", "--data", other, "--out", out, "--resume", "--epochs", "2")
    assert r.returncode == 2 and "is not the data set the run in" in r.stderr, r.stderr
    # the options that may change, and the same values given again, are fine
    r = cli("train", "--data", train_data, "--out", out, "--resume", "--epochs", "2", "--keep", "1",
            "--loader-workers", "0", "--batch", "8", "--width", "0.125")
    assert r.returncode == 0, r.stderr


def test_a_second_train_into_the_same_folder_is_refused(train_data, tmp_path, cli):
    out = tmp_path / "busy"
    out.mkdir()
    with FolderLock(out, "train"):
        r = train_in(cli, train_data, out, "--epochs", "1")
    assert r.returncode == 2 and f"{out}: in use by alexcli train (pid {os.getpid()}" in r.stderr, r.stderr


def test_overwrite_removes_only_the_runs_files(train_data, tmp_path, cli):
    out = tmp_path / "o"
    assert train_in(cli, train_data, out, "--epochs", "1", "--steps-per-epoch", "2").returncode == 0
    mine = {"notes.txt": b"my notes", "draft.tmp": b"an editor's file", "ckpt-best.safetensors": b"mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    r = train_in(cli, train_data, out, "--epochs", "1")
    assert r.returncode == 2 and "use --resume to continue it or --overwrite to start again" in r.stderr
    assert train_in(cli, train_data, out, "--epochs", "1", "--steps-per-epoch", "2", "--overwrite").returncode == 0
    for name, data in mine.items():
        assert (out / name).read_bytes() == data


def test_a_run_killed_before_its_first_save_starts_again_plainly(train_data, tmp_path, cli):
    out = tmp_path / "early"
    out.mkdir()
    (out / "ckpt-e001.safetensors.tmp").write_bytes(b"half a checkpoint")  # what a kill in the first save leaves
    r = train_in(cli, train_data, out, "--epochs", "1", "--resume")
    assert r.returncode == 2
    assert "holds no saved position yet" in r.stderr and "without --resume" in r.stderr
    r = train_in(cli, train_data, out, "--epochs", "1", "--steps-per-epoch", "2")
    assert r.returncode == 0, r.stderr
    assert not (out / "ckpt-e001.safetensors.tmp").exists()


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], re.compile(r"Invalid value for '--lr'|--lr must be a positive number, not nan")),
    (["--lr", "inf"], "--lr must be a positive number, not inf"),
    (["--lr", "0"], "--lr must be a positive number, not 0.0"),
    (["--weight-decay", "nan"],
     re.compile(r"Invalid value for '--weight-decay'|--weight-decay must be 0 or a positive number, not nan")),
    (["--loader-workers", "-5"], "Invalid value for '--loader-workers'"),
    (["--steps-per-epoch", "-1"], "Invalid value for '--steps-per-epoch'"),
    (["--augment", "mean,mean,crop"], "--augment mean,mean,crop: mean given more than once"),
    (["--batch", "100000"], "--batch 100000: larger than the training split of"),
    (["--lr-steps", "3,2"], "--lr-steps must be increasing epochs of 1 or more, not 3,2"),
])
def test_bad_options_leave_no_run_folder(train_data, tmp_path, args, message, cli):
    out = tmp_path / "never"
    r = train_in(cli, train_data, out, "--epochs", "1", *args)
    assert r.returncode == 2 and says(r.stderr, message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_out_that_is_a_file_is_one_line(train_data, tmp_path, cli):
    out = tmp_path / "afile"
    out.write_text("x")
    r = train_in(cli, train_data, out, "--epochs", "1")
    assert r.returncode == 2 and r.stderr.strip() == f"error: --out {out}: exists and is not a folder"
    assert out.read_text() == "x"


# ---------------------------------------------------------------- Ctrl-C at any moment: one line, what was saved


def test_ctrl_c_while_the_command_starts_is_one_line(train_data, tmp_path):
    """Ctrl-C during the imports or the data checks (the first seconds) said nothing and exited 130:
    Typer turns a KeyboardInterrupt into a silent exit. Wherever it lands now, it is one line."""
    out = tmp_path / "early"
    proc = subprocess.Popen(train_cmd(train_data, out, "--epochs", EPOCHS), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.3)  # Python is up (its handler is in place), alexcli is still importing
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
    err = proc.communicate(timeout=RUN_TIMEOUT)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last in ("error: interrupted", f"error: interrupted before the run's first checkpoint: nothing was "
                    f"saved in {out}; run the same command again to start") or last.startswith("error: stopped by SIGINT"), err
    assert not out.exists() or any(out.iterdir()), "no empty --out left behind"


def test_ctrl_c_before_the_first_step_says_nothing_was_saved(train_data, tmp_path, monkeypatch, cli):
    from alexcli.train import launch

    real = launch.Data

    def interrupted_while_checking(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the shards are hashed
        return real(*a, **k)

    monkeypatch.setattr(launch, "Data", interrupted_while_checking)
    out = tmp_path / "run"
    r = train_in(cli, train_data, out, "--epochs", EPOCHS)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: interrupted before the run's first checkpoint: nothing was "
                                                 f"saved in {out}; run the same command again to start")
    assert not out.exists()


def test_ctrl_c_twice_stops_at_once_naming_the_last_saved_position(reference, train_data, tmp_path, monkeypatch, cli):
    """The first Ctrl-C asks the run to save and stop at the next step; a second one stops it at
    once. The line names what the folder holds, and --resume from it ends as an uninterrupted run."""
    from alexcli.train import step as step_mod

    calls = {"n": 0}
    real = step_mod.TrainStep.__call__

    def call(self, *a):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # epoch 2, step 3: Ctrl-C twice, fast
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a)

    monkeypatch.setattr(step_mod.TrainStep, "__call__", call)
    out = tmp_path / "twice"
    r = train_in(cli, train_data, out, "--epochs", EPOCHS, *SNAP)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: interrupted; the last saved position is {out / 'ckpt-e002-s000002.safetensors'}; continue with: "
        f"alexcli train --data {train_data} --out {out} --resume")
    monkeypatch.setattr(step_mod.TrainStep, "__call__", real)
    r = train_in(cli, train_data, out, "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_weights(reference / LAST, out / LAST)


def test_files_named_like_a_runs_but_not_written_here_are_never_removed(train_data, tmp_path, cli):
    """A copied ckpt-e090.safetensors, or a metrics.jsonl of the user's, in an --out without a run:
    a plain train deleted them (rc 0, no word). Now it refuses, naming them; the run's own
    leftovers (a kill inside its first epoch's commit) still go."""
    other = tmp_path / "other"
    assert train_in(cli, train_data, other, "--epochs", "1", "--steps-per-epoch", "2").returncode == 0
    out = tmp_path / "mixed"
    out.mkdir()
    copied = (other / "ckpt-e001.safetensors").read_bytes()
    (out / "ckpt-e090.safetensors").write_bytes(copied)
    (out / "best.safetensors").write_bytes((other / "best.safetensors").read_bytes())
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    for extra in ([], ["--overwrite"]):
        r = train_in(cli, train_data, out, "--epochs", "1", "--steps-per-epoch", "2", *extra)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"error: {out}: best.safetensors, ckpt-e090.safetensors, metrics.jsonl were not "
                                    "written by a run into this folder, and alexcli removes only its own files: move them away, or "
                                    "choose another --out")
        assert (out / "ckpt-e090.safetensors").read_bytes() == copied and (out / "metrics.jsonl").exists()
        assert (out / "best.safetensors").read_bytes() == copied
    # what a run killed between its first checkpoint and its trainer state leaves is its own: removed
    killed = tmp_path / "killed"
    assert train_in(cli, train_data, killed, "--epochs", "1", "--steps-per-epoch", "2").returncode == 0
    for name in ("state-e001.json", "state-e001.safetensors"):
        (killed / name).unlink()
    r = train_in(cli, train_data, killed, "--epochs", "1", "--steps-per-epoch", "2")
    assert r.returncode == 0, r.stderr
    assert (killed / "state-e001.json").exists()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the loader processes")
def test_loader_processes_stop_with_a_killed_train(train_data, tmp_path):
    """After kill -9 of train its loader processes ran on for about 5 s (until torch's own watchdog
    looked); like prepare's pool they now go at once."""
    out = tmp_path / "run"
    # (TINY_TRAIN's --loader-workers 0 comes first; the one given last wins)
    proc = subprocess.Popen(train_cmd(train_data, out, "--epochs", "50", *SNAP, "--loader-workers", "1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kids() -> list[int]:
        try:
            return [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            return []

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    wait_for(lambda: (out / "state-e001-s000002.json").exists() and kids(), proc, "a loader process at work")
    loaders = kids()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(alive(k) for k in loaders):
        time.sleep(0.01)
    assert not [k for k in loaders if alive(k)], "loader processes still run after train was killed"


@pytest.mark.parametrize("edit,message", [
    (lambda s: s["config"].update(batch="8"), "does not match the sha256 stored in it (edited or corrupt file)"),
    (lambda s: s.pop("schedule"), "does not match the sha256 stored in it (edited or corrupt file)"),
])
def test_an_edited_trainer_state_is_refused_on_resume(train_data, tmp_path, cli, edit, message):
    """A string batch, a missing schedule or an empty config in state-eNNN.json ended --resume in
    `internal: ...`, and lr nan was accepted: the state carries a sha256 as checkpoints do."""
    out = tmp_path / "run"
    assert train_in(cli, train_data, out, "--epochs", "1").returncode == 0
    path = out / "state-e001.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    r = train_in(cli, train_data, out, "--resume", "--epochs", "2")
    assert (r.returncode, r.stderr.strip()) == (2, f"error: {path}: {message}"), r.stderr


def test_a_resealed_state_with_bad_settings_is_refused(train_data, tmp_path, cli):
    from alexcli.checkpoint import seal_state

    out = tmp_path / "run"
    assert train_in(cli, train_data, out, "--epochs", "1").returncode == 0
    path = out / "state-e001.json"
    state = json.loads(path.read_text())
    state["config"]["lr"] = float("nan")
    path.write_text(json.dumps(seal_state(state)))
    r = train_in(cli, train_data, out, "--resume", "--epochs", "2")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {path}: its saved settings are not valid (--lr must be a positive number, not nan)"


def test_a_checkpoint_renamed_to_another_epoch_is_refused_on_resume(train_data, tmp_path, cli):
    out = tmp_path / "run"
    assert train_in(cli, train_data, out, "--epochs", "2").returncode == 0
    (out / "ckpt-e002.safetensors").write_bytes((out / "ckpt-e001.safetensors").read_bytes())
    r = train_in(cli, train_data, out, "--resume", "--epochs", "3")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {out / 'ckpt-e002.safetensors'}: its metadata says epoch 1, its name epoch 2 "
                                "(renamed or edited); --resume cannot trust it")
