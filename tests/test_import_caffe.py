"""`alexcli.convert.caffe`: BVLC's bvlc_alexnet.caffemodel read into alexcli's network, exactly.

The caffemodels here are written by a small protobuf writer with caffe.proto's field numbers
(BVLC/caffe src/caffe/proto/caffe.proto), full size (fc8 with 10 outputs, a fine-tuned model's),
in both of Caffe's formats: `layer` (LayerParameter) with BlobShape, and the deprecated `layers`
(V1LayerParameter) with num/channels/height/width as the 2014 zoo files have them. The imported
checkpoint's logits are compared with a forward pass written here from Caffe's layer definitions.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexcli.errors import DataError, UsageError

NUM_CLASSES = 10
CROP, SIZE = 227, 256
# bvlc_alexnet's parameter layers: (weight shape, fan-in); fc8 cut to NUM_CLASSES outputs
SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
          "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216), "fc7": (4096, 4096),
          "fc8": (NUM_CLASSES, 4096)}


# --- a protobuf writer (wire format) with caffe.proto's field numbers -----------------------------

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# A message is built as a list of byte chunks (numpy arrays' buffers among them, not copied) and
# joined once: the full-size file is 220 MB, and concatenating it layer by layer cost seconds.

def size(chunks) -> int:
    return sum(memoryview(c).nbytes for c in chunks)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def vfield(field: int, n: int) -> list:
    return [key(field, 0), varint(n)]


def lfield(field: int, payload) -> list:
    payload = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    return [key(field, 2), varint(size(payload)), *payload]


def sfield(field: int, text: str) -> list:
    return lfield(field, text.encode())


def ffield(field: int, x: float) -> list:
    return [key(field, 5), struct.pack("<f", x)]


def join(chunks) -> bytes:
    return b"".join(chunks)


def blob(array, legacy: bool, unpacked: bool = False) -> list:
    """A BlobProto: data = 5 (packed, or one fixed32 field per value), then shape = 7 (BlobShape,
    dim = 1 packed), or the legacy num/channels/height/width = 1..4 with leading 1s (V1's fc weights
    are 1x1xMxN, its biases 1x1x1xN)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    out = []
    if legacy:
        dims = (1,) * (4 - array.ndim) + array.shape
        for i, d in enumerate(dims):
            out += vfield(i + 1, d)
    if unpacked:
        out += [key(5, 5) + struct.pack("<f", v) for v in array.ravel().tolist()]
    else:
        out += lfield(5, memoryview(array).cast("B"))
    if not legacy:
        out += lfield(7, lfield(1, b"".join(varint(d) for d in array.shape)))
    return out


# bvlc_alexnet's train_val layers: (name, type, bottoms, tops); V1 type enum numbers from caffe.proto
V1_TYPES = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14,
            "Dropout": 6, "Accuracy": 1, "SoftmaxWithLoss": 21}


def alexnet_layers(caffenet: bool = False) -> list[tuple[str, str, list[str], list[str]]]:
    """bvlc_alexnet's train_val layers (two data layers, TRAIN and TEST; accuracy and loss), or with
    CAFFENET bvlc_reference_caffenet's, which pools before it normalises."""
    layers = [("data", "Data", [], ["data", "label"]), ("data", "Data", [], ["data", "label"])]
    prev = "data"
    for i in (1, 2):
        layers += [(f"conv{i}", "Convolution", [prev], [f"conv{i}"]), (f"relu{i}", "ReLU", [f"conv{i}"], [f"conv{i}"])]
        first, second = (("pool", "Pooling"), ("norm", "LRN")) if caffenet else (("norm", "LRN"), ("pool", "Pooling"))
        layers += [(f"{first[0]}{i}", first[1], [f"conv{i}"], [f"{first[0]}{i}"]),
                   (f"{second[0]}{i}", second[1], [f"{first[0]}{i}"], [f"{second[0]}{i}"])]
        prev = f"{second[0]}{i}"
    for name, bottom in (("conv3", prev), ("conv4", "conv3"), ("conv5", "conv4")):
        layers += [(name, "Convolution", [bottom], [name]), (f"relu{name[-1]}", "ReLU", [name], [name])]
    layers += [("pool5", "Pooling", ["conv5"], ["pool5"])]
    for name, bottom in (("fc6", "pool5"), ("fc7", "fc6")):
        layers += [(name, "InnerProduct", [bottom], [name]), (f"relu{name[-1]}", "ReLU", [name], [name]),
                   (f"drop{name[-1]}", "Dropout", [name], [name])]
    layers += [("fc8", "InnerProduct", ["fc7"], ["fc8"]), ("accuracy", "Accuracy", ["fc8", "label"], ["accuracy"]),
               ("loss", "SoftmaxWithLoss", ["fc8", "label"], ["loss"])]
    return layers


def caffemodel(weights: dict, v1: bool, layers=None, unpacked=()) -> bytes:
    """A NetParameter: name = 1 and layer = 100 (LayerParameter: name 1, type 2, bottom 3, top 4,
    param 6, blobs 7, convolution_param 106 / inner_product_param 117 / lrn_param 118), or V1's
    layers = 2 (V1LayerParameter: bottom 2, top 3, name 4, type 5, blobs 6, blobs_lr 7,
    convolution_param 10, inner_product_param 17, lrn_param 18). WEIGHTS: name -> [blobs]."""
    out = sfield(1, "AlexNet")
    for name, kind, bottoms, tops in layers if layers is not None else alexnet_layers():
        blobs = [blob(b, legacy=v1, unpacked=(name, i) in unpacked) for i, b in enumerate(weights.get(name, []))]
        outputs = len(weights[name][0]) if name in weights else 0
        if kind == "Convolution":
            extra = lfield(106 if not v1 else 10, vfield(1, outputs) + vfield(4, 3) + vfield(5, 2))
        elif kind == "InnerProduct":
            extra = lfield(117 if not v1 else 17, vfield(1, outputs))
        elif kind == "LRN":
            extra = lfield(118 if not v1 else 18, vfield(1, 5) + ffield(2, 1e-4) + ffield(3, 0.75))
        else:
            extra = []
        msg = []
        if v1:
            for b in bottoms:
                msg += sfield(2, b)
            for t in tops:
                msg += sfield(3, t)
            msg += sfield(4, name) + vfield(5, V1_TYPES[kind])
            for b in blobs:
                msg += lfield(6, b)
            for lr in (1.0, 2.0)[:len(blobs)]:
                msg += ffield(7, lr)
            out += lfield(2, msg + extra)
        else:
            msg += sfield(1, name) + sfield(2, kind)
            for b in bottoms:
                msg += sfield(3, b)
            for t in tops:
                msg += sfield(4, t)
            for lr in (1.0, 2.0)[:len(blobs)]:
                msg += lfield(6, ffield(3, lr) + ffield(4, 1.0))
            for b in blobs:
                msg += lfield(7, b)
            out += lfield(100, msg + extra)
    return join(out)


def caffe_weights(seed: int = 0) -> dict:
    """Seeded weights for every layer, as Caffe stores them (conv1 reads BGR): He-scaled for each
    layer's fan-in, so activations keep their size through the net; biases nonzero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        fan_in = int(np.prod(shape[1:]))
        w = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        b = torch.randn(shape[0], generator=g) * 0.5
        out[name] = [w.numpy(), b.numpy()]
    return out


def mean_bgr(seed: int = 1) -> np.ndarray:
    """A mean image like BVLC's (3x256x256, BGR, 0..255, about 104/117/123 per channel), varying
    over the image so a wrong crop position or channel order shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.array([104.0, 117.0, 123.0])[:, None, None]
    return np.clip(base + 20 * np.sin(3 * yy + np.arange(3)[:, None, None]) * xx + rng.normal(0, 2, (3, SIZE, SIZE)),
                   0, 255)


def binaryproto(mean: np.ndarray) -> bytes:
    """compute_image_mean's output: a BlobProto with num 1, channels 3, height, width."""
    return join(blob(mean[None], legacy=True))


# --- Caffe's forward pass, from its layer definitions ----------------------------------------------

def caffe_lrn(a: torch.Tensor, n: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> torch.Tensor:
    """Caffe's LRN (ACROSS_CHANNELS, lrn_layer.cpp): b_i = a_i / (k + alpha/n * sum_{|j-i| <= n/2} a_j^2)^beta,
    the window running over all of the layer's channels, zero-padded at the first and last."""
    sq = F.pad(a * a, (0, 0, 0, 0, n // 2, n // 2))
    window = sum(sq[:, j:j + a.shape[1]] for j in range(n))
    return a / (k + alpha / n * window) ** beta


def caffe_pool(x: torch.Tensor) -> torch.Tensor:
    """Caffe's max pooling rounds the output size up; at AlexNet's sizes torch's floor agrees."""
    y = F.max_pool2d(x, 3, 2, ceil_mode=True)
    assert y.shape == F.max_pool2d(x, 3, 2).shape
    return y


def caffe_forward(w: dict, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """bvlc_alexnet's deploy net at test time (dropout off) on X: BGR, 0..255 minus the mean, 227x227.
    Also returns the pooled sides."""
    t = {k: [torch.from_numpy(np.array(b)) for b in v] for k, v in w.items()}
    sides = []
    x = caffe_pool(caffe_lrn(F.relu(F.conv2d(x, *t["conv1"], stride=4))))
    sides.append(x.shape[-1])
    x = caffe_pool(caffe_lrn(F.relu(F.conv2d(x, *t["conv2"], padding=2, groups=2))))
    sides.append(x.shape[-1])
    x = F.relu(F.conv2d(x, *t["conv3"], padding=1))
    x = F.relu(F.conv2d(x, *t["conv4"], padding=1, groups=2))
    x = caffe_pool(F.relu(F.conv2d(x, *t["conv5"], padding=1, groups=2)))
    sides.append(x.shape[-1])
    x = x.reshape(x.shape[0], -1)  # InnerProduct flattens N x C x H x W row-major
    x = F.relu(F.linear(x, *t["fc6"]))
    x = F.relu(F.linear(x, *t["fc7"]))
    return F.linear(x, *t["fc8"]), sides


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("caffe")
    weights = caffe_weights()
    mean = mean_bgr()
    paths = {"new": d / "bvlc_alexnet.caffemodel", "v1": d / "bvlc_alexnet_v1.caffemodel",
             "binaryproto": d / "imagenet_mean.binaryproto", "npy": d / "ilsvrc_2012_mean.npy",
             "hwc": d / "mean_hwc.npy"}
    paths["new"].write_bytes(caffemodel(weights, v1=False))
    # V1 with conv1's bias as unpacked floats (one fixed32 field per value), as some writers emit
    paths["v1"].write_bytes(caffemodel(weights, v1=True, unpacked={("conv1", 1)}))
    paths["binaryproto"].write_bytes(binaryproto(mean))
    np.save(paths["npy"], mean)
    np.save(paths["hwc"], mean.transpose(1, 2, 0).astype(np.float32))
    return {"dir": d, "weights": weights, "mean": mean, **paths}


@pytest.fixture(scope="module")
def imported(files):
    from alexcli.convert.caffe import read_caffe

    return read_caffe(files["new"], files["npy"])


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# --- the import computes Caffe's function -----------------------------------------------------------

def test_logits_match_caffe(files, tmp_path):
    from alexcli.checkpoint import load_model
    from alexcli.convert.caffe import read_caffe
    from alexcli.convert.common import save_imported
    from alexcli.model.registry import shapes
    from alexcli.transforms import model_input

    # the new format and the binaryproto here; the V1 file and the .npy import to the same tensors
    # (test_both_formats_and_mean_files_read_the_same)
    imp = read_caffe(files["new"], files["binaryproto"])
    classes = [f"c{i}" for i in range(NUM_CLASSES)]
    out = tmp_path / "caffe.safetensors"
    save_imported(imp, out, classes, classes)
    model, ckpt = load_model(out)
    assert ckpt.meta["imported"]["kind"] == "caffe"

    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, SIZE, SIZE, generator=g)  # RGB, 0..1, the loader's full 256x256 images
    with torch.no_grad():
        ours = model(model_input(images, ckpt.data["mean_image"], CROP))
        # Caffe's data layer at test time: the centre 227 crop (offset (256-227)//2) of the BGR
        # 0..255 image, minus the same crop of the mean
        o = (SIZE - CROP) // 2
        bgr = images.flip(1)[:, :, o:o + CROP, o:o + CROP] * 255
        mean = torch.from_numpy(files["mean"][:, o:o + CROP, o:o + CROP]).float()
        ref, sides = caffe_forward(files["weights"], (bgr - mean).float())
    assert sides == [27, 13, 6]
    side = shapes(model)
    assert (side["pool1"][-1], side["pool2"][-1], side["pool5"][-1]) == (27, 13, 6)
    scale = ref.abs().max().item()
    assert 1.0 < scale < 1e5 and torch.isfinite(ref).all()
    assert ref.std(dim=1).min() > 1e-3 * scale  # the logits differ between classes: a real test
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale), (ours - ref).abs().max().item()


def test_lrn_is_caffes_across_all_channels(imported):
    """Caffe's LRN layer has no groups: bvlc_alexnet's norm1 and norm2 normalise over all 96 / 256
    maps, the window crossing from one column's maps into the other's (channels 47|48, 127|128)."""
    from alexcli.model.registry import build_model

    model, _ = build_model(imported.arch)
    g = torch.Generator().manual_seed(4)
    for norm, channels in ((model.norm1, 96), (model.norm2, 256)):
        a = torch.relu(torch.randn(2, channels, 3, 3, generator=g) * 150)
        with torch.no_grad():
            ours = norm(a)
        assert torch.allclose(ours, caffe_lrn(a), rtol=1e-5, atol=1e-5), \
            f"channels differing: {sorted(set(torch.nonzero(~torch.isclose(ours, caffe_lrn(a)))[:, 1].tolist()))}"


def test_both_formats_and_mean_files_read_the_same(files, imported):
    from alexcli.convert.caffe import read_caffe, read_mean

    a = imported  # the new format, the .npy mean
    b = read_caffe(files["v1"], files["binaryproto"])
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert torch.allclose(a.mean_image, b.mean_image, atol=1e-6)  # binaryproto is float32, the npy float64
    assert np.allclose(read_mean(files["hwc"]), read_mean(files["npy"]), atol=1e-4)


def test_what_the_import_says(files, imported):
    imp = imported
    arch = imp.arch
    assert (arch.name, arch.num_classes, arch.crop, arch.groups, arch.norm, arch.pool, arch.init) == \
        ("alexnet", NUM_CLASSES, 227, 2, "lrn-caffe", "overlap", "caffe")
    assert arch.input_scale == 255.0 and arch.dropout == 0.5
    assert imp.kind == "caffe" and imp.size == SIZE and tuple(imp.mean_image.shape) == (3, SIZE, SIZE)
    assert imp.mean_image.dtype == torch.float32
    assert torch.allclose(imp.mean_image, torch.from_numpy(files["mean"][::-1] / 255).float())
    w = files["weights"]
    assert torch.equal(imp.state_dict["conv1.weight"], torch.from_numpy(w["conv1"][0][:, ::-1].copy()))
    assert torch.equal(imp.state_dict["conv2.weight"], torch.from_numpy(w["conv2"][0]))
    assert [m["from"] for m in imp.mapping][:2] == ["conv1 blob 0", "conv1 blob 1"]
    assert [m["to"] for m in imp.mapping][-2:] == ["fc8.weight", "fc8.bias"]
    assert imp.mapping[0]["shape"] == [96, 3, 11, 11] and len(imp.mapping) == 16
    assert any("BGR" in n for n in imp.notes)
    assert imp.reported == {}  # 10 outputs: a fine-tuned model, not BVLC's own
    assert any("fine-tuned" in n for n in imp.notes)


# --- refusals, each one line naming the file --------------------------------------------------------

def small_net(path, layers=None, weights=None, v1=False) -> bytes:
    weights = weights if weights is not None else {"conv1": [np.ones((96, 3, 11, 11)), np.zeros(96)],
                                                   "ip1": [np.ones((10, 4)), np.zeros(10)]}
    layers = layers if layers is not None else [("data", "Data", [], ["data"]),
                                                ("conv1", "Convolution", ["data"], ["conv1"]),
                                                ("ip1", "InnerProduct", ["conv1"], ["ip1"])]
    data = caffemodel(weights, v1=v1, layers=layers)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("v1", [False, True])
def test_refuses_another_network(files, tmp_path, v1):
    from alexcli.convert.caffe import read_caffe

    path = tmp_path / "lenet.caffemodel"
    small_net(path, v1=v1)
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    msg = one_line(exc)
    assert str(path) in msg and "not a caffemodel of bvlc_alexnet" in msg
    assert "missing conv2, conv3, conv4 and 4 more" in msg and "has ip1" in msg


def tiny_weights() -> dict:
    return {name: [np.ones(2), np.ones(2)] for name in SHAPES}


def test_refuses_wrong_shapes_and_caffenet(files, tmp_path):
    from alexcli.convert.caffe import read_caffe

    path = tmp_path / "odd.caffemodel"
    path.write_bytes(caffemodel(tiny_weights(), v1=False))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert one_line(exc) == f"{path}: conv1 blob 0 has shape 2, bvlc_alexnet has 96x3x11x11"

    # V1's legacy 4-d shapes: conv1 fits, conv2's 2 numbers are 1x1x1x2 as stored
    path.write_bytes(caffemodel(tiny_weights() | {"conv1": files["weights"]["conv1"]}, v1=True))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert one_line(exc) == f"{path}: conv2 blob 0 has shape 1x1x1x2, bvlc_alexnet has 256x48x5x5"

    # fc8 without its bias blob (bias_term: false)
    path.write_bytes(caffemodel({**files["weights"], "fc8": files["weights"]["fc8"][:1]}, v1=False))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert one_line(exc) == f"{path}: not bvlc_alexnet (missing fc8 blob 1)"

    path.write_bytes(caffemodel(tiny_weights(), v1=False, layers=alexnet_layers(caffenet=True)))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert "CaffeNet" in one_line(exc) and str(path) in str(exc.value)


def test_refuses_cut_and_damaged_files(files, tmp_path):
    from alexcli.convert.caffe import read_caffe, read_net

    good = tmp_path / "good.caffemodel"
    data = small_net(good)
    read_net(good)  # the uncut file reads
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    msg = one_line(exc)
    assert str(path) in msg and "cut short" in msg

    # every cut and many damaged bytes: a DataError or a file that still parses, never a traceback
    rng = np.random.default_rng(3)
    cuts = sorted(set(range(0, 120, 2)) | set(rng.integers(0, len(data), 60).tolist()))
    for n in cuts:
        path.write_bytes(data[:n])
        try:
            read_net(path)
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)
    for _ in range(100):
        damaged = bytearray(data)
        for i in rng.integers(0, min(len(data), 400), 3):  # the structure sits before conv1's data
            damaged[i] = rng.integers(0, 256)
        path.write_bytes(bytes(damaged))
        try:
            read_net(path)
        except DataError as e:
            assert "\n" not in str(e) and str(path) in str(e)


def test_refuses_a_blob_of_the_wrong_count_and_wire_type(files, tmp_path):
    from alexcli.convert.caffe import read_caffe

    path = tmp_path / "bad.caffemodel"
    shape = lfield(7, lfield(1, b"".join(varint(d) for d in (96, 3, 11, 11))))
    bad_blob = lfield(5, np.ones(100, "<f4").tobytes()) + shape
    path.write_bytes(join(lfield(100, sfield(1, "conv1") + lfield(7, bad_blob))))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert one_line(exc) == f"{path}: conv1 blob 0 holds 100 numbers, but its shape 96x3x11x11 needs 34848 (damaged)"

    path.write_bytes(join(lfield(100, vfield(1, 7))))  # a layer name as a number
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert "wire type 0" in one_line(exc) and str(path) in str(exc.value)

    path.write_bytes(join(lfield(100, sfield(1, "conv1") + lfield(7, lfield(5, b"\0" * 7)))))
    with pytest.raises(DataError) as exc:
        read_caffe(path, files["npy"])
    assert "not a whole number" in one_line(exc)

    for text in (b"name: \"AlexNet\"\nlayer {\n  name: \"data\"\n}\n", b""):  # a prototxt; an empty file
        path.write_bytes(text)
        with pytest.raises(DataError) as exc:
            read_caffe(path, files["npy"])
        assert str(path) in one_line(exc)
    with pytest.raises(DataError) as exc:
        read_caffe(tmp_path / "absent.caffemodel", files["npy"])
    assert "no such file" in one_line(exc)


def test_refuses_missing_or_unusable_mean(files, tmp_path):
    from alexcli.convert.caffe import read_caffe, read_mean

    with pytest.raises(UsageError) as exc:
        read_caffe(files["new"], None)
    msg = one_line(exc)
    assert "--mean FILE" in msg and "ilsvrc_2012_mean.npy" in msg and "get_ilsvrc_aux.sh" in msg

    bad = tmp_path / "bad_mean.npy"
    for array, words in ((np.full((3, 10, 10), 100.0), "smaller than"), (np.full((3, 256, 200), 100.0), "square"),
                         (np.full((3, 256, 256), 0.5), "0..255"), (np.full((4, 256, 256), 9.0), "shape")):
        np.save(bad, array)
        with pytest.raises(DataError) as exc:
            read_mean(bad)
        assert words in one_line(exc) and str(bad) in str(exc.value)
    bad = tmp_path / "bad.binaryproto"
    bad.write_bytes(files["binaryproto"].read_bytes()[:5000])
    with pytest.raises(DataError) as exc:
        read_mean(bad)
    assert "cut short" in one_line(exc)
    bad.write_bytes(b"not a mean at all\n")
    with pytest.raises(DataError) as exc:
        read_mean(bad)
    assert str(bad) in one_line(exc)


def test_the_import_command(files, tmp_path):
    """`alexcli import caffe` as a user runs it: the mapping printed, the checkpoint read back by
    verify; without --mean, or with --mean for torchvision, one line."""
    from conftest import run_here

    out = tmp_path / "caffe.safetensors"
    r = run_here("import", "caffe", files["new"], "--mean", files["binaryproto"], "--out", out)
    assert r.returncode == 0, r.stderr
    assert "conv1 blob 0" in r.stdout and "conv1.weight" in r.stdout and f"wrote {out}: AlexNet" in r.stdout
    assert "lrn-caffe" in r.stdout and "classes from output indices" in r.stdout
    v = run_here("verify", out, "--json")
    assert v.returncode == 0, v.stderr
    r = run_here("import", "caffe", files["new"], "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "--mean" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()
    r = run_here("import", "torchvision", files["new"], "--mean", files["npy"], "--out", tmp_path / "y.safetensors")
    assert r.returncode == 2 and r.stderr.strip() == ("error: --mean is for caffe: torchvision's normalisation is "
                                                      "fixed (docs/weights.md)")
