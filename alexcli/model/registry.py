"""From a name to a network: building the `Arch` every checkpoint stores from the registry.

An architecture factory (see `alexcli.specs.ArchitectureFactory`) reads the Arch fields it needs;
the ones it sets otherwise than AlexNet are its `defaults`, so `make_arch("cifar-local")` is that
net's own configuration. Layer variants come from the registry by name, or are given directly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from alexcli import plugins
from alexcli.errors import UsageError
from alexcli.model.arch import Arch, arch_defaults, init_fields
from alexcli.specs import LAYER_KINDS, LayerFactories

# `--layer KIND=NAME`: the kinds by name, and the short alias kept for `act`.
LAYER_ALIASES = {"act": "activation"}


def architecture(name: str):
    """The registered factory of architecture NAME (checked against its contract)."""
    return plugins.get("architecture", name)


def make_arch(name: str = "alexnet", **fields) -> Arch:
    """An Arch for registry name NAME: its defaults, then what its --init preset sets (the input
    scale the preset's source fed), then FIELDS (those given as None are left out)."""
    given = {k: v for k, v in fields.items() if v is not None}
    defaults = arch_defaults(name)
    init = given.get("init", defaults.get("init", Arch.init))
    return Arch(name=name, **{**defaults, **init_fields(name, init), **given})


def check_init(arch: Arch) -> None:
    """ARCH's --init is one of its architecture's presets, and no field it does not read (its
    `fixed` ones) is set to another value."""
    factory = architecture(arch.name)
    if arch.init not in factory.inits:
        raise UsageError(f"--init for {arch.name} must be one of {', '.join(factory.inits)}, not {arch.init!r}")
    for field, value in getattr(factory, "fixed", {}).items():
        mine = getattr(arch, field)
        if mine != value:
            option = f"--{field.replace('_', '-')}" + ("" if isinstance(mine, bool) else f" {mine:g}")
            always = ("on" if value else "off") if isinstance(value, bool) else f"{value:g}"
            raise UsageError(f"{option}: {arch.name} has no such setting (it is always {always}); leave the option out")


def with_layers(arch: Arch, specs: list[str]) -> Arch:
    """Apply `--layer KIND=NAME` options (KIND: activation (or act), norm, pool) to an Arch."""
    changes = {}
    for spec in specs:
        kind, sep, name = spec.partition("=")
        kind = LAYER_ALIASES.get(kind, kind)
        if not sep or kind not in LAYER_KINDS or not name:
            raise UsageError(f"--layer {spec!r}: expected KIND=NAME with KIND one of {', '.join(LAYER_KINDS)} "
                             f"(or act)")
        plugins.info(kind, name)  # an unknown variant fails here, naming the ones there are
        changes[kind] = name
    return dataclasses.replace(arch, **changes)


def resolve_layers(arch: Arch, layers: LayerFactories | None = None) -> tuple[dict, dict]:
    """The layer factories for ARCH's variants (LAYERS, by kind, overrides a name with a factory
    given directly), and the provenance of each registered one for the checkpoint."""
    factories, used = {}, {}
    for kind in LAYER_KINDS:
        given = (layers or {}).get(kind)
        factories[kind] = plugins.resolve(kind, given if given is not None else getattr(arch, kind))
        if given is None:
            used[kind] = plugins.info(kind, getattr(arch, kind)).provenance()
    return factories, used


def build_model(arch: Arch, layers: LayerFactories | None = None) -> tuple[nn.Module, dict]:
    """The network for ARCH and the provenance (name, package, version) of its architecture and
    layer variants, as checkpoints record them. LAYERS may give a kind's factory directly (a class
    such as nn.BatchNorm2d, or a function) instead of the registered name in ARCH."""
    arch.validate()
    factory = architecture(arch.name)
    check_init(arch)
    factories, used = resolve_layers(arch, layers)
    used = {"architecture": plugins.info("architecture", arch.name).provenance(), **used}
    return factory(arch, factories), used


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_side(module: nn.Module, stack, crop: int) -> int:
    """Side of STACK's output for a crop x crop input, found by running it on zeros in eval mode
    (in train mode the probe would update a batch norm plugin's running statistics); 0 when a
    pooling window outgrows its input. For architectures sizing their first FC layer."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = stack(torch.zeros(1, 3, crop, crop))
    except RuntimeError:  # a pooling window larger than its input
        return 0
    finally:
        module.train(was_training)
    return x.shape[-1]


def fc6_side(module: nn.Module, stack, crop: int) -> int:
    """output_side of the maps fc6 reads (AlexNet and its one-column variant), or a UsageError
    naming --crop where they vanish before it."""
    side = output_side(module, stack, crop)
    if side < 1:
        raise UsageError(f"--crop {crop} is too small for this network: the maps vanish before fc6 "
                         "(use a crop of at least 64)")
    return side


def shapes(model: nn.Module, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Output shape after each of the architecture's `stages`, for tests and `train --dry-run`."""
    out, hooks = {}, []
    for name in architecture(model.arch.name).stages:
        hooks.append(getattr(model, name).register_forward_hook(
            lambda _m, _i, y, name=name: out.__setitem__(name, tuple(y.shape))))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(batch, 3, model.arch.crop, model.arch.crop))
    finally:
        for h in hooks:
            h.remove()
    return out


def describe(arch: Arch) -> str:
    """One line about the network: the architecture's own `describe(arch)` when it has one."""
    own = getattr(architecture(arch.name), "describe", None)
    if own is not None:
        return own(arch)
    scale = f", input x{arch.input_scale:g}" if arch.input_scale != 1 else ""
    return (f"{arch.name}, {arch.num_classes} classes, crop {arch.crop}, width {arch.width:g}, "
            f"{arch.activation}/{arch.norm}/{arch.pool}, init {arch.init}{scale}")
