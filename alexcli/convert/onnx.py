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

OPSET = 17
TOLERANCE = 1e-4  # largest |onnxruntime - torch| allowed, relative to the logits' largest magnitude
INSTALL = "pip install 'alexcli[onnx]' (or: pip install onnx onnxruntime)"


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f"alexcli export --format onnx needs the {module} package: {INSTALL}") from None


class Served(torch.nn.Module):
    """The network with eval's centre-crop input in front: (N, 3, S, S) 0..1 RGB -> logits."""

    def __init__(self, model, mean_image, crop: int):
        super().__init__()
        self.model, self.crop = model, crop
        side = mean_image.shape[-1]
        o = (side - crop) // 2
        self.register_buffer("mean", (mean_image.float()[:, o:o + crop, o:o + crop] if mean_image is not None
                                      else torch.zeros(3, crop, crop)).clone())
        self.offset = o

    def forward(self, x):
        o, c = self.offset, self.crop
        return self.model(x[:, :, o:o + c, o:o + c] - self.mean)


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
    from alexcli.checkpoint import load_model

    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: give a name ending in .onnx")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name ending in .onnx")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UsageError(f"--out {out}: exists; choose another name or add --overwrite")
    if out.exists() and overwrite:
        _need("onnx")
        try:
            __import__("onnx").load(str(out), load_external_data=False)
        except Exception:  # noqa: BLE001 - anything onnx cannot read is not ours to replace
            raise UsageError(f"--out {out}: exists and is not an ONNX model; alexcli replaces only its own "
                             f"files: move it away or choose another name") from None
    _need("onnx")
    _need("onnxruntime")
    model, ckpt = load_model(ckpt_path)
    mean = ckpt.data.get("mean_image") if "mean" in ckpt.meta.get("augment", ["mean"]) else None
    size = ckpt.meta.get("data", {}).get("size") or (mean.shape[-1] if mean is not None else ckpt.arch.crop)
    if mean is not None and mean.shape[-1] != size:
        raise DataError(f"{ckpt_path}: its mean image is {mean.shape[-1]}x{mean.shape[-1]} but its data size is {size}")
    from alexcli.data.dataset import class_names

    meta = {"alexcli.checkpoint": str(Path(ckpt_path)), "alexcli.sha256": ckpt.meta["sha256"],
            "alexcli.arch": ckpt.meta["arch"], "alexcli.classes": list(ckpt.meta["classes"]),
            "alexcli.class_names": class_names(ckpt.meta), "alexcli.image_size": size, "alexcli.crop": ckpt.arch.crop,
            "alexcli.input": "float32 (batch, 3, S, S) RGB 0..1; the graph takes the central crop and subtracts "
                             "the mean image"}
    result = export_model(model, mean, ckpt.arch.crop, size, out, meta)
    return dict(result, checkpoint=str(ckpt_path), classes=len(ckpt.meta["classes"]), image_size=size,
                crop=ckpt.arch.crop)
