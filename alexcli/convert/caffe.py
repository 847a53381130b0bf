"""`alexcli import caffe FILE --mean MEAN`: BVLC's `bvlc_alexnet.caffemodel` as an alexnet checkpoint.

A caffemodel is a protobuf `NetParameter` (BVLC/caffe src/caffe/proto/caffe.proto). It is read
here by a small wire-format reader of only the fields the weights need, not by the `protobuf`
package: protobuf is not a dependency of alexcli (it is only present as tensorboard's), building
the message types in code goes through descriptor APIs that changed between its 3.x, 4.x and 5.x
releases, and a caffemodel needs a handful of fields. The reader also hands the packed float
arrays (nearly all of the file's 233 MB) to numpy without a copy, and names the byte where a cut
or damaged file goes wrong in its one-line error.

The fields read (numbers from caffe.proto; everything else is skipped as protobuf allows):

    NetParameter       layer = 100 (LayerParameter), layers = 2 (V1LayerParameter, deprecated)
    LayerParameter     name = 1, bottom = 3, blobs = 7
    V1LayerParameter   name = 4, bottom = 2, blobs = 6,
                       layer = 1 (V0LayerParameter: name = 1, blobs = 50), the oldest files
    BlobProto          shape = 7 (BlobShape: repeated int64 dim = 1), data = 5 (float),
                       double_data = 8, and the deprecated num/channels/height/width = 1..4

Repeated numbers are accepted packed or unpacked. As in Caffe's Blob::FromProto, a blob with any
of num/channels/height/width has the 4-d legacy shape (V1 files store fc weights as 1x1xMxN and
biases as 1x1x1xN: the leading 1s are dropped, as Blob::ShapeEquals does), else its `shape`; and
double_data wins over data when it is there.

What changes on the way:
  * conv1 reads BGR in Caffe, RGB in alexcli: conv1's input channels are reversed.
  * The mean (BGR, 0..255) is reversed to RGB and divided by 255. alexcli feeds
    (0..1 pixels - mean image) * input_scale with input_scale 255, the numbers Caffe feeds
    (0..255 pixels minus the 0..255 mean); its eval subtracts the mean at the crop's position,
    as Caffe's data layer does (mean_file: the mean is cropped with the image).
  * Nothing else: conv2, conv4 and conv5 are group 2 in Caffe, stored exactly as alexcli's
    groups=2 convolutions store them (each output's kernel sees its own column's maps); fc6
    flattens pool5's 256x6x6 maps channel, row, column in both; Caffe's LRN (k 1, alpha/n) is
    norm `lrn-caffe`, applied before pooling as in bvlc_alexnet (CaffeNet, which pools first, is
    refused); conv1 has no padding at crop 227.
  * Pooling: Caffe rounds a pooled size up, torch down. For AlexNet at 227 (conv1 55, then 3x3
    stride 2: 55 -> 27 -> 13 -> 6) every (side - 3) is even, so both give the same sizes and the
    same windows.

Mean files accepted: a `.binaryproto` BlobProto (data/ilsvrc12/get_ilsvrc_aux.sh's
imagenet_mean.binaryproto: 1x3x256x256), or a `.npy` array of shape 3xSxS or 1x3xSxS (caffe's
python/caffe/imagenet/ilsvrc_2012_mean.npy: 3x256x256 float64) or SxSx3 (OpenCV's layout); in
every layout the channels are BGR and the values 0..255. A .npy is recognised by its magic bytes,
anything else is read as a BlobProto.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from alexcli.convert.common import Imported, checked_names, checked_tensors
from alexcli.errors import DataError, UsageError

# bvlc_alexnet's parameter layers, in the file's order, with (weight, bias) shapes; None: the class
# count (fine-tuned models have other fc8 sizes).
LAYERS = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
          "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216), "fc7": (4096, 4096),
          "fc8": (None, 4096)}
WHAT = "bvlc_alexnet"
CROP = 227
# models/bvlc_alexnet/readme.md: "top-1 accuracy 57.1% and a top-5 accuracy 80.2% on the
# validation set, using just the center crop"; its sha1 is the published file's.
REPORTED = {"top1": 57.1, "top5": 80.2, "source": "BVLC model zoo, bvlc_alexnet, centre crop"}
BVLC_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"
MEAN_HELP = ("BVLC publishes it as ilsvrc_2012_mean.npy (caffe's python/caffe/imagenet/) and as "
             "imagenet_mean.binaryproto (caffe's data/ilsvrc12/get_ilsvrc_aux.sh)")
MAX_BYTES = 2**31  # protobuf's limit on a message (bvlc_alexnet is 233 MB): a larger file is not one


# NetParameter's field numbers (name, layers, input, input_dim, force_backward, state, debug_info,
# input_shape, layer): a file whose first field is none of them is not a caffemodel
NET_FIELDS = (1, 2, 3, 4, 5, 6, 7, 8, 100)


class _Bad(Exception):
    """The bytes are not the protobuf message expected; str() says what, where."""


# --- protobuf wire format (https://protobuf.dev/programming-guides/encoding/) ---------------------

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    start = pos
    while True:
        if pos >= end:
            raise _Bad(_past_end(buf, start, end, "a number"))
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Bad(f"a number longer than 10 bytes at byte {start}")


def _past_end(buf: bytes, start: int, end: int, what: str) -> str:
    if end == len(buf):
        return f"the file ends inside {what} at byte {start} (cut short: an incomplete download?)"
    return f"{what} at byte {start} runs past the end of its message (damaged)"


def _next(buf: bytes, pos: int, end: int) -> tuple[int, int, object, int]:
    """The field at POS of the message ending at END: (field number, wire type, value, where the
    next one starts); the value is an int for a varint, else the (start, stop) span of its bytes."""
    start = pos
    key, pos = _varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise _Bad(f"field number 0 at byte {start} (not a protobuf message, or damaged)")
    if wire == VARINT:
        value, pos = _varint(buf, pos, end)
        return field, wire, value, pos
    if wire in (I64, I32, LEN):
        if wire == LEN:
            n, pos = _varint(buf, pos, end)
        else:
            n = 8 if wire == I64 else 4
        if pos + n > end:
            raise _Bad(_past_end(buf, start, end, f"field {field}"))
        return field, wire, (pos, pos + n), pos + n
    # 3/4: groups, which caffe.proto has none of; 6/7 do not exist
    raise _Bad(f"wire type {wire} (field {field}) at byte {start} (not a caffe message, or damaged)")


def _fields(buf: bytes, pos: int, end: int):
    """(field number, wire type, value, start) for each field of the message in buf[pos:end]."""
    while pos < end:
        start = pos
        field, wire, value, pos = _next(buf, pos, end)
        yield field, wire, value, start


def _want(wire: int, wanted: int, field: int, what: str, start: int) -> None:
    if wire != wanted:
        raise _Bad(f"{what} (field {field}) at byte {start} has wire type {wire}, caffe.proto's is {wanted} "
                   f"(not a caffe message, or damaged)")


def _text(buf: bytes, span: tuple[int, int], what: str) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} at byte {span[0]} is not UTF-8 text (damaged)") from None


def _run(buf: bytes, start: int, end: int, key: int, size: int, dtype: str):
    """The unpacked repeated fixed-size field starting at START (key byte KEY, SIZE bytes each):
    the values of the run of consecutive such fields, and where the run ends."""
    import numpy as np

    step = 1 + size
    count = (end - start) // step
    keys = np.frombuffer(buf, np.uint8, count=count * step, offset=start)[::step]
    other = np.flatnonzero(keys != key)
    n = int(other[0]) if other.size else count
    if n == 0:  # the field is there but its value is cut
        raise _Bad(_past_end(buf, start, end, f"field {key >> 3}"))
    rec = np.dtype([("key", "u1"), ("value", dtype)])
    return np.frombuffer(buf, rec, count=n, offset=start)["value"], start + n * step


def _blob(buf: bytes, pos: int, end: int, what: str) -> dict:
    """A BlobProto: {"shape": tuple or None, "legacy": 4-tuple or None, "data": float array}."""
    import numpy as np

    legacy = {}
    dims: list[int] = []
    has_shape = False
    floats, doubles = [], []
    while pos < end:
        start = pos
        field, wire, value, pos = _next(buf, pos, end)
        if field in (1, 2, 3, 4):  # num, channels, height, width
            _want(wire, VARINT, field, f"{what}'s {('num', 'channels', 'height', 'width')[field - 1]}", start)
            legacy[field] = value - (1 << 64) if value >= 1 << 63 else value
        elif field == 7:  # shape: BlobShape
            _want(wire, LEN, field, f"{what}'s shape", start)
            has_shape = True
            for f2, w2, v2, s2 in _fields(buf, *value):
                if f2 != 1:
                    continue
                if w2 == VARINT:
                    dims.append(v2)
                elif w2 == LEN:
                    p, e = v2
                    while p < e:
                        d, p = _varint(buf, p, e)
                        dims.append(d)
                else:
                    _want(w2, LEN, f2, f"{what}'s shape dim", s2)
        elif field in (5, 8):  # data (float), double_data
            size, dtype, unpacked = (4, "<f4", I32) if field == 5 else (8, "<f8", I64)
            chunks = floats if field == 5 else doubles
            if wire == LEN:
                a, b = value
                if (b - a) % size:
                    raise _Bad(f"{what}'s data at byte {start} is {b - a} bytes, not a whole number of "
                               f"{size}-byte values (damaged)")
                chunks.append(np.frombuffer(buf, dtype, count=(b - a) // size, offset=a))
            elif wire == unpacked:
                # one value per field: take the whole run of them at once, not one at a time
                values, pos = _run(buf, start, end, (field << 3) | unpacked, size, dtype)
                chunks.append(values)
            else:
                _want(wire, LEN, field, f"{what}'s data", start)
    if any(d >= 1 << 63 for d in dims) or any(v < 0 for v in legacy.values()):
        raise _Bad(f"{what} has a negative dimension (damaged)")
    data = doubles if doubles else floats
    data = data[0] if len(data) == 1 else (np.concatenate(data) if data else np.zeros(0, np.float32))
    shape = tuple(dims) if has_shape else None
    if legacy:
        shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
    return {"shape": shape if shape is not None else (), "legacy": bool(legacy), "data": data}


def _layer(buf: bytes, span: tuple[int, int], v1: bool, index: int) -> dict:
    """A LayerParameter (or V1LayerParameter): {"name", "bottom", "blobs"} (blobs as spans)."""
    name_f, bottom_f, blobs_f = (4, 2, 6) if v1 else (1, 3, 7)
    kind = "V1 layer" if v1 else "layer"
    layer = {"name": None, "bottom": [], "blobs": []}
    for field, wire, value, start in _fields(buf, *span):
        if field == name_f:
            _want(wire, LEN, field, f"{kind} {index}'s name", start)
            layer["name"] = _text(buf, value, f"{kind} {index}'s name")
        elif field == bottom_f:
            _want(wire, LEN, field, f"{kind} {index}'s bottom", start)
            layer["bottom"].append(_text(buf, value, f"{kind} {index}'s bottom"))
        elif field == blobs_f:
            _want(wire, LEN, field, f"{kind} {index}'s blobs", start)
            layer["blobs"].append(value)
        elif v1 and field == 1 and wire == LEN:  # V0LayerParameter: the oldest files keep name and blobs here
            for f0, w0, v0, s0 in _fields(buf, *value):
                if f0 == 1 and layer["name"] is None:
                    _want(w0, LEN, f0, f"V0 layer {index}'s name", s0)
                    layer["name"] = _text(buf, v0, f"V0 layer {index}'s name")
                elif f0 == 50:
                    _want(w0, LEN, f0, f"V0 layer {index}'s blobs", s0)
                    layer["blobs"].append(v0)
    if layer["name"] is None:
        layer["name"] = f"(unnamed {kind} {index})"
    return layer


def _read(path: Path, what: str) -> bytes:
    from alexcli.data.image import Reject, read_source

    if not path.exists() and not path.is_symlink():
        raise DataError(f"{what}{path}: no such file")
    try:
        return read_source(path, max_bytes=MAX_BYTES)
    except Reject as why:
        raise DataError(f"{what}{path}: {why}") from None


def read_net(path: Path, buf: bytes | None = None) -> tuple[list[dict], dict]:
    """The layers of caffemodel PATH ({"name", "bottom", "blobs"}, in the file's order) and its
    parameters: layer name -> list of blobs (see `_blob`), each checked to hold as many numbers as
    its shape says; BUF: PATH's bytes when the caller has read them. A one-line DataError for a
    file that is not one."""
    path = Path(path)
    buf = _read(path, "") if buf is None else buf
    try:
        if buf:
            first, _ = _varint(buf, 0, len(buf))
            if first >> 3 not in NET_FIELDS:
                raise _Bad(f"its first field ({first >> 3}) is none of NetParameter's (not a caffemodel?)")
        layers = []
        for field, wire, value, start in _fields(buf, 0, len(buf)):
            if field in (100, 2):
                _want(wire, LEN, field, "a layer" if field == 100 else "a V1 layer", start)
                layers.append(_layer(buf, value, field == 2, len(layers)))
        params = {}
        for layer in layers:
            if not layer["blobs"]:
                continue
            name = layer["name"]
            if name in params:
                raise DataError(f"{path}: two layers named {name!r} have weights")
            blobs = []
            for i, span in enumerate(layer["blobs"]):
                blob = _blob(buf, *span, f"{name} blob {i}")
                count = _prod(blob["shape"])
                if count != blob["data"].size:
                    raise DataError(f"{path}: {name} blob {i} holds {blob['data'].size} numbers, but its shape "
                                    f"{_fmt(blob['shape'])} needs {count} (damaged)")
                blobs.append(blob)
            params[name] = blobs
    except _Bad as why:
        raise DataError(f"{path}: not a readable caffemodel (protobuf NetParameter): {why}") from None
    if not layers:
        raise DataError(f"{path}: not a caffemodel: no layers in it (a .prototxt or .solverstate is not the "
                        f"trained weights)")
    return layers, params


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt(shape) -> str:
    return "x".join(map(str, shape)) if shape else "(none)"


def _shaped(blob: dict, rank: int | None):
    """BLOB's data as an array of its shape; a legacy 4-d shape loses leading 1s down to RANK."""
    shape = tuple(blob["shape"])
    if blob["legacy"] and rank is not None:
        while len(shape) > rank and shape[0] == 1:
            shape = shape[1:]
    return blob["data"].reshape(shape)


def _check_layers(path: Path, layers: list[dict], params: dict) -> None:
    checked_names(path, params, LAYERS, f"a caffemodel of {WHAT}")
    by_name = {layer["name"]: layer for layer in layers}
    for norm, pool in (("norm1", "pool1"), ("norm2", "pool2")):
        if pool in by_name.get(norm, {}).get("bottom", []):
            raise DataError(f"{path}: a CaffeNet (bvlc_reference_caffenet: {norm} normalises {pool}, pooling "
                            f"before normalisation), not {WHAT}, which normalises before pooling as alexcli's "
                            f"network does")


def read_mean(path: Path):
    """The mean image of PATH (see the module doc) as a (3, S, S) float64 array, BGR, 0..255."""
    import numpy as np

    path = Path(path)
    buf = _read(path, "--mean ")
    if buf[:6] == b"\x93NUMPY":
        try:
            mean = np.load(io.BytesIO(buf), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for a damaged .npy
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DataError(f"--mean {path}: not a readable .npy ({type(exc).__name__}: {first})") from None
        if not isinstance(mean, np.ndarray) or mean.dtype.kind not in "fiu":
            raise DataError(f"--mean {path}: holds {getattr(mean, 'dtype', type(mean))}, not numbers")
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim == 3 and mean.shape[0] != 3 and mean.shape[2] == 3:
            mean = mean.transpose(2, 0, 1)  # S x S x 3 (OpenCV's layout, still BGR)
    else:
        try:
            fields = list(_fields(buf, 0, len(buf)))
            if not fields:
                raise _Bad("it is empty")
            blob = _blob(buf, 0, len(buf), "the mean")
            count = _prod(blob["shape"])
            if count != blob["data"].size:
                raise _Bad(f"it holds {blob['data'].size} numbers, but its shape {_fmt(blob['shape'])} "
                           f"needs {count} (damaged)")
            mean = _shaped(blob, 3)
        except _Bad as why:
            raise DataError(f"--mean {path}: neither a .npy nor a readable .binaryproto (a caffe BlobProto): "
                            f"{why}") from None
    if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2]:
        raise DataError(f"--mean {path}: has shape {_fmt(mean.shape)}; a mean image is 3xSxS (or SxSx3), BGR, "
                        f"square ({MEAN_HELP}: 3x256x256)")
    if mean.shape[1] < CROP:
        raise DataError(f"--mean {path}: is {mean.shape[1]}x{mean.shape[2]}, smaller than {WHAT}'s {CROP} crop")
    mean = mean.astype(np.float64)
    if not np.isfinite(mean).all():
        raise DataError(f"--mean {path}: holds values that are not finite numbers")
    if mean.min() < 0 or mean.max() > 255 or mean.max() <= 1:
        raise DataError(f"--mean {path}: its values run {mean.min():g}..{mean.max():g}; Caffe's mean is of "
                        f"0..255 pixels (BVLC's: about 94..131)")
    return mean


def read_caffe(model_path: Path, mean_path: Path | None) -> Imported:
    """bvlc_alexnet (or a fine-tuned copy: fc8 of another size) in MODEL_PATH with the mean image in
    MEAN_PATH, as alexcli's alexnet at crop 227 (see the module doc); a one-line error for a file
    that is not one."""
    import numpy as np
    import torch

    from alexcli.model.registry import make_arch

    model_path = Path(model_path)
    if mean_path is None:
        raise UsageError(f"{model_path}: a Caffe model needs the mean image it was trained with: give --mean FILE "
                         f"({MEAN_HELP})")
    buf = _read(model_path, "")  # read once: parsed, and hashed for the provenance and BVLC's sha1
    layers, params = read_net(model_path, buf)
    _check_layers(model_path, layers, params)
    expected, found = {}, {}
    for name, weight in LAYERS.items():
        for i, shape in enumerate((weight, weight[:1])):
            expected[f"{name} blob {i}"] = shape
        for i, blob in enumerate(params[name]):
            found[f"{name} blob {i}"] = _shaped(blob, len(weight) if i == 0 else 1 if i == 1 else None)
    checked_tensors(model_path, found, expected, WHAT)
    num_classes = found["fc8 blob 0"].shape[0]
    if found["fc8 blob 1"].shape[0] != num_classes:
        raise DataError(f"{model_path}: fc8 has {num_classes} outputs but {found['fc8 blob 1'].shape[0]} biases")
    if num_classes < 2:
        raise DataError(f"{model_path}: fc8 has {num_classes} output; a classifier needs at least 2")
    mean = read_mean(Path(mean_path))

    state, mapping = {}, []
    for name in LAYERS:
        for i, part in enumerate(("weight", "bias")):
            key = f"{name} blob {i}"
            array = np.array(found[key], dtype=np.float32)  # a copy: the file's bytes are read-only
            if not np.isfinite(array).all():
                raise DataError(f"{model_path}: {key} holds values that are not finite numbers (damaged)")
            if name == "conv1" and part == "weight":
                array = np.ascontiguousarray(array[:, ::-1])  # BGR -> RGB input channels
            state[f"{name}.{part}"] = torch.from_numpy(array)
            mapping.append({"from": key, "to": f"{name}.{part}", "shape": list(array.shape)})
    size = mean.shape[1]
    mean_image = torch.from_numpy(np.ascontiguousarray(mean[::-1] / 255.0, dtype=np.float32))
    arch = make_arch("alexnet", num_classes=num_classes, crop=CROP, groups=2, norm="lrn-caffe", pool="overlap",
                     dropout=0.5, init="caffe", input_scale=255.0)
    notes = ["conv1.weight's input channels reversed: Caffe's network reads BGR, alexcli's RGB",
             f"mean image {Path(mean_path).name}: BGR reversed to RGB and divided by 255 ({size}x{size}); the "
             f"network multiplies its input by 255 (input scale), so it sees Caffe's 0..255 pixels minus the mean",
             "conv2, conv4, conv5: Caffe's group 2, stored as alexcli's two columns store them; fc6 reads pool5's "
             "256x6x6 maps in the same channel, row, column order",
             "LRN as Caffe's (k 1, alpha/5): norm lrn-caffe; max pooling rounds sizes up in Caffe and down in "
             "torch, the same sizes at crop 227 (55 -> 27 -> 13 -> 6)"]
    reported = {}
    if num_classes == 1000:
        reported = dict(REPORTED)
        sha1 = hashlib.sha1(buf).hexdigest()
        if sha1 != BVLC_SHA1:
            notes.append(f"not byte for byte BVLC's published bvlc_alexnet.caffemodel (sha1 {sha1[:12]}..., BVLC's "
                         f"{BVLC_SHA1[:12]}...): its reported accuracy holds only if the weights are BVLC's "
                         f"(a copy upgraded to the new format is)")
    else:
        notes.append(f"fc8 has {num_classes} outputs: a fine-tuned model; BVLC's reported accuracy is not for it")
    return Imported(kind="caffe", source=model_path, arch=arch, state_dict=state, mean_image=mean_image, size=size,
                    mapping=mapping, notes=notes, reported=reported, sha256=hashlib.sha256(buf).hexdigest())
