"""eval and ensemble against a plain reference computation; fine-tuning from a checkpoint."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN, not_one_of, run_here, says


@pytest.fixture(scope="module")
def two_models(train_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    paths = []
    for seed in ("1", "2"):
        r = run_here("train", "--data", train_data, "--out", root / seed, *TINY_TRAIN, "--epochs", "2", "--seed", seed)
        assert r.returncode == 0, r.stderr
        paths.append(root / seed / "ckpt-e002.safetensors")
    return paths


def reference_probs(ckpt_path, data, crops):
    """Every val image read with tarfile + PIL, and the paper's input built by hand with numpy."""
    from alexcli.checkpoint import load_model

    model, ckpt = load_model(ckpt_path)
    mean = ckpt.data["mean_image"].numpy()
    crop = ckpt.meta["arch"]["crop"]
    manifest = json.loads((data / "dataset.json").read_text())
    probs, labels = [], []
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(data / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            key = name[:-4]
            img = np.asarray(Image.open(io.BytesIO(members[name])).convert("RGB"), dtype=np.float64) / 255
            x = img.transpose(2, 0, 1) - mean
            s, o = x.shape[-1], (x.shape[-1] - crop) // 2
            if crops == "center":
                patches = [x[:, o:o + crop, o:o + crop]]
            else:
                e = s - crop
                corners = [x[:, :crop, :crop], x[:, :crop, e:], x[:, e:, :crop], x[:, e:, e:], x[:, o:o + crop, o:o + crop]]
                patches = corners + [p[:, :, ::-1] for p in corners]
            inp = torch.tensor(np.stack(patches), dtype=torch.float32)
            with torch.no_grad():
                p = torch.softmax(model(inp), 1).mean(0)
            probs.append(p)
            labels.append(int(members[key + ".cls"]))
    return torch.stack(probs), torch.tensor(labels)


def errors(probs, labels):
    top5 = probs.topk(5, 1).indices
    return (float((top5[:, 0] != labels).float().mean()), float((~(top5 == labels[:, None]).any(1)).float().mean()))


@pytest.mark.parametrize("crops", ["center", "ten"])
def test_eval_and_ensemble_equal_the_reference(two_models, train_data, crops):
    r = run_here("ensemble", *two_models, "--data", train_data, "--crops", crops, "--batch", "5", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    refs = [reference_probs(p, train_data, crops) for p in two_models]
    labels = refs[0][1]
    assert got["images"] == len(labels) == 16
    for model, (probs, _) in zip(got["models"], refs):
        assert (model["top1_error"], model["top5_error"]) == pytest.approx(errors(probs, labels), abs=1e-9)
    ens = (refs[0][0] + refs[1][0]) / 2
    assert (got["ensemble"]["top1_error"], got["ensemble"]["top5_error"]) == pytest.approx(errors(ens, labels), abs=1e-9)
    single = json.loads(run_here("eval", two_models[0], "--data", train_data, "--crops", crops, "--json").stdout)
    assert single["models"][0]["top1_error"] == got["models"][0]["top1_error"] and single["ensemble"] is None


def reference_confusion(probs, labels, n):
    c = np.zeros((n, n), dtype=np.int64)
    np.add.at(c, (labels.numpy(), probs.argmax(1).numpy()), 1)
    return c


def test_confusion_matrix_equals_the_reference_and_is_drawn(two_models, train_data, tmp_path):
    refs = [reference_probs(p, train_data, "center") for p in two_models]
    labels = refs[0][1]
    png = tmp_path / "pics" / "confusion.png"
    r = run_here("ensemble", *two_models, "--data", train_data, "--confusion", png, "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    n = len(got["classes"])
    for model, (probs, _) in zip(got["models"], refs):
        assert np.array_equal(np.array(model["confusion"]), reference_confusion(probs, labels, n))
    ens = reference_confusion((refs[0][0] + refs[1][0]) / 2, labels, n)
    assert np.array_equal(np.array(got["ensemble"]["confusion"]), ens)
    # per-class error is the confusion matrix's rows
    assert [c["top1_error"] for c in got["ensemble"]["per_class"] if c["images"]] == [
        1 - ens[i, i] / ens[i].sum() for i in range(n) if ens[i].sum()] and "per_class" in got["ensemble"]
    assert got["confusion_out"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 500
    # the text output: the most confused pairs, largest first, and where the picture went
    r = run_here("eval", two_models[0], "--data", train_data, "--confusion", png)
    assert r.returncode == 0, r.stderr
    assert "most confused (true class -> top-1 prediction)" in r.stdout and f"wrote {png}" in r.stdout
    # without --confusion or --per-class the JSON carries neither
    plain = json.loads(run_here("eval", two_models[0], "--data", train_data, "--json").stdout)
    assert "confusion" not in plain["models"][0] and "per_class" not in plain["models"][0]
    r = run_here("eval", two_models[0], "--data", train_data, "--confusion", tmp_path / "c.jpg")
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --confusion {tmp_path / 'c.jpg'}: pictures are "
                                                      "written as PNG; give a name ending in .png")


def test_most_confused_pairs():
    from alexcli.evaluate import most_confused

    c = [[5, 2, 0], [3, 1, 3], [0, 0, 9]]
    assert most_confused(c) == [(1, 0, 3), (1, 2, 3), (0, 1, 2)]  # ties in class order, the diagonal left out
    assert most_confused(c, k=1) == [(1, 0, 3)] and most_confused([[4, 0], [0, 4]]) == []


def test_eval_finds_its_data_and_prints_a_table(two_models, train_data):
    r = run_here("eval", two_models[0], "--per-class")  # --data defaults to the folder it was trained on
    assert r.returncode == 0, r.stderr
    assert "top-1 error (val)" in r.stdout and "top-1 error per class" in r.stdout and "disc" in r.stdout


def test_ensemble_refuses_different_class_lists(two_models, tmp_path, train_data):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from alexcli.checkpoint import sealed

    other = tmp_path / "other.safetensors"
    with safe_open(str(two_models[1]), "pt") as f:
        meta = json.loads(f.metadata()["alexcli"])
    meta["classes"] = list(reversed(meta["classes"]))
    tensors = load_file(str(two_models[1]))
    save_file(tensors, str(other), {"alexcli": json.dumps(sealed(meta, tensors))})  # a consistent file
    r = run_here("ensemble", two_models[0], other, "--data", train_data)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (f"error: {other} and {two_models[0]} list different classes "
                                                 f"(first difference at index 0); an ensemble needs the same class list")


def test_bad_eval_input(two_models, train_data, tmp_path):
    r = run_here("eval", tmp_path / "missing.safetensors", "--data", train_data)
    assert r.returncode == 2 and "no such checkpoint" in r.stderr
    r = run_here("eval", two_models[0], "--data", train_data, "--crops", "five")
    assert r.returncode == 2 and says(r.stderr, not_one_of("--crops", "five", "'center', 'ten'"))
    r = run_here("eval", two_models[0], "--data", train_data, "--split", "vali")
    assert r.returncode == 2 and says(r.stderr, not_one_of("--split", "vali", "'train', 'val', 'test'"))
    from alexcli.errors import UsageError
    from alexcli.evaluate import score

    with pytest.raises(UsageError, match=r"^--crops must be one of center, ten, not 'five'$"):  # the library, too
        score([two_models[0]], None, crops="five")


def flip_val_jpeg(data):
    """Bytes flipped inside the first JPEG of val-000000.tar: the same size, still a tar, still a JPEG."""
    shard = data / "val-000000.tar"
    with tarfile.open(shard) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    raw = bytearray(shard.read_bytes())
    for i in range(m.offset_data + m.size // 2, m.offset_data + m.size // 2 + 16):
        raw[i] ^= 0x55
    shard.write_bytes(bytes(raw))
    return shard


def test_eval_refuses_a_val_shard_that_is_not_the_one_prepared(two_models, train_data, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(train_data, data)
    shard = flip_val_jpeg(data)
    for cmd in (["eval", two_models[0]], ["ensemble", *two_models]):
        r = run_here(*cmd, "--data", data, "--json")
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.strip().splitlines()[-1] == (f"error: {shard}: sha256 differs from dataset.json (corrupt or "
                                                     f"replaced); run `alexcli verify {data}`")
    r = run_here("eval", two_models[0], "--data", data, "--json", "--no-verify")  # on purpose: it runs
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 16


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_batch_below_one_is_refused(two_models, train_data, batch, capsys):
    from alexcli.cli import main

    for cmd in (["eval", str(two_models[0])], ["ensemble", *map(str, two_models)]):
        assert main([*cmd, "--data", str(train_data), "--batch", batch]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: Invalid value for '--batch'") and err.count("\n") == 1, err
    from alexcli.data.dataset import open_split
    from alexcli.errors import UsageError
    from alexcli.evaluate import score

    with pytest.raises(UsageError, match=rf"^--batch must be at least 1, not {batch}$"):  # the library, too
        score([two_models[0]], open_split(train_data, "val"), batch=int(batch))


def test_fine_tuning_loads_what_fits_and_renews_the_classifier(two_models, demo_src, tmp_path):
    from alexcli.data.prepare import PrepareConfig, prepare
    from safetensors.torch import load_file
    from alexcli.checkpoint import read_meta

    src = tmp_path / "three"  # a data set of 3 of the 8 classes
    for split in ("train", "val"):
        for cls in ("disc", "ring", "waves"):
            shutil.copytree(demo_src / split / cls, src / split / cls)
    data = tmp_path / "three72"
    prepare(src, data, PrepareConfig(size=72, shard_size=8, workers=1))
    out = tmp_path / "ft"
    r = run_here("train", "--data", data, "--out", out, *TINY_TRAIN, "--init", two_models[0], "--conv6",
                "--epochs", "1", "--lr", "0")
    assert r.returncode == 2 and "--lr must be" in r.stderr and "positive" in r.stderr  # train's wording may vary
    r = run_here("train", "--data", data, "--out", out, *[a for a in TINY_TRAIN if a != "kaiming" and a != "--init"],
                "--init", two_models[0], "--conv6", "--epochs", "1", "--lr", "1e-9")
    assert r.returncode == 0, r.stderr
    assert "re-initialised conv6.weight, conv6.bias, fc8.weight, fc8.bias" in r.stderr
    meta = read_meta(out / "ckpt-e001.safetensors")
    assert meta["arch"]["num_classes"] == 3 and meta["arch"]["conv6"] is True
    assert meta["init_from"]["reinitialised"] == ["conv6.weight", "conv6.bias", "fc8.weight", "fc8.bias"]
    before, after = load_file(str(two_models[0])), load_file(str(out / "ckpt-e001.safetensors"))
    # lr 1e-9: one epoch barely moves the loaded weights
    torch.testing.assert_close(after["model.conv1.weight"], before["model.conv1.weight"], atol=1e-6, rtol=0)
    assert after["model.fc8.weight"].shape[0] == 3


def test_init_that_is_neither_preset_nor_file(train_data, tmp_path):
    r = run_here("train", "--data", train_data, "--out", tmp_path / "x", "--init", "resnet")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --init 'resnet': neither a preset of alexnet (paper, convnet2, caffe, kaiming) nor a checkpoint file"


def test_piped_output_is_never_wrapped_or_cut(two_models, train_data, tmp_path):
    """Not on a terminal, rich laid tables out for 80 columns: long paths were split across lines
    and cells cut ("relu-seed0.safete…"). A script reading the table, or a log, gets whole lines."""
    import os
    import shutil
    import subprocess
    import sys

    long = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 2) / "relu-seed0-of-the-experiment.safetensors"
    long.parent.mkdir(parents=True)
    shutil.copy(two_models[0], long)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "alexcli", "eval", str(long), "--data", str(train_data)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert any(f"{long} (epoch 2)" in line for line in r.stdout.splitlines()), r.stdout
    assert "…" not in r.stdout
