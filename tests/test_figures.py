"""predict, kernels and neighbors (section 6.1) against plain reference computations."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from alexcli.cli import app, main
from conftest import TINY_TRAIN, run_here

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> int:
    """`alexcli ARGS` in this process, through main's error handling (registers the figure commands
    on the app if alexcli/cli/__init__.py does not yet)."""
    from alexcli.cli.figures import register

    if "predict" not in {c.name for c in app.registered_commands}:
        register(app)
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def model(train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fig-run") / "run"
    r = run_here("train", "--data", train_data, "--out", out, *TINY_TRAIN, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    return out / "ckpt-e001.safetensors"


def train_samples(data):
    """(key, source path, label, jpg bytes) of the training split, read with tarfile."""
    manifest = json.loads((data / "dataset.json").read_text())
    rows = []
    for shard in manifest["splits"]["train"]["shards"]:
        with tarfile.open(data / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[:-5]
            rows.append((key, json.loads(members[name])["path"], int(members[key + ".cls"]), members[key + ".jpg"]))
    return rows


def by_hand(path, size):
    """What prepare makes of a plain RGB file, done with PIL directly: the shorter side scaled to
    SIZE over the central square (bicubic), written as JPEG quality 90, read back."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float64) / 255


def reference_input(path, ckpt, crops):
    size, crop = ckpt.meta["data"]["size"], ckpt.meta["arch"]["crop"]
    x = by_hand(path, size).transpose(2, 0, 1) - ckpt.data["mean_image"].numpy()
    o, e = (size - crop) // 2, size - crop
    if crops == "center":
        patches = [x[:, o:o + crop, o:o + crop]]
    else:
        corners = [x[:, :crop, :crop], x[:, :crop, e:], x[:, e:, :crop], x[:, e:, e:], x[:, o:o + crop, o:o + crop]]
        patches = corners + [p[:, :, ::-1] for p in corners]
    return torch.tensor(np.stack(patches), dtype=torch.float32)


def plain_images(src, n):
    """N RGB JPEG/PNG source files of different classes (the demo also draws CMYK and broken ones)."""
    picked = []
    for folder in sorted((src / "train").iterdir()):
        for f in sorted(folder.iterdir()):
            try:
                with Image.open(f) as im:
                    if im.mode == "RGB":
                        picked.append(f)
                        break
            except Exception:
                continue
        if len(picked) == n:
            break
    return picked


def test_help_of_each_figure_command_has_an_example(capsys):
    for cmd in ("predict", "kernels", "neighbors"):
        assert cli(cmd, "--help") == 0
        assert "Example: alexcli " + cmd in capsys.readouterr().out


@pytest.mark.parametrize("crops", ["center", "ten"])
def test_predict_equals_a_reference_computation(model, demo_src, tmp_path, capsys, crops):
    from alexcli.checkpoint import load_model

    images = plain_images(demo_src, 3)
    fig = tmp_path / "pred.png"
    assert cli("predict", model, *images, "--crops", crops, "--device", "cpu", "--json", "--out", fig) == 0
    result = json.loads(capsys.readouterr().out)
    net, ckpt = load_model(model)
    names = ckpt.meta["class_names"]
    assert len(result["images"]) == 3
    for row, path in zip(result["images"], images):
        with torch.no_grad():
            ref = torch.softmax(net(reference_input(path, ckpt, crops)), 1).mean(0)
        top = row["top"]
        assert len(top) == 5
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        want = ref.topk(5)
        assert [t["index"] for t in top] == want.indices.tolist()
        assert [t["name"] for t in top] == [names[i] for i in want.indices.tolist()]
        np.testing.assert_allclose(probs, want.values.numpy(), atol=1e-5)
        assert row["label"]["class"] == path.parent.name  # the image's folder names its class
    data = fig.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(fig) as im:
        assert im.width > 400 and im.height > 200


def test_predict_table(model, demo_src, capsys):
    image = plain_images(demo_src, 1)[0]
    assert cli("predict", model, image, "--top", "3", "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert str(image) in text and "probability" in text and "%" in text


def test_bad_image_is_one_line_naming_it(model, demo_src, tmp_path, capsys):
    good = plain_images(demo_src, 1)[0]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert cli("predict", model, good, bad) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: ") and "Traceback" not in lines[0]
    assert cli("predict", model, tmp_path / "missing.png") == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.png'}: no such file"


def test_kernels_grid(model, tmp_path, capsys):
    from alexcli.checkpoint import load_checkpoint

    out = tmp_path / "k" / "kernels.png"
    scale = 3
    assert cli("kernels", model, "--out", out, "--scale", scale, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    ckpt = load_checkpoint(model)
    w = ckpt.model_state["conv1.weight"].numpy()
    n, _, k, _ = w.shape
    assert ckpt.meta["arch"]["groups"] == 2
    assert info == {**info, "out": str(out), "kernels": n, "columns": 2, "kernel_size": [k, k]}
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    pic = np.asarray(Image.open(out).convert("RGB"))
    # n/2 kernels per column block, in one row of tiles here (fewer than 16 per column);
    # tiles of k*scale with scale pixels around them, blocks 4*scale apart
    per_col, tile, pad, gap = n // 2, k * scale, scale, 4 * scale
    block_h = tile + 2 * pad
    assert pic.shape == (2 * block_h + gap, per_col * tile + (per_col + 1) * pad, 3)
    assert (pic[block_h:block_h + gap] == 255).all()  # the gap between the columns
    for i in range(n):
        g, c = divmod(i, per_col)
        top, left = g * (block_h + gap) + pad, pad + c * (tile + pad)
        got = pic[top:top + tile, left:left + tile]
        kern = w[i]
        norm = (kern - kern.min()) / (kern.max() - kern.min())
        want = np.rint(norm.transpose(1, 2, 0) * 255).astype(np.uint8)
        assert np.array_equal(got, want.repeat(scale, 0).repeat(scale, 1)), f"kernel {i}"


def test_kernels_needs_a_png_name(model, tmp_path, capsys):
    assert cli("kernels", model, "--out", tmp_path / "k.jpg") == 2
    assert "PNG" in capsys.readouterr().err


def test_neighbors_finds_the_query_itself_and_caches(model, train_data, demo_src, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from alexcli.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    ckpt_path = run / model.name
    shutil.copy(model, ckpt_path)
    samples = train_samples(train_data)
    key, rel, label, _ = samples[5]
    query = demo_src / rel
    fig = tmp_path / "nn.png"
    args = ("neighbors", ckpt_path, query, "--data", train_data, "--k", "3", "--device", "cpu", "--workers", "0",
            "--batch", "16", "--json")

    assert cli(*args, "--out", fig) == 0
    first = json.loads(capsys.readouterr().out)
    cache = run / f"features-{ckpt_path.stem}-train.safetensors"
    assert first["features"] == {**first["features"], "cache": str(cache), "reused": False,
                                 "images": len(samples), "dtype": "float16"}
    nbrs = first["queries"][0]["neighbors"]
    assert len(nbrs) == 3 and nbrs[0]["key"] == key and nbrs[0]["index"] == label
    assert nbrs[0]["distance"] < 1e-3 < nbrs[1]["distance"]
    assert [n["distance"] for n in nbrs] == sorted(n["distance"] for n in nbrs)
    assert fig.read_bytes().startswith(PNG_SIGNATURE)

    # the cache: every training image's code in shard order, with its key and label
    tensors = load_file(cache)
    assert tensors["features"].dtype == torch.float16 and tensors["features"].shape[0] == len(samples)
    keys = [bytes(r.numpy()).rstrip(b"\0").decode() for r in tensors["keys"]]
    assert keys == [s[0] for s in samples] and tensors["labels"].tolist() == [s[2] for s in samples]
    ck = load_checkpoint(ckpt_path)
    from alexcli.checkpoint import load_model

    net, _ = load_model(ckpt_path)
    with torch.no_grad():
        code = net.features(reference_input(query, ck, "center"))[0]
    torch.testing.assert_close(tensors["features"][5].float(), code, atol=2e-3, rtol=2e-3)

    # a second call reads the cache instead of recomputing it
    mtime = cache.stat().st_mtime_ns
    assert cli(*args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["features"]["reused"] is True and cache.stat().st_mtime_ns == mtime
    assert second["queries"] == first["queries"]

    # a different checkpoint under the same name makes the cache stale: recomputed
    with safe_open(str(cache), framework="pt") as f:
        old_fp = json.loads(f.metadata()["alexcli"])["fingerprint"]
    state = {k: v * 1.01 if k.startswith("fc") else v for k, v in ck.model_state.items()}
    save_checkpoint(ckpt_path, state, ck.data, {k: v for k, v in ck.meta.items() if k != "sha256"})
    assert cli(*args) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["features"]["reused"] is False
    with safe_open(str(cache), framework="pt") as f:
        assert json.loads(f.metadata()["alexcli"])["fingerprint"] != old_fp
    assert third["queries"][0]["neighbors"][0]["key"] == key
    assert not list(run.glob("*.tmp"))
