"""The four-layer CIFAR net, its locally connected layer, the architecture registry, and what
`prepare --size 32 --holdout` and the in-memory loader give it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexcli import plugins
from alexcli.data.prepare import PrepareConfig, prepare
from alexcli.errors import UsageError
from alexcli.model.registry import Arch, build_model, count_parameters, make_arch, shapes
from alexcli.model.cifar import LocallyConnected2d
from alexcli.data import dataset, stream, tar
from alexcli.data.memory import load_split
from conftest import out_of_range, run_here, says


def local_reference(x, weight, bias, k, padding, stride):
    """A locally connected layer as loops over output positions, channels and kernel taps."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    out_size = (h + 2 * padding - k) // stride + 1
    out = torch.zeros(n, weight.shape[1], out_size, out_size, dtype=x.dtype)
    for i in range(out_size):
        for j in range(out_size):
            pos = i * out_size + j
            for o in range(weight.shape[1]):
                acc = torch.zeros(n, dtype=x.dtype)
                for ch in range(c):
                    for u in range(k):
                        for v in range(k):
                            acc = acc + xp[:, ch, i * stride + u, j * stride + v] * weight[pos, o, (ch * k + u) * k + v]
                out[:, o, i, j] = acc + bias[o, i, j]
    return out


@pytest.mark.parametrize("size,k,padding,stride", [(5, 3, 1, 1), (6, 3, 0, 2), (4, 2, 1, 1)])
def test_locally_connected_matches_loop_reference(size, k, padding, stride):
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, size, k, padding=padding, stride=stride).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    got = layer(x)
    want = local_reference(x, layer.weight, layer.bias, k, padding, stride)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # gradients too: with respect to the input, the unshared weights and the biases
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, layer.weight, layer.bias), g)
    ref = torch.autograd.grad(want, (x, layer.weight, layer.bias), g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_locally_connected_weights_are_not_shared():
    """Changing one position's weights changes that output position only (unlike a convolution)."""
    layer = LocallyConnected2d(2, 3, 4, 3, padding=1)
    x = torch.randn(1, 2, 4, 4)
    before = layer(x).detach()
    with torch.no_grad():
        layer.weight[5].add_(1.0)  # position (1, 1)
    changed = (layer(x).detach() - before).abs().sum(1)[0] > 0
    assert changed.nonzero().tolist() == [[1, 1]]


def test_locally_connected_rejects_other_sizes():
    layer = LocallyConnected2d(2, 3, 4, 3, padding=1)
    with pytest.raises(UsageError, match="built for 4x4 maps got 5x5"):
        layer(torch.zeros(1, 2, 5, 5))


def cifar_parameters(crop: int, pool_side) -> int:
    """By hand: conv 5x5 3->64 and 64->64 with shared biases; two 3x3 locally connected layers with
    a weight set and a bias per output position; fc10 from 32 maps."""
    s1 = pool_side(crop)
    s2 = pool_side(s1)
    conv = (3 * 25 * 64 + 64) + (64 * 25 * 64 + 64)
    local = s2 * s2 * (32 * 64 * 9 + 32) + s2 * s2 * (32 * 32 * 9 + 32)
    return conv + local + 32 * s2 * s2 * 10 + 10


def test_cifar_net_shapes_and_exact_parameter_count():
    overlap = lambda s: (s - 3) // 2 + 1  # noqa: E731  (max pool 3, stride 2, rounding down)
    for crop in (24, 32):
        model, used = build_model(make_arch("cifar-local", crop=crop))
        assert count_parameters(model) == cifar_parameters(crop, overlap)
        side = overlap(overlap(crop))
        assert shapes(model) == {"conv1": (1, 64, crop, crop), "pool1": (1, 64, overlap(crop), overlap(crop)),
                                 "conv2": (1, 64, overlap(crop), overlap(crop)), "pool2": (1, 64, side, side),
                                 "local3": (1, 32, side, side), "local4": (1, 32, side, side), "fc10": (1, 10)}
        assert used["architecture"] == {"name": "cifar-local", "package": "alexcli",
                                        "version": used["architecture"]["version"]}
        assert used["norm"]["name"] == "lrn"
    assert count_parameters(build_model(make_arch("cifar-local", crop=24))[0]) == 808_138


def test_cifar_net_variants_come_from_the_layer_registry():
    model, used = build_model(make_arch("cifar-local", activation="tanh", norm="none", pool="2x2", crop=32))
    assert isinstance(model.act1, torch.nn.Tanh) and isinstance(model.norm1, torch.nn.Identity)
    assert model.pool1.kernel_size == 2 and model.local3.in_size == 8
    assert {k: v["name"] for k, v in used.items()} == {"architecture": "cifar-local", "activation": "tanh",
                                                        "norm": "none", "pool": "2x2"}


def test_cifar_convnet_init_uses_cuda_convnets_scales():
    torch.manual_seed(0)
    model, _ = build_model(make_arch("cifar-local"))
    stds = {n: float(getattr(model, n).weight.detach().std()) for n in ("conv1", "conv2", "local3", "local4", "fc10")}
    for name, want in {"conv1": 1e-4, "conv2": 1e-2, "local3": 4e-2, "local4": 4e-2, "fc10": 1e-2}.items():
        assert abs(stds[name] / want - 1) < 0.1, (name, stds[name])
        assert not getattr(model, name).bias.detach().any()


def test_cifar_net_rejects_too_small_crop_and_alexnet_inits():
    with pytest.raises(UsageError, match="too small for cifar-local"):
        build_model(make_arch("cifar-local", crop=8))
    with pytest.raises(UsageError, match="must be one of convnet, kaiming, not 'paper'"):
        build_model(make_arch("cifar-local", init="paper"))


def test_architectures_are_registry_entries():
    names = {p.name: p for p in plugins.discover("architecture")}
    assert {"alexnet", "cifar-local"} <= set(names)
    assert names["cifar-local"].builtin and names["cifar-local"].target == "alexcli.model.cifar:cifar_local"
    # an Arch saved before architectures had names is the paper's network
    assert Arch.from_dict({"num_classes": 10, "crop": 64}).name == "alexnet"
    with pytest.raises(Exception, match="unknown architecture 'resnet'; available: alexnet, cifar-local, owt"):
        build_model(Arch(name="resnet"))


def test_cli_lists_architectures_and_rejects_unknown_one(prepared, tmp_path):
    r = run_here("plugins", "--json")
    rows = [p for p in json.loads(r.stdout)["plugins"] if p["kind"] == "architecture"]
    assert {p["name"] for p in rows} >= {"alexnet", "cifar-local"}
    r = run_here("train", "--data", prepared[0], "--out", tmp_path / "run", "--arch", "resnet")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown architecture 'resnet'; available: alexnet, cifar-local, owt"
    assert not (tmp_path / "run").exists()


def test_train_dry_run_and_a_trained_cifar_checkpoint_evaluates(prepared, tmp_path):
    data = prepared[0]
    r = run_here("train", "--data", data, "--arch", "cifar-local", "--dry-run", "--batch", "8", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["arch"]["name"] == "cifar-local" and info["arch"]["crop"] == 24
    assert info["parameters"] == count_parameters(build_model(make_arch("cifar-local", num_classes=8))[0])
    assert info["shapes"]["local3"] == [1, 32, 5, 5]
    out = tmp_path / "run"
    r = run_here("train", "--data", data, "--out", out, "--arch", "cifar-local", "--epochs", "1", "--batch", "16",
                "--loader-workers", "0", "--augment", "mean,crop,flip", "--json")
    assert r.returncode == 0, r.stderr
    trained = json.loads(r.stdout)["last"]
    r = run_here("eval", out / "ckpt-e001.safetensors", "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    # eval's centre patch of the val split is what training measured after its epoch
    assert json.loads(r.stdout)["models"][0]["top1_error"] == pytest.approx(trained["val_top1_error"], abs=1e-12)


# ------------------------------------------------------------------ prepare --size 32 --holdout

def write_cifar_like(root: Path, classes: int = 4, per_class: int = 20, side: int = 32, seed: int = 0) -> Path:
    """Classes told apart by colour, 32x32 JPEGs in train/<class>/ (CIFAR-10's layout)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        base = np.zeros(3)
        base[c % 3] = 200 if c < 3 else 90
        for i in range(per_class):
            px = np.clip(base + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i:04d}.jpg", quality=95)
    return root


def shard_samples(folder: Path, split: str) -> list[dict]:
    """Every sample of SPLIT as {extension: bytes}, read straight from the tar files."""
    samples = []
    for entry in dataset.open_split(folder, split).shards:
        by_key = {}
        for m in tar._ustar_members((folder / entry["name"]).read_bytes(), entry["name"]):
            key, ext = m["fname"].split(".", 1)
            by_key.setdefault(key, {})[ext] = m["data"]
        samples += by_key.values()
    return samples


def test_prepare_holdout_splits_each_class_and_copies_32px_jpegs(tmp_path):
    src = write_cifar_like(tmp_path / "src", per_class=20)
    out = tmp_path / "cifar"
    s = prepare(src, out, PrepareConfig(size=32, holdout=0.25, shard_size=16, workers=1, seed=5))
    assert s["splits"]["train"]["written"] == 60 and s["splits"]["val"]["written"] == 20
    assert "val: 20 training files held out (0.25 of each class, seed 5)" in s["notes"]
    seen = {}
    for split in ("train", "val"):
        for sample in shard_samples(out, split):
            path = json.loads(sample["json"])["path"]
            seen.setdefault(split, []).append(path)
            # a 32x32 RGB JPEG at --size 32 is stored byte for byte (no second lossy encoding)
            assert sample["jpg"] == (src / path).read_bytes()
    assert len(set(seen["train"])) == 60 and len(set(seen["val"])) == 20
    assert not set(seen["train"]) & set(seen["val"])
    per_class_val = {c: sum(p.split("/")[1] == f"class{c}" for p in seen["val"]) for c in range(4)}
    assert per_class_val == {0: 5, 1: 5, 2: 5, 3: 5}
    # the same seed holds out the same files; another seed others
    again = prepare(src, tmp_path / "again", PrepareConfig(size=32, holdout=0.25, shard_size=16, workers=1, seed=5))
    assert again["splits"] == s["splits"]
    other = tmp_path / "other"
    prepare(src, other, PrepareConfig(size=32, holdout=0.25, shard_size=16, workers=1, seed=6))
    assert json.loads((other / "dataset.json").read_text())["fingerprint"] != \
        json.loads((out / "dataset.json").read_text())["fingerprint"]


def test_prepare_holdout_refuses_a_source_with_val(demo_src, tmp_path):
    r = run_here("prepare", demo_src, "--out", tmp_path / "x", "--size", "32", "--holdout", "0.2")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --holdout: {demo_src} already has a val split; hold out only from a " \
                               f"source without one"
    r = run_here("prepare", demo_src, "--out", tmp_path / "x", "--holdout", "1.5")
    assert r.returncode == 2 and says(r.stderr, out_of_range("--holdout", 1))
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ the in-memory split

def test_load_split_holds_the_pixels_the_streaming_loader_gives(prepared):
    data = prepared[0]
    mem = load_split(data, "train")
    sp = dataset.open_split(data, "train")
    assert mem.images.shape == (sp.samples, 3, 32, 32) and mem.images.dtype == torch.uint8
    assert mem.images.is_contiguous()
    jpgs, labels = [], []
    for entry in sp.shards:
        for sample in tar.read_samples(sp.path(entry), entry["samples"]):
            jpgs.append(sample.jpg)
            labels.append(sample.label)
    assert torch.equal(mem.images, stream.decode_batch(jpgs).contiguous())
    assert mem.labels.tolist() == labels
    part = load_split(data, "train", limit=5)
    assert torch.equal(part.images, mem.images[:5]) and part.labels.tolist() == labels[:5]


def test_load_split_refuses_what_does_not_fit_in_memory(prepared, monkeypatch):
    from alexcli.data import memory

    monkeypatch.setattr(memory, "_free_bytes", lambda: 1000)
    with pytest.raises(UsageError, match=r"images of 32x32 need 0\.0 GiB in memory, more than half of the 0\.0 GiB "
                                         r"free; use --subset"):
        load_split(prepared[0], "train")
