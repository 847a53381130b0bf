"""The paper's two-GPU split (section 3.2, Figure 2): `alexcli train --parallel columns`.

Each column holds half of every layer's kernels (or units) on its own device. Column k's conv2,
conv4 and conv5 read only its own maps (the one-device model's groups=2), and its LRN runs over
its own maps. Tensors cross devices only where the paper's GPUs communicate: into conv3 (each
half of conv3's kernels reads both columns' pool2 maps) and into the fully-connected layers
(fc6 and fc7 halves read both halves of the layer below; fc8 on devices[0] reads both fc7 halves).

The one-device `AlexNet` with groups=2 computes the same function, so its layout is the one
checkpoints use: `ColumnAlexNet(model, devices)` slices a model's state into the columns, and
`merged_state_dict()` / `merged_grads()` give the columns' tensors back in the one-device layout.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from alexcli.errors import UsageError
from alexcli.model.alexnet import AlexNet

# Layers whose kernels/units the columns split in two along dim 0 (output channels or units).
# A grouped conv's weight is (out, in/2, k, k), so its half k is exactly group k's kernels.
SPLIT = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7")
# Response normalisation: the one-device model already keeps one module per column (PerColumn).
NORMS = ("norm1", "norm2")
# Per-column copies of parameter-free layers.
PLAIN = ("act1", "pool1", "act2", "pool2", "act3", "act4", "act5", "act6c", "pool5",
         "act6", "drop6", "act7", "drop7")


def _part(layer: nn.Module, device: torch.device, parts: int = 2) -> nn.Module:
    """An empty module for 1/PARTS of LAYER's output channels/units (weights come from a state
    dict). A conv with groups=2 becomes an ordinary conv over its own column's input channels."""
    kw = dict(bias=layer.bias is not None, device="meta", dtype=layer.weight.dtype)
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(layer.in_channels // layer.groups, layer.out_channels // parts, layer.kernel_size,
                         layer.stride, layer.padding, layer.dilation, **kw)
    else:
        part = nn.Linear(layer.in_features, layer.out_features // parts, **kw)
    return part.to_empty(device=device)


def _gather(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Both columns' tensors on DEVICE, column 0's channels first (the one-device order)."""
    return torch.cat([p.to(device, non_blocking=True) for p in parts], dim=1)


class Column(nn.Module):
    """One column's layers, conv1 to fc7's half, all on one device."""

    def __init__(self, model: AlexNet, k: int, device: torch.device):
        super().__init__()
        self.conv6_on, self.input_scale = model.arch.conv6, model.arch.input_scale
        for name in SPLIT:
            if hasattr(model, name):
                setattr(self, name, _part(getattr(model, name), device))
        for name in NORMS:
            norm = getattr(model, name).cols[k]
            if getattr(norm, "spans_columns", False):
                raise UsageError(f"--parallel columns cannot split {name} ({type(norm).__name__}): it normalises "
                                 f"across both columns' maps, as Caffe's LRN does, and each device holds one column")
            setattr(self, name, copy.deepcopy(norm).to(device))
        for name in PLAIN:
            if hasattr(model, name):
                layer = getattr(model, name)
                if next(layer.parameters(), None) is not None or next(layer.buffers(), None) is not None:
                    raise UsageError(f"--parallel columns cannot split {name} ({type(layer).__name__}): "
                                     f"it has parameters or buffers shared by both columns")
                setattr(self, name, copy.deepcopy(layer).to(device))

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 (the whole image) and conv2 (own maps only), each with ReLU, LRN and pooling."""
        if self.input_scale != 1:
            x = x * self.input_scale
        x = self.pool1(self.norm1(self.act1(self.conv1(x))))
        return self.pool2(self.norm2(self.act2(self.conv2(x))))

    def upper(self, both: torch.Tensor) -> torch.Tensor:
        """conv3 (both columns' pool2 maps), then conv4 and conv5 on own maps; flattened pool5."""
        x = self.act3(self.conv3(both))
        x = self.act5(self.conv5(self.act4(self.conv4(x))))
        if self.conv6_on:
            x = self.act6c(self.conv6(x))
        return torch.flatten(self.pool5(x), 1)


class ColumnAlexNet(nn.Module):
    """MODEL's network split over two devices as in section 3.2; its parameters are the columns'
    own, so an optimizer runs on them directly. MODEL is left as it was."""

    def __init__(self, model: AlexNet, devices: list[torch.device | str]):
        super().__init__()
        if len(devices) != 2:
            raise UsageError(f"--parallel columns needs exactly 2 devices, not {len(devices)}")
        if model.arch.groups != 2:
            raise UsageError(f"--parallel columns needs the two-column network (groups=2), not groups={model.arch.groups}")
        self.arch = model.arch
        self.devices = [torch.device(d) for d in devices]
        self.columns = nn.ModuleList(Column(model, k, d) for k, d in enumerate(self.devices))
        self.fc8 = _part(model.fc8, self.devices[0], parts=1)  # section 3.2, Figure 2: fc8 reads both fc7 halves
        self.load_merged_state_dict(model.state_dict())
        self.train(model.training)

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each column's half of fc7's activations (before dropout), on its own device."""
        cols, devs = self.columns, self.devices
        h = [c.lower(x.to(d, non_blocking=True)) for c, d in zip(cols, devs)]
        h = [c.upper(_gather(h, d)) for c, d in zip(cols, devs)]          # crossing 1: into conv3
        # Dropout before the copy, so both fc7 halves see the same dropped units.
        h = [c.drop6(c.act6(c.fc6(_gather(h, d)))) for c, d in zip(cols, devs)]  # crossing 2: fc6
        return [c.act7(c.fc7(_gather(h, d))) for c, d in zip(cols, devs)]     # crossing 3: fc7

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer on devices[0], as `AlexNet.features`."""
        return _gather(self.hidden(x), self.devices[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = [c.drop7(part) for c, part in zip(self.columns, self.hidden(x))]
        return self.fc8(_gather(h, self.devices[0]))                       # crossing 4: fc8

    # --- the one-device layout ------------------------------------------------------------

    def to_single(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors named as this module's state (`columns.K.LAYER.NAME`, `fc8.NAME`) renamed and
        joined into the one-device model's layout, on devices[0]. Works for weights, gradients and
        optimizer buffers alike."""
        out, halves = {}, {}
        for name, t in tensors.items():
            if name.startswith("fc8."):
                out[name] = t
                continue
            _, k, layer, rest = name.split(".", 3)
            if layer in NORMS:
                out[f"{layer}.cols.{k}.{rest}"] = t
            else:
                halves.setdefault(f"{layer}.{rest}", {})[int(k)] = t
        for name, parts in halves.items():
            out[name] = torch.cat([parts[0], parts[1].to(parts[0].device)], dim=0)
        return out

    def from_single(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `to_single`: one-device tensors sliced and named for this module, each
        on its column's device."""
        out = {}
        for name, t in state.items():
            layer, rest = name.split(".", 1)
            if layer == "fc8":
                out[name] = t.to(self.devices[0])
            elif layer in NORMS:
                _, k, rest = rest.split(".", 2)  # cols.K.NAME
                out[f"columns.{k}.{layer}.{rest}"] = t.to(self.devices[int(k)])
            elif layer in SPLIT:
                for k, part in enumerate(t.chunk(2, dim=0)):
                    out[f"columns.{k}.{layer}.{rest}"] = part.to(self.devices[k])
            else:
                raise UsageError(f"{name} is not a tensor of the two-column network")
        return out

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in the one-device layout (what checkpoints store)."""
        return self.to_single(self.state_dict())

    def load_merged_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(self.from_single(state))

    def merged_grads(self) -> dict[str, torch.Tensor]:
        """Each parameter's gradient in the one-device layout (parameters without one are left out)."""
        return self.to_single({n: p.grad for n, p in self.named_parameters() if p.grad is not None})
