"""Edited data sets and options beyond reason: one line naming the file or option, exit 2, never a
traceback or an allocation that takes the machine down."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY_TRAIN, run_cli, run_here


@pytest.fixture
def cli():
    def run(*args):
        r = run_here(*args)
        return r.returncode, r.stderr.strip().splitlines()[-1]  # after any progress lines: the error
    return run


@pytest.fixture
def data(train_data, tmp_path):
    """A copy of the small prepared data set, to edit."""
    return shutil.copytree(train_data, tmp_path / "data")


def test_a_shortened_class_list_is_one_line(data, tmp_path, cli):
    m = json.loads((data / "dataset.json").read_text())
    m["classes"], m["class_names"] = m["classes"][:3], m["class_names"][:3]
    (data / "dataset.json").write_text(json.dumps(m))
    code, err = cli("train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1")
    assert code == 2, err
    assert err.startswith(f"error: {data}/") and ": class " in err and "dataset.json lists 3 classes" in err, err


def test_class_names_that_do_not_match_the_classes_are_one_line(data, tmp_path, cli):
    m = json.loads((data / "dataset.json").read_text())
    m["class_names"] = m["class_names"][:3]
    (data / "dataset.json").write_text(json.dumps(m))
    code, err = cli("train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1")
    assert code == 2 and err == (f"error: {data}: class_names lists 3 names, but classes lists 8; "
                                 f"run `alexcli verify {data}`"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit", [lambda e: e.update(samples="x"), lambda e: e.update(name="../../etc/passwd"),
                                  lambda e: e.pop("sha256"), lambda e: e.update(bytes=-1)])
def test_an_edited_shard_entry_is_one_line_in_every_command(data, tmp_path, cli, edit):
    """samples: "x" ended train in `internal: TypeError`; a name like ../../etc/passwd was read as a path."""
    m = json.loads((data / "dataset.json").read_text())
    edit(m["splits"]["train"]["shards"][0])
    (data / "dataset.json").write_text(json.dumps(m))
    expected = (f"error: {data}: 1 train shard entries of dataset.json lack a plain file name, bytes, samples or "
                f"sha256; run `alexcli verify {data}`")
    assert cli("train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1") == (2, expected)
    assert not (tmp_path / "run").exists()
    r = run_here("verify", data)
    assert r.returncode != 0 and f"{data}: 1 train shard entries of dataset.json lack a plain file name" in r.stdout + r.stderr


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 100, b"not safetensors at all, but text"])
def test_garbage_stats_are_one_line(data, tmp_path, cli, garbage):
    (data / "stats.safetensors").write_bytes(garbage)
    code, err = cli("train", "--data", data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1")
    assert code == 2, err
    assert err.startswith(f"error: {data / 'stats.safetensors'}: unreadable ("), err
    assert not (tmp_path / "run").exists()


def test_kernels_scale_beyond_reason_is_refused(train_data, tmp_path, cli):
    code, _ = cli("train", "--data", train_data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1",
                  "--steps-per-epoch", "1")
    assert code == 0
    code, err = cli("kernels", tmp_path / "run" / "ckpt-e001.safetensors", "--out", tmp_path / "k.png",
                    "--scale", "100000")
    assert code == 2 and err.startswith("error: --scale 100000 makes a ") and "use --scale " in err, err
    assert not (tmp_path / "k.png").exists()


def test_predict_reads_only_regular_files(train_data, tmp_path, cli):
    """`predict CKPT FIFO` waited for ever for a writer, `predict CKPT /dev/zero` read until the OOM
    killer came: images are read as prepare reads them (a regular file, a size limit)."""
    import os

    code, _ = cli("train", "--data", train_data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1",
                  "--steps-per-epoch", "1")
    assert code == 0
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    ckpt = tmp_path / "run" / "ckpt-e001.safetensors"
    for path, kind in ((fifo, "FIFO"), ("/dev/zero", "character device")):
        r = run_cli("predict", ckpt, path, timeout=300)  # its own process: a regression hangs, then fails here
        assert (r.returncode, r.stderr.strip()) == (2, f"error: {path}: not a regular file ({kind})")


def test_a_val_solution_that_is_a_fifo_is_one_line(tmp_path):
    """prepare of a flat val/ hung when LOC_val_solution.csv was a FIFO."""
    import os

    from PIL import Image

    from alexcli.data.scan import scan
    from alexcli.errors import DataError

    for c in ("n01", "n02"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / c / "a.JPEG")
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    os.mkfifo(tmp_path / "LOC_val_solution.csv")
    with pytest.raises(DataError, match=r"LOC_val_solution.csv: not a regular file \(FIFO\)$"):
        scan(tmp_path)


def test_an_out_below_a_file_and_a_checkpoint_that_is_a_fifo_are_one_line(train_data, tmp_path, cli):
    """kernels --out afile/k.png ended in `afile: File exists` (exit 1); a FIFO given as the
    checkpoint was "no such checkpoint"."""
    import os

    code, _ = cli("train", "--data", train_data, "--out", tmp_path / "run", *TINY_TRAIN, "--epochs", "1",
                  "--steps-per-epoch", "1")
    ckpt = tmp_path / "run" / "ckpt-e001.safetensors"
    (tmp_path / "afile").write_text("mine")
    assert cli("kernels", ckpt, "--out", tmp_path / "afile" / "k.png") == (
        2, f"error: --out {tmp_path / 'afile' / 'k.png'}: {tmp_path / 'afile'} is a file, not a folder")
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert cli("eval", tmp_path / "pipe.safetensors") == (
        2, f"error: {tmp_path / 'pipe.safetensors'}: not a regular file (FIFO), not a checkpoint")
