"""The plugin contracts, as code: one Protocol per extension point.

Each kind is an entry-point group (alexcli's built-ins are registered through the same groups in
its pyproject.toml). The entry-point name is the name users type; the object it names must fit
the kind's Protocol below. `alexcli.plugins` checks what it loads against `check()` (callable,
the right number of arguments, an architecture's declared attributes) and refuses a misfit with a
PluginError naming the package; `alexcli.testing` runs the behavioural checks (shapes, finite
values, gradients, determinism) that plugin packages and alexcli's own suite share.
docs/plugins.md is the author's guide.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from alexcli.model.arch import Arch

# kind (what users type, e.g. in `alexcli plugins`) -> entry-point group
GROUPS: dict[str, str] = {
    "activation": "alexcli.layers.activation",
    "norm": "alexcli.layers.norm",
    "pool": "alexcli.layers.pool",
    "augmentation": "alexcli.augmentations",
    "architecture": "alexcli.architectures",
}
LAYER_KINDS = ("activation", "norm", "pool")  # the kinds an architecture is built from


# ---------------------------------------------------------------- layer variants

class ActivationFactory(Protocol):
    """`alexcli.layers.activation`: a fresh module per use (`--layer activation=NAME`)."""

    def __call__(self) -> "nn.Module": ...


class NormFactory(Protocol):
    """`alexcli.layers.norm`: a fresh module for CHANNELS maps (`--layer norm=NAME`). AlexNet calls
    it once per column with that column's channels (48 and 128 at full width), after the ReLU of
    conv1 and conv2."""

    def __call__(self, channels: int) -> "nn.Module": ...


class PoolFactory(Protocol):
    """`alexcli.layers.pool`: a fresh module (`--layer pool=NAME`); AlexNet applies it to 55x55,
    27x27 and 13x13 maps."""

    def __call__(self) -> "nn.Module": ...


# ---------------------------------------------------------------- augmentations

@dataclass
class AugmentContext:
    """What an augmentation may need, from the data set's stats.safetensors (0..1 pixel scale),
    on the training device."""

    crop: int                     # side of the network's input (224)
    mean_image: "torch.Tensor"    # (3, S, S) float32
    eigval: "torch.Tensor"        # (3,) eigenvalues of the RGB covariance, descending
    eigvec: "torch.Tensor"        # (3, 3) eigenvectors in columns

    @classmethod
    def from_stats(cls, stats: Mapping[str, "torch.Tensor"], crop: int, device) -> "AugmentContext":
        """The context for a data set's statistics (`alexcli.data.dataset.load_stats`) on DEVICE."""
        return cls(crop=crop, mean_image=stats["mean_image"].float().to(device),
                   eigval=stats["pca_eigval"].float().to(device), eigvec=stats["pca_eigvec"].float().to(device))


# augment(x, gen) -> x: x a float32 (N, 3, H, W) batch on the training device (0..1 scale, minus the
# mean image after `mean`); gen a CPU torch.Generator to draw every random number from (then moved
# with alexcli.transforms.to_device), so runs follow --seed and CPU and GPU see the same images.
Augment = Callable[["torch.Tensor", "torch.Generator"], "torch.Tensor"]


class AugmentationFactory(Protocol):
    """`alexcli.augmentations`: called once per run with the context; returns the batch function
    applied to every training batch, in `--augment` order."""

    def __call__(self, ctx: AugmentContext) -> Augment: ...


# ---------------------------------------------------------------- architectures

# {"activation": ActivationFactory, "norm": NormFactory, "pool": PoolFactory}, resolved from the
# Arch's variant names by the registry (or given directly to build_model).
LayerFactories = Mapping[str, Callable[..., "nn.Module"]]


@runtime_checkable
class Network(Protocol):
    """What an architecture factory returns: an nn.Module with these."""

    arch: "Arch"

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        """(N, 3, crop, crop) images (0..1 scale minus the mean image; the network multiplies by
        `arch.input_scale` itself) -> (N, num_classes) logits."""
        ...

    def features(self, x: "torch.Tensor") -> "torch.Tensor":
        """The last hidden layer, (N, D): the codes `alexcli neighbors` compares (Figure 4, right)."""
        ...

    # Optional: `decayed_parameters() -> (decayed, not decayed)` when weight decay should skip some
    # parameters (the CIFAR net's conv layers); without it every parameter is decayed, as in the
    # paper (`alexcli.train.optim.param_groups`).


@runtime_checkable
class ArchitectureFactory(Protocol):
    """`alexcli.architectures`: `factory(arch, layers) -> Network`, with four declared attributes,
    and three optional ones:

    - `init_fields` ({preset: {field: value}}): Arch fields an --init preset sets unless the command
      line gives them, e.g. the input scale the preset's source fed (AlexNet's `kaiming`: 1);
    - `legacy` ({field: value}): the value a field had before it existed, for checkpoints written
      then (AlexNet's input scale: 1, whatever the default is now);
    - `fixed` ({field: value}): Arch fields the network does not read, each with the one value it
      has (the CIFAR net: groups 1, dropout 0, no conv6); an Arch with another value is refused, so
      `--groups 2` on such a net is an error, not a setting silently recorded and ignored.
    """

    defaults: Mapping[str, Any]   # Arch fields this architecture sets otherwise than Arch does (crop, init, ...)
    inits: Sequence[str]          # the --init presets it accepts; its default is defaults["init"] or Arch's
    stages: Sequence[str]         # the submodules whose output shapes `train --dry-run` prints, in order
    feature_layer: str            # the layer `features()` returns, as users read it ("fc7 after its ReLU")

    def __call__(self, arch: "Arch", layers: LayerFactories) -> Network: ...


# ---------------------------------------------------------------- the check on load

@dataclass(frozen=True)
class Spec:
    protocol: type
    args: int                                    # positional arguments the factory is called with
    attrs: Mapping[str, tuple[type, ...]] | None = None  # declared attributes and their types (architectures)


SPECS: dict[str, Spec] = {
    "activation": Spec(ActivationFactory, 0),
    "norm": Spec(NormFactory, 1),
    "pool": Spec(PoolFactory, 0),
    "augmentation": Spec(AugmentationFactory, 1),
    "architecture": Spec(ArchitectureFactory, 2, {"defaults": (Mapping,), "inits": (tuple, list),
                                                  "stages": (tuple, list), "feature_layer": (str,)}),
}


def check(kind: str, obj) -> str | None:
    """What is wrong with OBJ as a plugin of KIND, or None when it fits the contract."""
    spec = SPECS[kind]
    if not callable(obj):
        return f"{type(obj).__name__} is not callable"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins have no signature: nothing to check
        sig = None
    if sig is not None:
        try:
            sig.bind(*[None] * spec.args)
        except TypeError:
            return f"it must take {spec.args} positional argument(s) ({_call_form(kind)}); its signature is {sig}"
    for name, types in (spec.attrs or {}).items():
        if not hasattr(obj, name):
            return f"it lacks the attribute {name!r} (declare {', '.join(spec.attrs)} on the factory)"
        if not isinstance(getattr(obj, name), types):
            return f"its {name!r} is a {type(getattr(obj, name)).__name__}, not a {' or '.join(t.__name__ for t in types)}"
    if kind == "architecture":
        if not obj.inits or not all(isinstance(i, str) for i in obj.inits):
            return "its 'inits' must name at least one --init preset"
        from alexcli.model.arch import arch_fields

        unknown = sorted(set(obj.defaults) - arch_fields())
        if unknown:
            return f"its 'defaults' name fields Arch does not have: {', '.join(unknown)}"
        init_fields, legacy = getattr(obj, "init_fields", {}), getattr(obj, "legacy", {})
        if not isinstance(init_fields, Mapping) or not isinstance(legacy, Mapping) or not all(
                isinstance(v, Mapping) for v in init_fields.values()):
            return "its 'init_fields' must map presets to {field: value} and its 'legacy' fields to values"
        unknown = sorted(set(init_fields) - set(obj.inits))
        if unknown:
            return f"its 'init_fields' name presets it does not have: {', '.join(unknown)}"
        unknown = sorted(set(legacy).union(*map(set, init_fields.values())) - arch_fields())
        if unknown:
            return f"its 'init_fields' or 'legacy' name fields Arch does not have: {', '.join(unknown)}"
        fixed = getattr(obj, "fixed", {})
        if not isinstance(fixed, Mapping) or set(fixed) - arch_fields():
            return "its 'fixed' must map Arch fields to the one value each has"
        from alexcli.model.arch import Arch

        clash = sorted(k for k, v in fixed.items() if obj.defaults.get(k, getattr(Arch, k)) != v)
        if clash:
            return f"its 'fixed' fields {', '.join(clash)} differ from its defaults"
    return None


def _call_form(kind: str) -> str:
    return {"activation": "factory()", "norm": "factory(channels)", "pool": "factory()",
            "augmentation": "factory(ctx)", "architecture": "factory(arch, layers)"}[kind]
