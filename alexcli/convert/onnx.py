"""`alexcli export CKPT --format onnx`: a checkpoint as an ONNX graph that computes what
`alexcli eval --crops center` computes, checked with onnxruntime before it is kept.

The graph's input contract is an image as `alexcli prepare` writes it: float32 (N, 3, S, S), RGB,
0..1, S the checkpoint's image size (256 for ImageNet: the shorter side resized to S and the
central square kept). Inside the graph: the central crop x crop patch, minus the checkpoint's mean
image there, through the network; out come the logits (N, classes). The batch dimension is
dynamic. Class ids and names, S, the crop and the source checkpoint are in the model's
metadata_props.

torch's TorchScript-based exporter is used (`dynamo=False`): it needs only the `onnx` package,
where the torch.export-based one also needs onnxscript. A network that does not export is refused
naming the first layer that cannot (each leaf module is tried on its own with the input it saw).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch

from alexcli.errors import AlexcliError, DataError, UsageError
from alexcli.transforms import center_crop

OPSET = 17
TOLERANCE = 1e-4  # largest |onnxruntime - torch| allowed, relative to the logits' largest magnitude
INSTALL = "pip install 'alexcli[onnx]' (or: pip install onnx onnxruntime)"


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f"alexcli export --format onnx needs the {module} package: {INSTALL}") from None


class Served(torch.nn.Module):
    """The network with eval's centre-crop input in front (`transforms.center_crop`, the mean image
    subtracted there): (N, 3, S, S) 0..1 RGB -> logits."""

    def __init__(self, model, mean_image, crop: int):
        super().__init__()
        self.model, self.crop = model, crop
        self.register_buffer("mean", center_crop(mean_image.float(), crop).clone() if mean_image is not None
                             else torch.zeros(3, crop, crop))

    def forward(self, x):
        return self.model(center_crop(x, self.crop) - self.mean)


def _export_bytes(module, example) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return buf.getvalue()


def _first_unexportable(model, example) -> tuple[str, str, str] | None:
    """(name, type, reason) of the first leaf module, in the order the forward pass reaches them,
    that does not export on its own with the input it saw."""
    seen, hooks = [], []
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(
                lambda m, args, _out, name=name: seen.append((name, m, args[0].detach().clone()))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, module, x in seen:
        try:
            _export_bytes(module, x)
        except Exception as exc:  # noqa: BLE001 - whatever the exporter raises names the op
            return name, f"{type(module).__module__}.{type(module).__qualname__}", _first_line(exc)
    return None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def export_model(model, mean_image, crop: int, size: int, out: Path, metadata: dict,
                 check_images: int = 4) -> dict:
    """Export MODEL (in eval mode, on the CPU) with eval's centre-crop input in front as ONNX to OUT
    (atomically), after checking onnxruntime's logits against torch's on CHECK_IMAGES seeded
    images. METADATA goes into metadata_props (values JSON-encoded when not strings)."""
    import numpy as np

    onnx = _need("onnx")
    ort = _need("onnxruntime")
    served = Served(model.eval().cpu(), mean_image, crop).eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        raw = _export_bytes(served, example)
    except Exception as exc:  # noqa: BLE001 - find the layer to name
        culprit = _first_unexportable(served.model, example[:, :, :crop, :crop] - served.mean)
        if culprit is None:
            raise AlexcliError(f"the network does not export to ONNX ({_first_line(exc)})") from None
        name, kind, why = culprit
        raise UsageError(f"layer {name} ({kind}) cannot be exported to ONNX opset {OPSET}: {why}") from None
    proto = onnx.load_from_string(raw)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    data = proto.SerializeToString()
    # the check, on other images and another batch size than the export's example
    images = torch.rand(check_images, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = served(images).numpy()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.numpy()})[0]
    scale = float(np.abs(want).max()) or 1.0
    diff = float(np.abs(got - want).max()) / scale
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise AlexcliError(f"the exported graph's logits differ from the network's by {diff:.2e} of their scale "
                           f"(allowed {TOLERANCE:g}); nothing written")
    from alexcli.io import atomic_write

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    return {"out": str(out), "format": "onnx", "opset": OPSET, "bytes": len(data),
            "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32",
                      "range": "0..1 RGB, an image as alexcli prepare writes it"},
            "output": {"name": "logits", "shape": ["batch", int(want.shape[1])]},
            "checked": {"images": check_images, "runtime": f"onnxruntime {ort.__version__}",
                        "max_difference": diff, "tolerance": TOLERANCE}}


def export_checkpoint(ckpt_path, out, overwrite: bool = False) -> dict:
    """`alexcli export CKPT --format onnx --out OUT`."""
    from alexcli.convert.common import check_out
    from alexcli.data.dataset import class_names
    from alexcli.evaluate import load_scored

    onnx = _need("onnx")
    _need("onnxruntime")
    out = check_out(out, overwrite, ".onnx", "ONNX models", "an ONNX model", lambda p: _is_onnx(onnx, p))
    s = load_scored(ckpt_path, "cpu")  # the network and the input eval gives it
    mean, meta_in = s.mean_image, s.meta
    size = meta_in.get("data", {}).get("size") or (mean.shape[-1] if mean is not None else s.crop)
    if mean is not None and mean.shape[-1] != size:
        raise DataError(f"{ckpt_path}: its mean image is {mean.shape[-1]}x{mean.shape[-1]} but its data size is {size}")
    meta = {"alexcli.checkpoint": str(Path(ckpt_path)), "alexcli.sha256": meta_in["sha256"],
            "alexcli.arch": meta_in["arch"], "alexcli.classes": list(s.classes),
            "alexcli.class_names": class_names(meta_in), "alexcli.image_size": size, "alexcli.crop": s.crop,
            "alexcli.input": "float32 (batch, 3, S, S) RGB 0..1; the graph takes the central crop and subtracts "
                             "the mean image"}
    result = export_model(s.model, mean, s.crop, size, out, meta)
    return dict(result, checkpoint=str(ckpt_path), classes=len(s.classes), image_size=size, crop=s.crop)


def _is_onnx(onnx, path: Path) -> bool:
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - anything onnx cannot read is not ours to replace
        return False
    return True
