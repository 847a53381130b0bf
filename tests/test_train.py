"""`alexcli train` end to end on tiny runs: files, exact resume, divergence, bad checkpoints, DDP, plugins."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from alexcli.data.prepare import PrepareConfig, prepare
from conftest import TINY_TRAIN, assert_same_weights, not_one_of, out_of_range, run_here, says, weights


def train(data, out, *extra):
    return run_here("train", "--data", data, "--out", out, *TINY_TRAIN, *extra)


@pytest.fixture(scope="module")
def run3(train_data, tmp_path_factory):
    """An uninterrupted 3-epoch run, the reference for the resume tests."""
    out = tmp_path_factory.mktemp("runs") / "a"
    r = train(train_data, out, "--epochs", "3", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_run_writes_checkpoints_metrics_and_curves(run3, train_data):
    from alexcli.checkpoint import load_model

    out, summary = run3
    assert summary["epochs"] == 3 and summary["world"] == 1 and summary["device"] == "cpu"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["best.safetensors", "ckpt-e001.safetensors", "ckpt-e002.safetensors", "ckpt-e003.safetensors",
                     "curves.png", "metrics.jsonl", "state-e003.json", "state-e003.safetensors"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # best.safetensors is another name of the epoch with the lowest val top-1 error (the first of equals)
    best = min(rows, key=lambda m: m["val_top1_error"])["epoch"]
    assert os.path.samefile(out / "best.safetensors", out / f"ckpt-e{best:03d}.safetensors")
    assert summary["best_epoch"] == best
    assert [m["epoch"] for m in rows] == [1, 2, 3]
    assert set(rows[0]) >= {"train_loss", "train_top1_error", "val_top1_error", "val_top5_error", "lr",
                            "images_per_s", "seconds"}
    assert [m["lr"] for m in rows] == pytest.approx([0.01, 0.01, 0.001])  # --lr-steps 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, ckpt = load_model(out / "ckpt-e003.safetensors")
    meta = ckpt.meta
    assert meta["epoch"] == 3 and meta["arch"]["width"] == 0.125 and meta["arch"]["num_classes"] == 8
    assert meta["init"] == "kaiming" and meta["metrics"] == rows[2]
    assert meta["variants"]["norm"] == {"name": "lrn", "package": "alexcli", "version": meta["alexcli_version"]}
    assert meta["variants"]["augment:pca"]["package"] == "alexcli"
    assert meta["classes"] == json.loads((train_data / "dataset.json").read_text())["classes"]
    assert ckpt.data["mean_image"].shape == (3, 72, 72)
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]


def test_resume_ends_with_the_same_weights(run3, train_data, tmp_path):
    out = tmp_path / "b"
    assert train(train_data, out, "--epochs", "1").returncode == 0
    r = train(train_data, out, "--epochs", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch 1" in r.stderr
    assert_same_weights(run3[0] / "ckpt-e003.safetensors", out / "ckpt-e003.safetensors")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2, 3]


# `alexcli train` that stops while publishing epoch 2's checkpoint (its .tmp written and fsynced,
# not yet renamed), writes a marker and waits there: the kill lands mid-write, at the same point
# on any machine, instead of whenever a poll for epoch 1's files happened to notice them.
TRAIN_HELD = """
import sys, time
from pathlib import Path
from alexcli import io
marker, argv = Path(sys.argv[1]), sys.argv[2:]
real = io.AtomicFile.publish
def publish(self):
    if self.path.name == "ckpt-e002.safetensors":
        marker.write_text("held")
        time.sleep(3600)
    return real(self)
io.AtomicFile.publish = publish
from alexcli.cli import main
sys.exit(main(argv))
"""


def test_killed_run_resumes_to_the_same_weights(run3, train_data, tmp_path):
    from alexcli.checkpoint import load_checkpoint
    from conftest import wait_for

    out = tmp_path / "c"
    marker = tmp_path / "held"
    cmd = [sys.executable, "-c", TRAIN_HELD, str(marker), "train", "--data", str(train_data), "--out", str(out),
           *TINY_TRAIN, "--epochs", "3"]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:  # a file, not a pipe that nobody reads while it runs
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(marker.exists, proc, "train began to publish epoch 2's checkpoint", log=log)
        finally:
            proc.kill()  # SIGKILL
            proc.wait()
    assert (out / "state-e001.json").exists() and (out / "ckpt-e002.safetensors.tmp").exists()
    assert not (out / "ckpt-e002.safetensors").exists() and not (out / "state-e002.json").exists()
    # whatever the kill interrupted, every file under a final name is whole
    for ckpt in out.glob("ckpt-e*.safetensors"):
        load_checkpoint(ckpt)  # checks the stored sha256
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()][:1] == [1]
    r = train(train_data, out, "--epochs", "3", "--resume")
    assert r.returncode == 0, r.stderr
    assert_same_weights(run3[0] / "ckpt-e003.safetensors", out / "ckpt-e003.safetensors")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2, 3]


def test_a_run_folder_stands_for_its_best_or_its_last_checkpoint(run3, tmp_path):
    from alexcli.checkpoint import checkpoint_in
    from alexcli.errors import DataError, UsageError

    out, summary = run3
    best, last = out / "best.safetensors", out / "ckpt-e003.safetensors"
    assert checkpoint_in(out) == best and checkpoint_in(out, last=True) == last
    assert checkpoint_in(out / "ckpt-e001.safetensors") == out / "ckpt-e001.safetensors"  # a file is itself
    with pytest.raises(UsageError, match=r"^--last: .*ckpt-e001.safetensors is a checkpoint; --last picks the "
                                         r"latest checkpoint of a run folder$"):
        checkpoint_in(out / "ckpt-e001.safetensors", last=True)
    # what eval scores and says it scored
    for extra, used in (([], best), (["--last"], last)):
        r = run_here("eval", out, "--json", *extra)
        assert r.returncode == 0, r.stderr
        (model,) = json.loads(r.stdout)["models"]
        assert model["path"] == str(used) and model["epoch"] == (summary["best_epoch"] if not extra else 3)
    # no best.safetensors (trained without val): the latest; no trainer state either: the newest checkpoint
    runs = tmp_path / "runs"
    bare = runs / "bare"
    bare.mkdir(parents=True)
    for e in (1, 2):
        os.link(out / f"ckpt-e00{e}.safetensors", bare / f"ckpt-e00{e}.safetensors")
    assert checkpoint_in(bare) == bare / "ckpt-e002.safetensors"
    # a folder of runs, or one without checkpoints: say what to give
    with pytest.raises(DataError) as exc:
        checkpoint_in(runs)
    assert str(exc.value) == f"{runs}: a folder of runs (bare), not a run: give one of them, e.g. {bare}"
    r = run_here("eval", runs)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {exc.value}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder without checkpoints \(ckpt-eNNN.safetensors\); give a "
                                        r"checkpoint or the run folder of alexcli train$"):
        checkpoint_in(tmp_path / "empty")


def test_best_follows_the_state_and_is_a_copy_without_hard_links(run3, tmp_path, monkeypatch):
    """mark_best runs after each epoch's trainer state: a run killed between the two has best
    pointing at the previous best, and the next epoch's call sets it. Where the file system has no
    hard links it copies, once."""
    import errno
    import shutil

    from alexcli import checkpoint as ck

    out = tmp_path / "run"
    shutil.copytree(run3[0], out)  # best.safetensors is a copy here, of the same checkpoint
    ck.mark_best(out, 1)
    assert os.path.samefile(out / ck.BEST, out / "ckpt-e001.safetensors")
    ck.mark_best(out, None)  # no val: nothing changes
    assert os.path.samefile(out / ck.BEST, out / "ckpt-e001.safetensors")

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    ck.mark_best(out, 2)
    assert not os.path.samefile(out / ck.BEST, out / "ckpt-e002.safetensors")
    assert (out / ck.BEST).read_bytes() == (out / "ckpt-e002.safetensors").read_bytes()
    inode = (out / ck.BEST).stat().st_ino
    ck.mark_best(out, 2)  # already a copy of it: not written again
    assert (out / ck.BEST).stat().st_ino == inode
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_existing_run_needs_resume_or_overwrite(run3, train_data):
    r = train(train_data, run3[0], "--epochs", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("use --resume to continue it or --overwrite to start again")
    r = train(train_data, run3[0], "--epochs", "3", "--resume")
    assert r.returncode == 2 and "already trained 3 epochs" in r.stderr


def test_diverging_loss_stops_at_once_and_keeps_the_last_good_checkpoint(train_data, tmp_path):
    out = tmp_path / "nan"
    assert train(train_data, out, "--epochs", "1").returncode == 0
    before = weights(out / "ckpt-e001.safetensors")
    state = json.loads((out / "state-e001.json").read_text())
    state_path = out / "state-e001.json"
    state["config"]["lr"] = 1e30  # the resumed schedule starts from its saved lr: poison that
    state["schedule"]["lr"] = 1e30
    from alexcli.checkpoint import seal_state

    state_path.write_text(json.dumps(seal_state(state)))  # resealed: an edited state is refused otherwise
    r = train(train_data, out, "--epochs", "3", "--resume")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became") and "epoch 2" in last and "ckpt-e001.safetensors" in last
    assert not (out / "ckpt-e002.safetensors").exists()
    after = weights(out / "ckpt-e001.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the folder says so, and `alexcli runs` lists the run as diverged (it looked interrupted)
    mark = json.loads((out / "diverged.json").read_text())
    assert mark["epoch"] == 2 and mark["lr"] == 1e30 and mark["loss"] in ("nan", "inf")
    r = run_here("runs", tmp_path, "--json")
    (row,) = json.loads(r.stdout)
    assert row["status"] == "diverged" and row["reason"].startswith(f"loss {mark['loss']} at epoch 2 step ")


def test_corrupt_and_foreign_checkpoints_are_one_line_errors(run3, train_data, tmp_path):
    import shutil

    out = tmp_path / "bad"
    shutil.copytree(run3[0], out)
    ckpt = out / "ckpt-e003.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[-100] ^= 0x01  # one flipped bit in the tensors
    ckpt.write_bytes(bytes(raw))
    r = train(train_data, out, "--epochs", "4", "--resume")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: {ckpt}: tensors do not match the sha256 stored in it "
                                                 f"(corrupt file)")
    save_file({"w": torch.zeros(2)}, str(ckpt))
    r = train(train_data, out, "--epochs", "4", "--resume")
    assert r.returncode == 2 and "not an alexcli checkpoint" in r.stderr.strip().splitlines()[-1]
    ckpt.write_bytes(b"not a safetensors file at all")
    r = train(train_data, out, "--epochs", "4", "--resume")
    assert r.returncode == 2 and "not a safetensors file" in r.stderr


def test_checkpoint_names_a_missing_plugin_package(run3, tmp_path, monkeypatch):
    from alexcli import plugins
    from alexcli.errors import PluginError
    from alexcli.checkpoint import load_model, read_meta, sealed

    path = tmp_path / "ckpt.safetensors"
    tensors = load_file(str(run3[0] / "ckpt-e003.safetensors"))
    meta = read_meta(run3[0] / "ckpt-e003.safetensors")
    meta["variants"]["norm"] = {"name": "groupnorm9", "package": "alexcli-groupnorm9", "version": "1.2"}
    save_file(tensors, str(path), {"alexcli": json.dumps(sealed(meta, tensors))})  # a consistent file
    plugins.reset()
    with pytest.raises(PluginError, match=r"trained with norm 'groupnorm9' from package alexcli-groupnorm9 1.2, "
                                          r"which is not installed: pip install alexcli-groupnorm9"):
        load_model(path)


def test_mixed_decode_trains_on_the_batches_the_loader_gives(train_data, tmp_path):
    """--decode mixed: half of every batch decoded by the trainer (torchvision's libjpeg-turbo on the
    CPU, nvJPEG on a GPU), half in the loader; the run records it and trains as the plain run does
    (the two decoders differ by at most 2 levels here, so the losses agree closely)."""
    runs = {}
    for how in ("cpu", "mixed"):
        out = tmp_path / how
        r = train(train_data, out, "--epochs", "1", "--decode", how, "--loader-workers", "1", "--json",
                  *(["--decode-share", "0.5"] if how == "mixed" else []))
        assert r.returncode == 0, r.stderr
        runs[how] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    from alexcli.checkpoint import read_meta

    assert read_meta(tmp_path / "mixed" / "ckpt-e001.safetensors")["config"]["decode"] == "mixed"
    assert runs["mixed"]["train_loss"] == pytest.approx(runs["cpu"]["train_loss"], rel=1e-3)


def test_two_process_data_parallel_on_cpu(train_data, tmp_path):
    out = tmp_path / "ddp"
    r = train(train_data, out, "--epochs", "2", "--gpus", "2", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["world"] == 2 and summary["last"]["epoch"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_top1_error"] is not None  # val summed over both ranks


def test_columns_on_cpu_trains_and_saves_the_one_device_layout(train_data, tmp_path):
    from alexcli.checkpoint import load_model

    out = tmp_path / "cols"
    r = train(train_data, out, "--epochs", "1", "--parallel", "columns", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model, _ = load_model(out / "ckpt-e001.safetensors")
    assert model.conv2.groups == 2


def test_column_devices_place_each_column(train_data, tmp_path, monkeypatch):
    """--column-devices chooses the two columns' devices (cuda:0,cuda:0 puts both on one GPU, to
    exercise the split's CUDA code with one GPU); here cpu,cpu, recorded where the split is built."""
    from alexcli.model import columns
    from alexcli.model.registry import make_arch
    from alexcli.train.config import TrainConfig
    from alexcli.train.launch import train as train_lib

    placed = []
    real = columns.ColumnAlexNet.__init__

    def init(self, model, devices):
        placed.append([str(d) for d in devices])
        real(self, model, devices)

    monkeypatch.setattr(columns.ColumnAlexNet, "__init__", init)
    cfg = TrainConfig(data=str(train_data), out=str(tmp_path / "c"), epochs=1, batch=8, loader_workers=0,
                      schedule="constant", parallel="columns", device="cpu", column_devices=("cpu", "cpu"))
    train_lib(cfg, make_arch("alexnet", init="kaiming", width=0.125, crop=64))
    assert placed == [["cpu", "cpu"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_rank_devices_name_what_the_machine_lacks(train_data, tmp_path):
    r = train(train_data, tmp_path / "x", "--epochs", "1", "--gpus", "2", "--rank-devices", "cuda:0,cuda:0")
    assert r.returncode == 2 and says(r.stderr, "error: --rank-devices cuda:0,cuda:0: places the ranks on GPUs, but "
                                                "this machine has none visible"), r.stderr
    assert not (tmp_path / "x" / "ckpt-e001.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_column_devices_name_what_the_machine_lacks(train_data, tmp_path):
    r = train(train_data, tmp_path / "x", "--epochs", "1", "--parallel", "columns", "--device", "cpu",
              "--column-devices", "cuda:0,cuda:0")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --column-devices cuda:0,cuda:0 needs 1 CUDA device(s); "
                                                 "this machine has 0")
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("ckpt-*"))


def test_column_devices_on_a_one_gpu_machine(monkeypatch):
    """With one GPU the default split (cuda:0, cuda:1) is refused with the way to run it anyway."""
    from alexcli.errors import UsageError
    from alexcli.train.config import TrainConfig
    from alexcli.train.loop import column_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = TrainConfig(data="d", out="o", parallel="columns")
    with pytest.raises(UsageError, match=r"^--parallel columns needs 2 CUDA device\(s\); this machine has 1 "
                                         r"\(--column-devices cuda:0,cuda:0 runs both columns on one GPU\)$"):
        column_devices(cfg, torch.device("cuda"))
    cfg.column_devices = ("cuda:0", "cuda:0")
    assert column_devices(cfg, torch.device("cuda")) == [torch.device("cuda", 0)] * 2
    cfg.column_devices = ("cuda:0", "cpu")  # a column on the CPU: allowed (the GPU test of columns does it)
    assert column_devices(cfg, torch.device("cuda")) == [torch.device("cuda", 0), torch.device("cpu")]


def test_plugins_work_in_train(train_data, tmp_path):
    out = tmp_path / "plug"
    r = train(train_data, out, "--epochs", "1", "--layer", "norm=batchnorm", "--augment", "mean,crop,flip,pca,cutout")
    assert r.returncode == 0, r.stderr
    from alexcli.checkpoint import read_meta

    meta = read_meta(out / "ckpt-e001.safetensors")
    assert meta["variants"]["norm"]["package"] == "alexcli-batchnorm"
    assert meta["variants"]["augment:cutout"]["package"] == "alexcli-cutout"


@pytest.mark.parametrize("args,message", [
    (["--layer", "norm"], "--layer 'norm': expected KIND=NAME"),
    (["--augment", "mean,sharpen"], "unknown augmentation 'sharpen'"),
    (["--batch", "7", "--gpus", "2"], "--batch 7 does not split evenly over --gpus 2"),
    (["--schedule", "linear"], not_one_of("--schedule", "linear", "'plateau', 'steps', 'constant', 'cosine'")),
    (["--warmup", "1"], "--warmup 1 leaves no epoch of the 1 after it; use fewer"),
    (["--schedule", "steps"], "--schedule steps over 1 epoch(s) has no epoch to divide lr after; give --lr-steps"),
    (["--val-split", "test", "--crop", "64"], "has no test split"),
    (["--crop", "40"], "--crop 40 is too small"),
    (["--crop", "100000"], "--crop 100000 is larger than the 72x72 images of"),
    (["--crop", "80"], "--crop 80 is larger than the 72x72 images of"),
    (["--input-scale", "0"], "--input-scale must be in (0, 10000], not 0.0"),
    (["--input-scale", "-1"], out_of_range("--input-scale", 0)),
    (["--width", "5"], out_of_range("--width", 4)),
    (["--lr", "-0.1"], out_of_range("--lr", 0)),
    (["--column-devices", "cuda:0,cuda:0"],
     "--column-devices cuda:0,cuda:0: it places the columns of --parallel columns; add that"),
    (["--parallel", "columns", "--column-devices", "gpu0,gpu1"],
     "--column-devices gpu0,gpu1: expected two devices like cuda:0,cuda:1"),
    (["--parallel", "columns", "--column-devices", "cuda:0"], "--column-devices cuda:0: expected two devices"),
    # an empty entry is an error, not dropped (it was: cuda:0,,cuda:1 ran as cuda:0,cuda:1)
    (["--parallel", "columns", "--column-devices", "cuda:0,,cuda:1"],
     "error: --column-devices 'cuda:0,,cuda:1': an empty entry between commas; expected two devices like cuda:0,cuda:1"),
    (["--gpus", "2", "--batch", "8", "--rank-devices", "cuda:0"],
     "error: --rank-devices cuda:0: expected one CUDA device per rank (--gpus 2) like cuda:0,cuda:1 (or cuda:0,cuda:0 "
     "to share one GPU)"),
    (["--gpus", "2", "--batch", "8", "--rank-devices", "cpu,cpu"], "--rank-devices cpu,cpu: expected one CUDA device"),
    (["--gpus", "2", "--batch", "8", "--rank-devices", "cuda:0,cuda:0", "--device", "cpu"],
     "error: --rank-devices cuda:0,cuda:0: places the ranks on GPUs, but --device is cpu"),
    (["--decode-share", "0.3"], "error: --decode-share 0.3: it splits the batches of --decode mixed; add that"),
    (["--decode", "mixed", "--decode-share", "1"], "error: --decode-share must be between 0 and 1"),
    (["--schedule", "steps", "--lr-steps", "1,"],
     "error: --lr-steps '1,': an empty entry between commas; expected epochs like 30,60,80"),
    (["--schedule", "steps", "--lr-steps", "x"], "error: --lr-steps 'x': expected epochs like 30,60,80"),
    (["--augment", "mean,,flip"],
     "error: --augment 'mean,,flip': an empty entry between commas; expected registered names like mean,crop,flip,pca"),
])
def test_bad_options(train_data, tmp_path, args, message):
    r = run_here("train", "--data", train_data, "--out", tmp_path / "x", "--width", "0.125", "--init", "kaiming",
                "--epochs", "1", *args)
    assert r.returncode == 2 and says(r.stderr, message), r.stderr


def test_missing_data_folder(tmp_path):
    r = run_here("train", "--data", tmp_path / "nope", "--out", tmp_path / "x")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such data folder (prepare one with `alexcli prepare SRC --out {tmp_path / 'nope'}`)"


def test_photos_or_downloads_as_data_get_the_commands_that_prepare_them(demo_src, tmp_path):
    """--data PHOTOS: prepare them (to shards/NAME), then train on that; never `prepare --out PHOTOS`."""
    r = run_here("train", "--data", demo_src, "--out", tmp_path / "x")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {demo_src}: photos or downloads, not a prepared data set: prepare it with "
                                f"`alexcli prepare {demo_src}`, then use --data shards/{demo_src.name}")
    download = tmp_path / "cifar-10-python.tar.gz"
    download.write_bytes(b"\x1f\x8b")
    r = run_here("train", "--data", download, "--out", tmp_path / "y")
    assert r.stderr.strip() == (f"error: {download}: a file, not a prepared data set: prepare it with `alexcli prepare "
                                f"{download}`, then use --data shards/cifar10")
    (tmp_path / "empty").mkdir()
    r = run_here("train", "--data", tmp_path / "empty", "--out", tmp_path / "z")
    assert "no dataset.json, so not a prepared data set (`alexcli prepare SRC` writes one" in r.stderr
    assert "--out " + str(tmp_path / "empty") not in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_batch_torchrun_cannot_split_is_refused_before_any_work(train_data, tmp_path, monkeypatch):
    """Under torchrun (RANK, WORLD_SIZE set) --gpus stays 1: --batch 5 over 2 ranks trained on 4
    images a step without a word. Now one line, exit 2, before the process group or the run folder."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    out = tmp_path / "odd"
    r = run_here("train", "--data", train_data, "--out", out, *TINY_TRAIN, "--batch", "5", "--epochs", "1")
    assert (r.returncode, r.stderr) == (2, "error: --batch 5 does not split evenly over the 2 ranks torchrun started "
                                           "(WORLD_SIZE)\n")
    assert not out.exists()


def test_torchrun_launch_on_cpu(train_data, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "trun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "alexcli", "train", "--data", str(train_data), "--out", str(out), *TINY_TRAIN,
           "--epochs", "1", "--device", "cpu", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # only rank 0 prints
    assert summary["world"] == 2 and summary["rank"] == 0
    from alexcli.model.registry import Arch, build_model, count_parameters

    eight = count_parameters(build_model(Arch(num_classes=8, width=0.125, crop=64, init="kaiming"))[0])
    assert summary["parameters"] == eight  # fc8 sized to the 8 demo classes, not 1000


def test_keep_prunes_old_checkpoints_but_not_the_best(train_data, tmp_path):
    out = tmp_path / "keep"
    r = train(train_data, out, "--epochs", "3", "--keep", "1", "--json")
    assert r.returncode == 0, r.stderr
    best = json.loads(r.stdout)["best_epoch"]
    kept = sorted(p.name for p in out.glob("ckpt-e*.safetensors"))
    assert kept == sorted({"ckpt-e003.safetensors", f"ckpt-e{best:03d}.safetensors"})
    assert sorted(p.name for p in out.glob("state-e*")) == ["state-e003.json", "state-e003.safetensors"]


def test_input_scale_is_recorded_and_eval_uses_it(train_data, tmp_path):
    """`--input-scale 255` (the paper's raw pixel values) travels in the checkpoint's arch, and eval
    rebuilds the network with it: its error equals the one train measured on the same split."""
    out = tmp_path / "raw"
    r = train(train_data, out, "--epochs", "1", "--input-scale", "255", "--lr", "0.0001", "--json")
    assert r.returncode == 0, r.stderr
    from alexcli.checkpoint import read_meta

    ckpt = out / "ckpt-e001.safetensors"
    assert read_meta(ckpt)["arch"]["input_scale"] == 255.0
    r = run_here("eval", ckpt, "--data", train_data, "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(r.stdout)["models"][0]["top1_error"] == pytest.approx(metrics["val_top1_error"], abs=1e-9)


def test_lrn_divisor_script_measures_what_lrn_does(run3, train_data, capsys):
    """scripts/lrn_divisor.py: the divisor relative to k^beta is at least 1 everywhere, and on
    0..1 input (this run's scale) it is within 1% of 1: LRN there is a constant factor."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "lrn_divisor.py"
    spec = importlib.util.spec_from_file_location("lrn_divisor", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main([str(run3[0] / "ckpt-e003.safetensors"), "--data", str(train_data), "--images", "16",
                          "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["images"] == 16 and result["input_scale"] == 1.0
    assert set(result["layers"]) == {"norm1", "norm2"}
    for layer in result["layers"].values():
        assert list(layer["k_beta"]) == [2.0, 0.75] and layer["values"] > 0
        assert 1.0 - 1e-9 <= layer["median"] <= layer["p99"] <= layer["max"] < 1.01


@pytest.fixture(scope="module")
def train_test_data(demo_src, tmp_path_factory):
    """A data set with train and test splits and no val (as CIFAR-10's download gives)."""
    import shutil

    src = tmp_path_factory.mktemp("no-val-src")
    shutil.copytree(demo_src / "train", src / "train")
    shutil.copytree(demo_src / "val", src / "test")
    out = tmp_path_factory.mktemp("no-val") / "data"
    prepare(src, out, PrepareConfig(size=72, shard_size=12, workers=1, seed=0))
    return out


def test_without_a_val_split_the_message_offers_test_and_other_schedules(train_test_data, tmp_path):
    out = tmp_path / "plateau"
    r = run_here("train", "--data", train_test_data, "--out", out, *TINY_TRAIN[:-4], "--epochs", "2")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {train_test_data}: no val split, so the plateau schedule cannot see the "
                                "error stop improving; use --val-split test (this data set has a test split) or "
                                "--schedule cosine, constant or steps to train without validation")
    assert not out.exists()


def test_validate_on_test_or_train_without_validation(train_test_data, tmp_path):
    import math

    base = TINY_TRAIN[:-4]  # without its --schedule steps --lr-steps 2
    r = run_here("train", "--data", train_test_data, "--out", tmp_path / "on-test", *base, "--epochs", "2",
                 "--val-split", "test", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["last"]["val_top1_error"] is not None
    rows = [json.loads(x) for x in (tmp_path / "on-test" / "metrics.jsonl").read_text().splitlines()]
    r = run_here("eval", tmp_path / "on-test" / "ckpt-e002.safetensors", "--split", "test", "--json")
    assert json.loads(r.stdout)["models"][0]["top1_error"] == pytest.approx(rows[-1]["val_top1_error"], abs=1e-12)

    out = tmp_path / "cosine"
    r = run_here("train", "--data", train_test_data, "--out", out, *base, "--epochs", "4", "--schedule", "cosine",
                 "--warmup", "1", "--val-split", "none", "--lr", "0.02", "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_top1_error"] for m in rows] == [None] * 4
    assert [m["lr"] for m in rows] == pytest.approx([0.01] + [0.02 * 0.5 * (1 + math.cos(math.pi * t / 3))
                                                              for t in range(3)])


@pytest.mark.parametrize("args,message", [
    (["--crop", "80"], "--crop 80 is larger than the 72x72 images of"),
    (["--epochs", "-1"], "Invalid value for '--epochs'"),
    (["--schedule", "steps", "--epochs", "1"], "--schedule steps over 1 epoch(s) has no epoch to divide lr after"),
    (["--batch", "100000", "--crop", "64"], "--batch 100000: larger than the training split"),
])
def test_dry_run_makes_the_checks_a_real_run_makes(train_data, tmp_path, args, message):
    r = run_here("train", "--data", train_data, "--out", tmp_path / "x", "--width", "0.125", "--batch", "8", "--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_removing_snapshots_keeps_one_and_clears_orphans(tmp_path):
    """preempt.remove: every snapshot but the one kept goes, markers first; tensor files a kill left
    without their marker go too; nothing else in the folder is touched."""
    from alexcli.train import preempt

    for e, s in ((2, 5), (2, 10), (3, 4)):
        for n in preempt.names(e, s):
            (tmp_path / n).write_text("x")
    orphans = [preempt.names(4, 1)[0], preempt.names(4, 1)[1]]  # tensors of a snapshot whose marker never came
    for n in orphans:
        (tmp_path / n).write_text("x")
    (tmp_path / "ckpt-e002.safetensors").write_text("x")
    (tmp_path / "notes-e2-s5.safetensors").write_text("mine")
    preempt.remove(tmp_path, keep=(2, 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*preempt.names(2, 10), "ckpt-e002.safetensors", "notes-e2-s5.safetensors"])
