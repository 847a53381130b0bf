"""`alexcli export --format onnx`: every registered architecture and layer variant exports and
onnxruntime computes alexcli's centre-crop logits; a layer ONNX cannot express is refused by name."""

import json
import sys

import numpy as np
import pytest
import torch

from alexcli import plugins
from alexcli.convert.onnx import export_model
from alexcli.model.registry import build_model, make_arch
from conftest import TINY_TRAIN, run_here

ort = pytest.importorskip("onnxruntime")  # the dev extra installs it; a user without it gets an error line

# small sizes per architecture (the network's own default crop for a plugin's)
SMALL = {"alexnet": dict(width=0.125, crop=64, init="kaiming"), "owt": dict(width=0.125, crop=64, init="kaiming"),
         "cifar-local": dict(width=0.25)}


def reference(model, mean, crop, images):
    o = (images.shape[-1] - crop) // 2
    with torch.no_grad():
        return model(images[:, :, o:o + crop, o:o + crop] - mean[:, o:o + crop, o:o + crop]).numpy()


def exported_matches(model, crop, tmp_path, name="m"):
    size = crop + 8
    mean = torch.rand(3, size, size, generator=torch.Generator().manual_seed(3)) * 0.5
    out = tmp_path / f"{name}.onnx"
    result = export_model(model, mean, crop, size, out, {"test": "yes"})
    assert result["checked"]["max_difference"] <= 1e-4
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(7))  # a batch size not exported
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images.numpy()})[0]
    want = reference(model.eval(), mean, crop, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return out


@pytest.mark.parametrize("name", plugins.names("architecture"))
def test_every_architecture_exports(name, tmp_path):
    model, _ = build_model(make_arch(name, num_classes=5, **SMALL.get(name, {})))
    exported_matches(model, model.arch.crop, tmp_path)


@pytest.mark.parametrize("kind,variant", [(k, v) for k in ("activation", "norm", "pool") for v in plugins.names(k)])
def test_every_layer_variant_exports(kind, variant, tmp_path):
    model, _ = build_model(make_arch("alexnet", num_classes=5, **SMALL["alexnet"], **{kind: variant}))
    exported_matches(model, 64, tmp_path)


class FourierNorm(torch.nn.Module):
    """A layer ONNX has no operator for (a 2-d FFT)."""

    def __init__(self, channels):
        super().__init__()

    def forward(self, x):
        return torch.fft.fft2(x).real


def test_a_layer_onnx_cannot_express_is_refused_by_name(tmp_path):
    from alexcli.errors import UsageError

    model, _ = build_model(make_arch("alexnet", num_classes=5, **SMALL["alexnet"]), layers={"norm": FourierNorm})
    with pytest.raises(UsageError) as exc:
        export_model(model, torch.zeros(3, 72, 72), 64, 72, tmp_path / "x.onnx", {})
    assert str(exc.value).startswith("layer norm1.cols.0 (test_export.FourierNorm) cannot be exported to ONNX "
                                     "opset 17: "), str(exc.value)
    assert "fft" in str(exc.value) and not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def trained(train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    r = run_here("train", "--data", train_data, "--out", out, *TINY_TRAIN, "--epochs", "1")
    assert r.returncode == 0, r.stderr
    return out


def test_export_command_matches_eval(trained, train_data, tmp_path):
    import onnx

    from alexcli.checkpoint import load_model
    from alexcli.data import stream
    from alexcli.data.dataset import open_split
    from alexcli.evaluate import model_probs
    from alexcli.transforms import to_float

    dest = tmp_path / "run.onnx"
    r = run_here("export", trained, "--out", dest, "--json")  # a run folder: its best.safetensors
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["checkpoint"] == str(trained / "best.safetensors") and result["image_size"] == 72
    assert result["input"]["shape"] == ["batch", 3, 72, 72] and result["output"]["shape"] == ["batch", 8]
    props = {p.key: p.value for p in onnx.load(str(dest)).metadata_props}
    model, ckpt = load_model(trained / "best.safetensors")
    assert json.loads(props["alexcli.classes"]) == ckpt.meta["classes"] and props["alexcli.crop"] == "64"
    # onnxruntime on the val images gives eval's centre-crop probabilities
    split = open_split(train_data, "val")
    images, _ = next(iter(stream.batches(split, 8, train=False, workers=0)))
    x = to_float(images)
    logits = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    want = model_probs(model, x, ckpt.data["mean_image"], 64, "center").numpy()
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy(), want, atol=1e-5)
    # --out is never written over a file alexcli did not write
    r = run_here("export", trained, "--out", dest)
    assert r.returncode == 2 and r.stderr.strip().endswith(f"error: --out {dest}: exists; choose another name or add "
                                                           "--overwrite")
    mine = tmp_path / "mine.onnx"
    mine.write_text("not a model")
    r = run_here("export", trained, "--out", mine, "--overwrite")
    assert r.returncode == 2 and "exists and is not an ONNX model" in r.stderr and mine.read_text() == "not a model"
    assert run_here("export", trained, "--out", dest, "--overwrite").returncode == 0


def test_without_onnx_installed_the_error_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    from alexcli.cli import main

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code = main(["export", str(trained / "ckpt-e001.safetensors"), "--out", str(tmp_path / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: alexcli export --format onnx needs the onnx package: pip "
                                               "install 'alexcli[onnx]' (or: pip install onnx onnxruntime)")
    assert not (tmp_path / "m.onnx").exists()
