"""`alexcli import torchvision`: torchvision's alexnet as an `owt` checkpoint computing exactly what
torchvision's model computes; files that are not that network are refused in one line."""

import io
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import run_here

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    model = torchvision.models.alexnet()  # torchvision's own layers and initialisation, seeded
    return model.eval()


@pytest.fixture(scope="module")
def imported(tv_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("import")
    pth = root / "alexnet-owt.pth"
    torch.save(tv_model.state_dict(), pth)  # as torchvision's published weights are saved
    out = root / "tv.safetensors"
    r = run_here("import", "torchvision", pth, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    return pth, out, json.loads(r.stdout)


def test_imported_network_computes_torchvisions_logits(tv_model, imported):
    from alexcli.checkpoint import load_model
    from alexcli.evaluate import model_probs

    pth, out, summary = imported
    assert summary["parameters"] == 61_100_840 == sum(p.numel() for p in tv_model.parameters())
    assert summary["arch"]["name"] == "owt" and summary["classes"] == 1000 and summary["crop"] == 224
    assert [m["from"] for m in summary["mapping"]][:2] == ["features.0.weight", "features.0.bias"]
    assert len(summary["mapping"]) == 16 and summary["reported"]["top1"] == 56.522
    model, ckpt = load_model(out)
    assert ckpt.meta["imported"]["kind"] == "torchvision" and ckpt.meta["class_names"][0] == "tench"
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tv_model((x - MEAN) / STD)
        ours = model(x - ckpt.data["mean_image"][:, :224, :224])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # through eval's own input path: 256x256 images, the mean image subtracted, the central 224
    big = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        probs = model_probs(model, big, ckpt.data["mean_image"], 224, "center")
        want = torch.softmax(tv_model((big[..., 16:240, 16:240] - MEAN) / STD), 1)
    torch.testing.assert_close(probs, want, rtol=1e-4, atol=1e-6)


def test_predict_names_torchvisions_classes(tv_model, imported, tmp_path):
    from alexcli.data.image import ImageParams, convert_pixels

    _, out, _ = imported
    photo = tmp_path / "photo.png"
    Image.effect_mandelbrot((300, 260), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(photo)
    r = run_here("predict", out, photo, "--json")
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)["images"][0]["top"][0]
    # the reference: the same pixels prepare makes (shorter side 256, centre square), centre 224
    done = convert_pixels(photo.read_bytes(), ImageParams(size=256))
    x = torch.from_numpy(np.array(Image.open(io.BytesIO(done.jpg)).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        best = int(tv_model((x[..., 16:240, 16:240] - MEAN) / STD).argmax())
    assert top["name"] == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.meta["categories"][best]


def test_safetensors_wrapped_and_dataparallel_files_import_alike(tv_model, imported, tmp_path):
    from safetensors.torch import save_file

    from alexcli.checkpoint import load_checkpoint

    _, out, _ = imported
    st = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in tv_model.state_dict().items()}, str(st))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv_model.state_dict().items()}, "epoch": 90}, wrapped)
    ref = load_checkpoint(out).model_state
    for i, src in enumerate((st, wrapped)):
        dest = tmp_path / f"o{i}.safetensors"
        r = run_here("import", "torchvision", src, "--out", dest)
        assert r.returncode == 0, r.stderr
        assert "features.0.weight" in r.stdout and f"wrote {dest}: OWT" in r.stdout
        got = load_checkpoint(dest).model_state
        assert all(torch.equal(got[k], ref[k]) for k in ref)


class NotATensor:
    pass


def test_files_that_are_not_torchvisions_alexnet_are_refused_in_one_line(imported, tmp_path):
    pth, out, _ = imported
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    dest = tmp_path / "x.safetensors"
    r = run_here("import", "torchvision", resnet, "--out", dest)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {resnet}: not torchvision's alexnet state dict (missing features.0.weight, "
                                "features.0.bias, features.3.weight and 13 more; has conv1.weight, bn1.weight, "
                                "bn1.bias and 119 more)")
    sd = torchvision.models.alexnet().state_dict()
    sd["features.3.weight"] = sd["features.3.weight"][:, :32]
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    r = run_here("import", "torchvision", wrong, "--out", dest)
    assert r.stderr.strip() == (f"error: {wrong}: features.3.weight has shape 192x32x5x5, torchvision's alexnet state "
                                "dict has 192x64x5x5")
    pickled = tmp_path / "pickle.pth"
    torch.save({"features.0.weight": NotATensor()}, pickled)  # needs arbitrary unpickling: refused
    r = run_here("import", "torchvision", pickled, "--out", dest)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {pickled}: not a torch state dict that loads without "
                                                     "arbitrary pickle (")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(pth.read_bytes()[:100_000])
    r = run_here("import", "torchvision", cut, "--out", dest)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and str(cut) in r.stderr
    assert not dest.exists()
    # --out: never over a file alexcli did not write; its own only with --overwrite
    r = run_here("import", "torchvision", pth, "--out", out)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --out {out}: exists; choose another name or add --overwrite"
    foreign = tmp_path / "mine.safetensors"
    foreign.write_text("my notes")
    r = run_here("import", "torchvision", pth, "--out", foreign, "--overwrite")
    assert r.returncode == 2 and "is not an alexcli checkpoint" in r.stderr and foreign.read_text() == "my notes"


def test_class_list_from_a_file_or_a_data_set(imported, tmp_path, train_data):
    pth, _, _ = imported
    listing = tmp_path / "LOC_synset_mapping.txt"
    listing.write_text("".join(f"n{i:08d} class {i}, other name\n" for i in range(1000)))
    dest = tmp_path / "c.safetensors"
    r = run_here("import", "torchvision", pth, "--out", dest, "--classes", listing, "--json")
    assert r.returncode == 0, r.stderr
    from alexcli.checkpoint import read_meta

    meta = read_meta(dest)
    assert meta["classes"][:2] == ["n00000000", "n00000001"] and meta["class_names"][1] == "class 1"
    short = tmp_path / "short.txt"
    short.write_text("n1 a\nn2 b\n")
    r = run_here("import", "torchvision", pth, "--out", tmp_path / "d.safetensors", "--classes", short)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --classes {short}: lists 2 classes, but the network "
                                                      "has 1000 outputs")
    r = run_here("import", "torchvision", pth, "--out", tmp_path / "d.safetensors", "--data", train_data)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --data {train_data}: has 8 classes, but the network "
                                                      "has 1000 outputs")
    assert not (tmp_path / "d.safetensors").exists()


def test_eval_of_an_imported_checkpoint_asks_for_data(imported):
    _, out, _ = imported
    r = run_here("eval", out)
    assert r.returncode == 2 and r.stderr.strip() == (f"error: --data is needed: {out} was imported from torchvision "
                                                      "weights and has no data set of its own (e.g. --data "
                                                      "shards/imagenet)")
