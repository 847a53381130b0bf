"""Every command on every registered architecture: train -> eval -> ensemble -> predict -> kernels
-> neighbors, as a user runs them (in-process through the CLI edge, JSON read back)."""

import json

import pytest

from alexcli import plugins
from alexcli.cli import main
from alexcli.data.prepare import PrepareConfig, prepare

# Small settings per architecture: the network's training options and the side of the prepared
# images. A plugin architecture runs at its own default crop, on images 8 pixels larger.
SETTINGS = {
    "alexnet": (["--width", "0.125", "--crop", "64", "--init", "kaiming"], 72),
    "cifar-local": (["--width", "0.25"], 32),
    "owt": (["--width", "0.125", "--crop", "64", "--init", "kaiming"], 72),
}


def settings(name):
    if name in SETTINGS:
        return SETTINGS[name]
    from alexcli.model.registry import make_arch

    return [], make_arch(name).crop + 8


@pytest.fixture(scope="module")
def data_by_size(demo_src, tmp_path_factory):
    made = {}

    def get(size):
        if size not in made:
            made[size] = tmp_path_factory.mktemp("arch-data") / f"demo{size}"
            prepare(demo_src, made[size], PrepareConfig(size=size, shard_size=12, workers=1))
        return made[size]
    return get


def run_json(capsys, *args) -> dict:
    code = main([str(a) for a in args] + ["--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("name", plugins.names("architecture"))
def test_every_command_works_on_every_architecture(name, data_by_size, demo_src, tmp_path, capsys):
    options, size = settings(name)
    data = data_by_size(size)
    run = tmp_path / "run"
    summary = run_json(capsys, "train", "--data", data, "--out", run, "--arch", name, *options, "--epochs", "2",
                       "--batch", "8", "--loader-workers", "0", "--schedule", "steps", "--lr-steps", "1",
                       "--device", "cpu")
    assert summary["epochs"] == 2 and summary["last"]["val_top1_error"] is not None
    ckpts = [run / "ckpt-e001.safetensors", run / "ckpt-e002.safetensors"]
    val_images = json.loads((data / "dataset.json").read_text())["splits"]["val"]["written"]

    ten = run_json(capsys, "eval", ckpts[1], "--data", data, "--crops", "ten", "--device", "cpu")
    assert ten["images"] == val_images and ten["crops"] == "ten"
    centre = run_json(capsys, "eval", ckpts[1], "--data", data, "--device", "cpu")
    # eval's centre-patch error is what training measured on the same split after epoch 2
    assert centre["models"][0]["top1_error"] == pytest.approx(summary["last"]["val_top1_error"], abs=1e-12)

    both = run_json(capsys, "ensemble", *ckpts, "--data", data, "--device", "cpu")
    assert [m["epoch"] for m in both["models"]] == [1, 2] and both["ensemble"]["images"] == val_images

    photo = sorted((demo_src / "val" / "ring").glob("*.JPEG"))[0]
    pred = run_json(capsys, "predict", ckpts[1], photo, "--out", tmp_path / "p.png", "--device", "cpu")
    (row,) = pred["images"]
    assert len(row["top"]) == 5 and row["label"]["class"] == "ring" and (tmp_path / "p.png").is_file()
    assert sum(t["probability"] for t in row["top"]) <= 1 + 1e-6

    kern = run_json(capsys, "kernels", ckpts[1], "--out", tmp_path / "k.png")
    from alexcli.checkpoint import load_checkpoint

    conv1 = next(v for k, v in load_checkpoint(ckpts[1]).model_state.items() if v.dim() == 4)
    assert kern["kernels"] == conv1.shape[0] and (tmp_path / "k.png").is_file()  # every first-layer filter

    nb = run_json(capsys, "neighbors", ckpts[1], photo, "--data", data, "--k", "3", "--out", tmp_path / "n.png",
                  "--device", "cpu")
    layer = plugins.get("architecture", name).feature_layer
    train_images = json.loads((data / "dataset.json").read_text())["splits"]["train"]["written"]
    assert nb["features"]["layer"] == layer and nb["features"]["images"] == train_images
    assert len(nb["queries"][0]["neighbors"]) == 3 and (tmp_path / "n.png").is_file()
    distances = [n["distance"] for n in nb["queries"][0]["neighbors"]]
    assert distances == sorted(distances)


@pytest.mark.parametrize("name", plugins.names("architecture"))
def test_a_setting_the_architecture_does_not_read_is_refused(name, data_by_size, tmp_path, capsys):
    """The CIFAR net has one column, no dropout and no conv6: `--groups 2` on it was recorded in the
    checkpoint and silently ignored (the same 806,536 parameters)."""
    fixed = getattr(plugins.get("architecture", name), "fixed", {})
    options, size = settings(name)
    for field, value in fixed.items():
        other = (not value) if isinstance(value, bool) else {"groups": 2, "dropout": 0.5}[field]
        option = [f"--{field}"] if isinstance(value, bool) else [f"--{field}", str(other)]
        out = tmp_path / field
        code = main(["train", "--data", str(data_by_size(size)), "--out", str(out), "--arch", name, *options, *option,
                     "--dry-run"])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert err.startswith(f"error: {' '.join(option)}: {name} has no such setting (it is always ") and \
            err.endswith("); leave the option out"), err
        assert not out.exists()


def test_cifar_local_declares_what_it_does_not_read():
    assert plugins.get("architecture", "cifar-local").fixed == {"groups": 1, "dropout": 0.0, "conv6": False}


def test_columns_are_refused_for_an_architecture_without_them(data_by_size, tmp_path, capsys):
    code = main(["train", "--data", str(data_by_size(32)), "--out", str(tmp_path / "r"), "--arch", "cifar-local",
                 "--parallel", "columns", "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --parallel columns splits AlexNet's two columns; cifar-local "
                                               "has none")
    assert not (tmp_path / "r").exists()
