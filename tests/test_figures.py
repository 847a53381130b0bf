"""predict, kernels and neighbors (section 6.1) against plain reference computations."""

import io
import json
import shutil
import tarfile
from pathlib import Path

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


def tile_top(pic, want, left, start=0):
    """The first row at or below START where the tile WANT sits at column LEFT (None if nowhere)."""
    t = len(want)
    for y in range(start, len(pic) - t + 1):
        if np.array_equal(pic[y:y + t, left:left + t], want):
            return y
    return None


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
    assert info == {"out": str(out), "kernels": n, "columns": 2, "kernel_size": [k, k], "scale": scale,
                    "pixels": info["pixels"], "normalisation": "min-max per kernel"}
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    pic = np.asarray(Image.open(out).convert("RGB"))
    assert list(pic.shape) == [info["pixels"][1], info["pixels"][0], 3]
    # n/2 kernels per column block, in one row of tiles here (fewer than 16 per column);
    # tiles of k*scale with scale pixels of white around them; each block under a text strip
    per_col, tile, pad, gap = n // 2, k * scale, scale, 4 * scale

    def want(i):
        kern = w[i]
        norm = (kern - kern.min()) / (kern.max() - kern.min())
        return np.rint(norm.transpose(1, 2, 0) * 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)

    assert pic.shape[1] == per_col * tile + (per_col + 1) * pad
    tops = [tile_top(pic, want(0), pad), tile_top(pic, want(per_col), pad)]
    assert None not in tops and tops[0] + tile + pad + gap < tops[1]
    for i in range(n):
        g, c = divmod(i, per_col)
        top, left = tops[g], pad + c * (tile + pad)
        assert np.array_equal(pic[top:top + tile, left:left + tile], want(i)), f"kernel {i}"
        assert (pic[top - pad:top, left:left + tile] == 255).all() and (pic[top + tile:top + tile + pad] == 255).all()
    # the title strip above the first block, and column 1's label between the two blocks: text (dark
    # pixels) where the grid alone has white
    title, label = pic[:tops[0] - pad], pic[tops[0] + tile + pad:tops[1] - pad]
    assert (title.min(2) < 128).sum() > 100 and (label.min(2) < 128).sum() > 100
    assert (pic[tops[0] + tile + pad:tops[0] + tile + pad + gap] == 255).all()  # the gap after column 0


def test_kernels_title_names_the_checkpoint_and_columns(model, tmp_path):
    from alexcli.figures.kernels import column_label, write_kernels

    result = write_kernels(model, tmp_path / "k.png", scale=2)
    assert result["title"].startswith(f"{model.name}, epoch 1: ") and "2 columns" in result["title"]
    assert column_label(0, 2) == "column 0 (GPU 1 in the paper)" and "GPU 2" in column_label(1, 2)


def test_kernels_default_scale_is_the_smallest_making_800_pixels(model, tmp_path, capsys):
    from alexcli.checkpoint import load_checkpoint

    w = load_checkpoint(model).model_state["conv1.weight"]
    n, k = w.shape[0], w.shape[2]
    across = min(16, n // 2)

    def width(scale):  # tiles of k*scale with scale pixels between and around them
        return across * k * scale + (across + 1) * scale

    out = tmp_path / "auto.png"
    assert cli("kernels", model, "--out", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    s = info["scale"]
    assert width(s) >= 800 > width(s - 1) and info["pixels"][0] == width(s)
    with Image.open(out) as im:
        assert im.size == tuple(info["pixels"])
    assert cli("kernels", model, "--out", tmp_path / "zero.png", "--scale", "0", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {**info, "out": str(tmp_path / "zero.png")}
    # an explicit scale keeps its limit
    assert cli("kernels", model, "--out", tmp_path / "huge.png", "--scale", "100000") == 2
    assert "more than 64 million pixels; use --scale " in capsys.readouterr().err


def test_kernels_needs_a_png_name(model, tmp_path, capsys):
    assert cli("kernels", model, "--out", tmp_path / "k.jpg") == 2
    assert "PNG" in capsys.readouterr().err


def visible_xticks(ax):
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


CURVE_ROW = {"train_loss": 2.0, "val_loss": 2.1, "train_top1_error": 0.8, "val_top1_error": 0.85,
             "val_top5_error": 0.4}


@pytest.mark.parametrize("epochs", [1, 3])
def test_curves_are_titled_with_the_run_and_tick_whole_epochs(tmp_path, monkeypatch, epochs):
    from alexcli.figures import plot

    drawn = []
    monkeypatch.setattr(plot, "save_figure", lambda fig, out, dpi=100: drawn.append(fig) or out)
    rows = [dict(CURVE_ROW, epoch=e) for e in range(1, epochs + 1)]
    plot.write_curves(tmp_path / "my-run" / "curves.png", rows)
    (fig,) = drawn
    assert fig._suptitle is not None and fig._suptitle.get_text().startswith("run my-run")
    for ax in fig.axes:
        ticks = visible_xticks(ax)
        assert ticks and all(t == int(t) for t in ticks), ticks
        assert set(range(1, epochs + 1)) <= set(ticks)


@pytest.mark.parametrize("target, label", [(0.25, "25% training error (the paper's target)"),
                                           (0.5, "50% training error (--target)")])
def test_figure1_labels_its_target_line_and_ticks_whole_epochs(target, label):
    from alexcli.figures.plot import experiment_plot, pyplot

    def run(lr, rate):
        return {"lr": lr, "arch": {"num_classes": 10},
                "history": [{"epoch": e, "train_error": 0.9 * rate ** e} for e in range(1, 5)]}

    fig = experiment_plot("relu-vs-tanh", {"relu": [run(0.01, 0.6)], "tanh": [run(0.01, 0.8)]}, 4, target)
    (ax,) = fig.axes
    lines = [line for line in ax.get_lines() if list(line.get_ydata()) == [target, target]]
    assert [line.get_label() for line in lines] == [label]
    assert label in [t.get_text() for t in ax.get_legend().get_texts()]
    ticks = visible_xticks(ax)
    assert ticks == [0, 1, 2, 3, 4], ticks
    pyplot().close(fig)


def test_neighbors_finds_the_query_itself_and_caches(model, train_data, demo_src, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from alexcli.checkpoint import load_checkpoint, save_checkpoint
    from alexcli.figures import neighbors as nb_module

    run = tmp_path / "run"
    run.mkdir()
    ckpt_path = run / model.name
    shutil.copy(model, ckpt_path)
    samples = train_samples(train_data)
    source = {s[0]: s[1] for s in samples}  # key -> the source path its KEY.json records
    key, rel, label, _ = samples[5]
    query = demo_src / rel
    unlabelled = tmp_path / "loose" / "photo.jpg"  # in no folder named after a class
    unlabelled.parent.mkdir()
    shutil.copy(query, unlabelled)
    fig = tmp_path / "nn.png"
    args = ("neighbors", ckpt_path, query, "--data", train_data, "--k", "3", "--device", "cpu", "--workers", "0",
            "--batch", "16", "--json")

    drawn = []
    save = nb_module.save_figure
    monkeypatch.setattr(nb_module, "save_figure", lambda f, out: drawn.append(f) or save(f, out))
    assert cli(*args, unlabelled, "--out", fig) == 0
    first = json.loads(capsys.readouterr().out)
    cache = run / f"features-{ckpt_path.stem}-train.safetensors"
    assert first["features"] == {**first["features"], "cache": str(cache), "reused": False,
                                 "images": len(samples), "dtype": "float16"}
    nbrs = first["queries"][0]["neighbors"]
    assert len(nbrs) == 3 and nbrs[0]["key"] == key and nbrs[0]["index"] == label
    assert nbrs[0]["distance"] < 1e-3 < nbrs[1]["distance"]
    assert [n["distance"] for n in nbrs] == sorted(n["distance"] for n in nbrs)
    assert fig.read_bytes().startswith(PNG_SIGNATURE)
    # each neighbour named by its source file; the query labelled by the class its folder names
    classes = json.loads((train_data / "dataset.json").read_text())["classes"]
    assert nbrs[0]["source"] == rel and all(n["source"] == source[n["key"]] for q in first["queries"]
                                            for n in q["neighbors"])
    assert first["queries"][0]["label"] == {**first["queries"][0]["label"], "index": label,
                                            "class": query.parent.name}
    assert classes[label] == query.parent.name and first["queries"][1]["label"] is None
    (picture,) = drawn
    captions = [ax.get_xaxis().get_label().get_text() for ax in picture.axes]
    k = 3
    assert captions[0].startswith("label: ") and captions[k + 1] == "no label"
    assert captions[1:k + 1] == [Path(n["source"]).name for n in nbrs]

    assert cli(*args[:-1]) == 0  # the table: the source files, the query's class
    table = capsys.readouterr().out
    assert f"its folder names class {first['queries'][0]['label']['name']}" in table
    assert all(n["source"] in table for n in nbrs) and f"{nbrs[0]['shard']}:" not in table
    args = args + (unlabelled,)

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
