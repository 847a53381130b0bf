"""`Arch`: everything needed to rebuild a network, stored in every checkpoint (no torch here, so the
command line reads its defaults without importing it).

It holds the architecture's registry name (`alexcli.architectures`), the layer variants' names
(`alexcli.layers.*`) and the sizes. An old checkpoint that lacks a field rebuilds with its
architecture's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from alexcli.errors import PluginError, UsageError


@dataclass(frozen=True)
class Arch:
    """The network's configuration; stored in every checkpoint. The sizes' defaults are the paper's
    AlexNet; build one with `alexcli.model.registry.make_arch`, which adds the architecture's and
    its preset's defaults."""

    name: str = "alexnet"      # registry name: alexnet, cifar-local, owt, or a plugin's
    num_classes: int = 1000
    crop: int = 224            # input side; 224 with conv1 padding 2 (paper), 227 with padding 0 (Caffe)
    width: float = 1.0         # multiplies every layer's channels and units (small experiments)
    groups: int = 2            # 2: the paper's two columns on conv2/4/5; 1: one column
    activation: str = "relu"   # registry names (alexcli plugins)
    norm: str = "lrn"
    pool: str = "overlap"
    dropout: float = 0.5       # section 4.2: fc6 and fc7
    # A preset of the architecture's `inits`. The architecture's own default and the fields a
    # preset sets come from its registry entry (`make_arch`): AlexNet's is `convnet2` at input scale
    # 255 (alexcli.model.alexnet). These dataclass values are what a bare Arch() holds.
    init: str = "paper"
    conv6: bool = False        # the sixth conv layer of the paper's pre-trained models (section 6)
    # Multiplies the network's input (0..1 pixels minus the mean image) before its first layer: 255
    # feeds the paper's "(centered) raw RGB values" (section 2), the scale its LRN constants were
    # chosen for; at 1 LRN is a near-constant factor (docs/design.md).
    input_scale: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arch":
        """The Arch a checkpoint stored. A field the dict lacks (written before the field existed)
        takes the value it had then (the architecture's `legacy`), else the architecture's default,
        so an old checkpoint rebuilds the network it trained."""
        name = d.get("name", "alexnet")
        try:
            base = {**arch_defaults(name), **arch_legacy(name)}
        except PluginError:  # the architecture's package is missing: build_model names it
            base = {}
        return cls(**{k: v for k, v in {**base, **d}.items() if k in arch_fields()})

    def validate(self) -> None:
        if self.groups not in (1, 2):
            raise UsageError(f"--groups must be 1 or 2, not {self.groups}")
        if not 0 < self.width <= 4:
            raise UsageError(f"--width must be in (0, 4], not {self.width}")
        if self.num_classes < 2:
            raise UsageError(f"a classifier needs at least 2 classes, not {self.num_classes}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1), not {self.dropout}")
        if not 0 < self.input_scale <= 1e4:
            raise UsageError(f"--input-scale must be in (0, 10000], not {self.input_scale}")


def arch_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(Arch)}


def _declared(name: str, attribute: str) -> dict:
    """A copy of the dict architecture NAME's factory declares as ATTRIBUTE ({} when it has none)."""
    from alexcli import plugins

    return dict(getattr(plugins.get("architecture", name), attribute, {}))


def arch_defaults(name: str) -> dict:
    """The Arch fields architecture NAME sets differently from AlexNet (e.g. the CIFAR net's crop 24)."""
    return _declared(name, "defaults")


def arch_legacy(name: str) -> dict:
    """The values fields had before they existed, for architecture NAME's old checkpoints."""
    return _declared(name, "legacy")


def init_fields(name: str, init: str) -> dict:
    """The Arch fields architecture NAME's preset INIT sets unless they are given."""
    return dict(_declared(name, "init_fields").get(init, {}))
