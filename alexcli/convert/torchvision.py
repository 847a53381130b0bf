"""`alexcli import torchvision FILE`: torchvision's `alexnet` state dict as an `owt` checkpoint.

The file is read without unpickling arbitrary objects: `.pth`/`.pt` with
`torch.load(weights_only=True)` (tensors and plain containers only), or `.safetensors`. A state
dict wrapped in a training checkpoint (`{"state_dict": ...}` or `{"model": ...}`) or saved from
DataParallel (`module.` prefixes) is accepted too.

torchvision feeds (x - mean) / std per channel on 0..1 pixels; alexcli feeds x minus the
checkpoint's mean image. The import stores the channel means as a constant 256x256 mean image and
divides conv1's weights by the std of their input channel: conv1 is linear, and its zero padding
is zero in both spaces, so the imported network computes exactly torchvision's function.
"""

from __future__ import annotations

from pathlib import Path

from alexcli.convert.common import Imported, checked_tensors
from alexcli.errors import DataError

# torchvision.models.alexnet's normalisation and its published accuracy (AlexNet_Weights.IMAGENET1K_V1)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
REPORTED = {"top1": 56.522, "top5": 79.066, "source": "torchvision AlexNet_Weights.IMAGENET1K_V1, centre crop "
                                                        "224 of 256"}
SIZE = 256  # torchvision's eval transform: shorter side to 256, centre crop 224 (prepare --size 256)

# torchvision's keys -> alexcli's owt layer names, with their shapes (None: the class count)
LAYERS = {"features.0": ("conv1", (64, 3, 11, 11)), "features.3": ("conv2", (192, 64, 5, 5)),
          "features.6": ("conv3", (384, 192, 3, 3)), "features.8": ("conv4", (256, 384, 3, 3)),
          "features.10": ("conv5", (256, 256, 3, 3)), "classifier.1": ("fc6", (4096, 9216)),
          "classifier.4": ("fc7", (4096, 4096)), "classifier.6": ("fc8", (None, 4096))}
WHAT = "torchvision's alexnet state dict"


def expected_shapes() -> dict[str, tuple]:
    shapes = {}
    for key, (_, weight) in LAYERS.items():
        shapes[f"{key}.weight"] = weight
        shapes[f"{key}.bias"] = weight[:1]
    return shapes


def load_state_dict(path: Path) -> dict:
    """The tensors of PATH (see the module doc), or a one-line DataError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            found = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DataError(f"{path}: not a safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    else:
        try:
            found = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling refusal, a cut zip, not a torch file at all
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{path}: not a torch state dict that loads without arbitrary pickle "
                            f"({type(exc).__name__}: {first})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(found, dict) and isinstance(found.get(wrapper), dict):
            found = found[wrapper]
    if not isinstance(found, dict) or not all(isinstance(v, torch.Tensor) for v in found.values()):
        raise DataError(f"{path}: not a state dict (a mapping of names to tensors)")
    if found and all(k.startswith("module.") for k in found):
        found = {k[len("module."):]: v for k, v in found.items()}
    return found


def read_torchvision(path: Path) -> Imported:
    import torch

    from alexcli.model.registry import make_arch

    path = Path(path)
    found = load_state_dict(path)
    checked_tensors(path, found, expected_shapes(), WHAT)
    num_classes = found["classifier.6.weight"].shape[0]
    arch = make_arch("owt", num_classes=num_classes, crop=224, dropout=0.5, init="torchvision")
    state, mapping = {}, []
    for key, (name, _) in LAYERS.items():
        for part in ("weight", "bias"):
            t = found[f"{key}.{part}"].detach().float().clone()
            state[f"{name}.{part}"] = t
            mapping.append({"from": f"{key}.{part}", "to": f"{name}.{part}", "shape": list(t.shape)})
    state["conv1.weight"] = state["conv1.weight"] / torch.tensor(STD).view(1, 3, 1, 1)
    mean_image = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1).expand(3, SIZE, SIZE).contiguous()
    notes = [f"conv1.weight divided by torchvision's input std {STD} per input channel (its input "
             f"normalisation, folded in)",
             f"mean image: torchvision's channel means {MEAN} at every pixel of {SIZE}x{SIZE}"]
    return Imported(kind="torchvision", source=path, arch=arch, state_dict=state, mean_image=mean_image, size=SIZE,
                    mapping=mapping, notes=notes, reported=dict(REPORTED))


def torchvision_names(count: int) -> list[str] | None:
    """torchvision's ImageNet category names in its output order, when COUNT is 1,000."""
    if count != 1000:
        return None
    try:
        from torchvision.models import AlexNet_Weights

        return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])
    except Exception:  # noqa: BLE001 - an older torchvision without the weights enum
        return None
