"""`train --tensorboard DIR`: the event files read back as TensorBoard reads them (EventAccumulator)
hold the metrics rows, the loss checks, conv1's kernels and the settings; a resumed run continues
the same curves; the package missing, a bad DIR or a full disk is one line."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_TRAIN, run_here

pytest.importorskip("tensorboard", reason="the tensorboard extra: pip install 'alexcli[tensorboard]'")

BATCH = 4      # 48 training images: 12 steps an epoch, so loss checks at steps 10 and 12
STEPS = 12


def train(data, out, *extra):
    return run_here("train", "--data", data, "--out", out, *TINY_TRAIN, "--batch", str(BATCH), *extra)


def events(folder):
    """Everything TensorBoard shows of FOLDER (no sampling: every event kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> dict[int, float]:
    out = {}
    for e in acc.Scalars(tag):
        assert e.step not in out, f"{tag}: two values at step {e.step}"
        out[e.step] = e.value
    return out


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def loss_checks(epochs: int) -> list[int]:
    """The global steps of the loss checks: every LOG_EVERY steps and each epoch's last."""
    from alexcli.train.step import LOG_EVERY

    per_epoch = sorted({*range(LOG_EVERY, STEPS + 1, LOG_EVERY), STEPS})
    return [(e - 1) * STEPS + n for e in range(1, epochs + 1) for n in per_epoch]


def curves(row: dict) -> dict:
    """The fields of a metrics row that become epoch/ curves."""
    from alexcli.train.tensorboard import NOT_CURVES

    return {k: v for k, v in row.items()
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool)}


@pytest.fixture(scope="module")
def tb_run(train_data, tmp_path_factory):
    """2 epochs logged to a --tensorboard DIR outside the run folder."""
    root = tmp_path_factory.mktemp("tb")
    out, tb = root / "run", root / "board" / "run"
    r = train(train_data, out, "--epochs", "2", "--tensorboard", tb)
    assert r.returncode == 0, r.stderr
    assert not (out / "tensorboard").exists()
    return out, tb, events(tb)


def test_epoch_scalars_are_the_metrics_rows(tb_run):
    out, _, acc = tb_run
    rs = rows(out)
    assert [m["step"] for m in rs] == [STEPS, 2 * STEPS]
    wanted = {f"epoch/{k}" for k in curves(rs[0])}
    assert wanted >= {"epoch/train_loss", "epoch/train_top1_error", "epoch/val_top1_error", "epoch/val_top5_error",
                      "epoch/val_loss", "epoch/lr", "epoch/images_per_s"}
    assert {t for t in acc.Tags()["scalars"] if t.startswith("epoch/")} == wanted
    for k in curves(rs[0]):
        logged = scalars(acc, f"epoch/{k}")
        assert logged == {m["step"]: float(np.float32(m[k])) for m in rs}, k
    best = scalars(acc, "best/val_top1_error")
    assert best == {m["step"]: float(np.float32(min(r["val_top1_error"] for r in rs[:i + 1])))
                    for i, m in enumerate(rs)}


def test_loss_checks_are_logged_at_increasing_global_steps(tb_run):
    out, _, acc = tb_run
    for tag in ("train/loss", "train/lr", "train/images_per_s"):
        logged = scalars(acc, tag)
        assert list(logged) == loss_checks(2), tag  # in order, each once
        assert all(np.isfinite(v) and v > 0 for v in logged.values()), tag
    lr = scalars(acc, "train/lr")
    assert set(lr.values()) == {float(np.float32(0.01))}  # --lr-steps 2: divided after epoch 2
    # the last check of an epoch averages the steps since the one before; epoch 1's first check covers its
    # first 10 steps: together they are the epoch's mean loss
    loss, row = scalars(acc, "train/loss"), rows(out)[0]
    assert (10 * loss[10] + 2 * loss[12]) / 12 == pytest.approx(row["train_loss"], rel=1e-5)


def test_conv1_kernels_are_an_image_each_epoch(tb_run):
    from PIL import Image

    from alexcli.checkpoint import load_checkpoint
    from alexcli.figures.kernels import first_layer_weight, kernel_grid

    out, _, acc = tb_run
    images = acc.Images("conv1/kernels")
    assert [e.step for e in images] == [STEPS, 2 * STEPS]
    for epoch, e in enumerate(images, 1):
        ckpt = load_checkpoint(out / f"ckpt-e{epoch:03d}.safetensors")
        want = kernel_grid(first_layer_weight(ckpt.model_state), ckpt.meta["arch"]["groups"])[0]
        got = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert (e.height, e.width) == want.shape[:2] == got.shape[:2]
        assert np.array_equal(got, want), f"epoch {epoch}: not the checkpoint's kernels"


def test_the_settings_are_hparams_and_text(tb_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from alexcli.train.tensorboard import METRICS

    out, tb, acc = tb_run
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(c)
               for tag, c in acc.PluginTagToContent("hparams").items()}
    assert set(content) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    config = json.loads((out / "state-e002.json").read_text())["config"]
    hp = content["_hparams_/session_start_info"].session_start_info.hparams
    assert set(hp) >= set(config) | {"arch.name", "arch.width", "arch.groups", "arch.crop"}
    assert hp["lr"].number_value == 0.01 and hp["batch"].number_value == BATCH
    assert hp["schedule"].string_value == "steps" and hp["augment"].string_value == "mean,crop,flip,pca"
    assert hp["arch.width"].number_value == 0.125 and hp["arch.init"].string_value == "kaiming"
    assert hp["tensorboard"].string_value == str(tb)
    assert [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos] == list(METRICS)
    assert set(METRICS) <= set(acc.Tags()["scalars"])  # what the HParams table shows exists
    assert content["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    (text,) = acc.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert "Run started." in shown and "| lr | 0.01 |" in shown and "| arch.width | 0.125 |" in shown


def test_resume_continues_the_curves_and_overwrite_clears_only_its_own(tb_run, train_data, tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    whole = tb_run[2]
    out = tmp_path / "run"
    own = out / "tensorboard"
    assert train(train_data, out, "--epochs", "1", "--tensorboard", "auto").returncode == 0
    (first,) = own.glob("events.out.tfevents.*")
    with open(first, "ab") as f:  # what a run killed after its last save had logged: hidden on resume
        for tag, step in (("train/loss", STEPS + 10), ("epoch/train_loss", 2 * STEPS)):
            value = summary_pb2.Summary.Value(tag=tag, simple_value=99.0)
            RecordWriter(f).write(event_pb2.Event(step=step, wall_time=1.0, summary=summary_pb2.Summary(
                value=[value])).SerializeToString())
    assert 99.0 in scalars(events(own), "train/loss").values()
    r = train(train_data, out, "--epochs", "2", "--resume")  # no --tensorboard: the run's own setting goes on
    assert r.returncode == 0, r.stderr
    acc = events(own)
    assert list(scalars(acc, "train/loss")) == loss_checks(2)
    # the exact resume logs the uninterrupted run's numbers, at its steps
    for tag in ("train/loss", "train/lr", "epoch/train_loss", "epoch/val_top1_error", "epoch/val_loss", "epoch/lr"):
        assert scalars(acc, tag) == scalars(whole, tag), tag
    for k in curves(rows(out)[1]):
        assert scalars(acc, f"epoch/{k}") == {m["step"]: float(np.float32(m[k])) for m in rows(out)}, k
    assert [e.step for e in acc.Images("conv1/kernels")] == [STEPS, 2 * STEPS]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0, STEPS]  # started, resumed after epoch 1
    assert "Run resumed after epoch 1." in acc.Tensors("config/text_summary")[1].tensor_proto.string_val[0].decode()

    # --overwrite clears the run's own folder, and leaves a folder of the user's in the run folder alone
    mine = out / "my-board"
    mine.mkdir()
    (mine / "events.out.tfevents.1.host.1.0").write_bytes(b"not ours")
    r = train(train_data, out, "--epochs", "1", "--tensorboard", "auto", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (mine / "events.out.tfevents.1.host.1.0").read_bytes() == b"not ours"
    assert len(list(own.glob("events.out.tfevents.*"))) == 1
    assert list(scalars(events(own), "train/loss")) == loss_checks(1)


def test_without_the_package_train_refuses_at_once(train_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    out = tmp_path / "never"
    r = train(train_data, out, "--epochs", "1", "--tensorboard", "auto")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --tensorboard needs the tensorboard package: pip install 'alexcli[tensorboard]'"
    assert not out.exists()


def test_a_tensorboard_dir_that_is_a_file_is_one_line(train_data, tmp_path):
    afile = tmp_path / "board"
    afile.write_text("x")
    out = tmp_path / "never"
    r = train(train_data, out, "--epochs", "1", "--tensorboard", afile)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --tensorboard {afile}: exists and is not a folder"
    assert not out.exists() and afile.read_text() == "x"


def _small_disk_probe() -> str | None:
    import shutil

    if shutil.which("unshare") is None:
        return "no unshare command"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True, text=True, timeout=30)
    return None if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


def test_a_full_disk_under_the_events_is_one_line_and_the_run_resumes(train_data, tmp_path):
    why = _small_disk_probe()
    if why:
        pytest.skip(f"needs a small tmpfs: {why}")
    disk, out = tmp_path / "disk", tmp_path / "run"
    disk.mkdir()
    cmd = " ".join(shlex.quote(str(a)) for a in [
        sys.executable, "-m", "alexcli", "train", "--data", train_data, "--out", out, *TINY_TRAIN, "--batch", BATCH,
        "--epochs", "2", "--tensorboard", disk / "tb"])
    # 8 KB: the settings and the loss checks fit, the first kernels picture does not
    script = f"mount -t tmpfs -o size=8k tmpfs {shlex.quote(str(disk))} || exit 99\n{cmd}"
    r = subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {disk / 'tb'}: no space left on device writing TensorBoard events ("), line
    assert line.endswith("--resume (or give --tensorboard '' to go on without it)"), line
    assert (out / "state-e001.json").is_file()  # the epoch was committed before its events were written
    r = train(train_data, out, "--epochs", "2", "--resume", "--tensorboard", "")
    assert r.returncode == 0, r.stderr
    assert [m["epoch"] for m in rows(out)] == [1, 2]
