"""The checks every plugin must pass, for plugin packages and for alexcli's own suite.

alexcli's tests run `check_registered(kind, name)` over every registered name of every kind,
built-ins and installed plugins alike (as timm runs every model through the same test); a plugin
package calls the `check_<kind>` of its kind on its own factory and uses the `registry` fixture:

    from alexcli.testing import check_norm, registry  # noqa: F401  (registry is a pytest fixture)

    def test_fits_the_contract():
        check_norm(my_norm)

    def test_found_by_name(registry):
        assert registry.get("norm", "mynorm") is my_norm

Each check raises AssertionError with what is wrong. The contracts themselves are `alexcli.specs`.
`fake_distribution` makes a package look installed (a dist-info folder), for tests of how the
registry treats what other packages register.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from alexcli import plugins
from alexcli.specs import AugmentContext, Network, check

__all__ = ["CHECKS", "check_activation", "check_architecture", "check_augmentation", "check_norm", "check_pool",
           "check_registered", "context", "fake_distribution", "images", "registry"]


def context(crop: int = 32, full: int = 40, seed: int = 123, device="cpu") -> AugmentContext:
    """A small AugmentContext like a data set's: a random mean image, PCA of a plausible spread."""
    g = torch.Generator().manual_seed(seed)
    eigvec = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0].float()
    return AugmentContext(crop=crop, mean_image=torch.rand(3, full, full, generator=g).to(device),
                          eigval=torch.tensor([0.2, 0.02, 0.005], device=device), eigvec=eigvec.to(device))


def images(n: int = 6, side: int = 40, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """A float batch (N, C, side, side) of 0..1 values."""
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


def fake_distribution(site: Path, dist: str, version: str, entries: dict[str, dict[str, str]],
                      modules: dict[str, str] | None = None) -> Path:
    """Make distribution DIST look installed to importlib.metadata once SITE is on sys.path (or
    PYTHONPATH): a dist-info folder with its ENTRIES ({group: {name: "module:attr"}}) and the
    MODULES ({module name: source}) beside it. Returns the dist-info folder. Call
    `alexcli.plugins.reset()` after putting SITE on sys.path."""
    site = Path(site)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for group, names in entries.items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in names.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in (modules or {}).items():
        (site / f"{name}.py").write_text(source)
    return info


def _contract(kind: str, factory) -> None:
    problem = check(kind, factory)
    assert problem is None, f"{kind} {getattr(factory, '__name__', factory)!r}: {problem}"


def _finite_with_gradients(layer: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    x = x.clone().requires_grad_()
    y = layer(x * 1)  # `* 1`: an in-place layer must not write into the leaf
    assert torch.isfinite(y).all(), f"{what}: non-finite output"
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), f"{what}: no finite gradient reaches the input"
    return y


def _fresh(factory, *args) -> nn.Module:
    a, b = factory(*args), factory(*args)
    assert isinstance(a, nn.Module), f"returns a {type(a).__name__}, not an nn.Module"
    assert a is not b, "returns the same module twice: each layer needs its own"
    return a


def check_activation(factory) -> None:
    """factory() -> a fresh module that keeps the shape, finite values and gradients."""
    _contract("activation", factory)
    x = torch.randn(2, 16, 13, 13) * 3
    y = _finite_with_gradients(_fresh(factory), x, "activation")
    assert y.shape == x.shape, f"activation changes the shape {tuple(x.shape)} -> {tuple(y.shape)}"


def check_norm(factory, channels: int = 16) -> None:
    """factory(channels) -> a fresh module for that many maps: shape kept, finite, gradients; the
    same input gives the same output in eval mode."""
    _contract("norm", factory)
    layer = _fresh(factory, channels)
    x = torch.rand(4, channels, 9, 9) * 30  # post-ReLU sized activations: large enough for LRN to act
    y = _finite_with_gradients(layer.train(), x, "norm")
    assert y.shape == x.shape, f"norm changes the shape {tuple(x.shape)} -> {tuple(y.shape)}"
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x)), "norm in eval mode is not a function of its input"


def check_pool(factory) -> None:
    """factory() -> a fresh module that keeps batch and channels, does not grow the maps, and
    gives AlexNet's sizes from 55x55 maps a sensible result (at least 1x1)."""
    _contract("pool", factory)
    x = torch.randn(2, 8, 55, 55)
    y = _finite_with_gradients(_fresh(factory), x, "pool")
    assert y.shape[:2] == x.shape[:2] and 1 <= y.shape[-1] <= 55, f"pool gives {tuple(y.shape)} from 55x55"


def check_augmentation(factory, ctx: AugmentContext | None = None) -> None:
    """factory(ctx) -> augment(x, gen): a float batch of the same images and channels, at the
    context's full size or its crop, finite; the same generator seed gives the same batch; the
    input is left as it was."""
    _contract("augmentation", factory)
    ctx = ctx or context(crop=32, full=40)
    fn = factory(ctx)
    assert callable(fn), f"the factory returns a {type(fn).__name__}, not a function of (x, gen)"
    side = ctx.mean_image.shape[-1]
    x = images(6, side)
    before = x.clone()
    y = fn(x, torch.Generator().manual_seed(0))
    assert torch.equal(x, before), "augmentation modifies its input in place"
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype, "augmentation must return a float tensor like its input"
    assert y.shape[:2] == (6, 3) and y.shape[-1] in (side, ctx.crop), f"augmentation gives {tuple(y.shape)}"
    assert torch.isfinite(y).all(), "augmentation gives non-finite values"
    assert torch.equal(y, fn(x, torch.Generator().manual_seed(0))), "the same seed gives a different batch"


def check_architecture(factory, name: str | None = None, **fields) -> None:
    """factory(arch, layers) -> a Network for every init it declares: logits (N, num_classes) and
    features (N, D), finite, gradients to every parameter; its stages are submodules; the same seed
    gives the same weights. FIELDS (e.g. width, crop) make the check's network small."""
    from alexcli.model.registry import build_model, make_arch, shapes

    _contract("architecture", factory)
    name = name or next((p.name for p in plugins.discover("architecture")
                         if plugins.get("architecture", p.name) is factory), None)
    assert name is not None, "check_architecture needs the registered name of an unregistered factory"
    fields = {"num_classes": 5, **fields}
    for init in factory.inits:
        arch = make_arch(name, **{"init": init, **fields})
        torch.manual_seed(0)
        model, used = build_model(arch)
        assert isinstance(model, nn.Module) and isinstance(model, Network), \
            f"{name}: the factory must return an nn.Module with .arch and .features()"
        assert used["architecture"]["name"] == name
        x = torch.randn(2, 3, arch.crop, arch.crop)
        model.train()
        logits = model(x)
        assert logits.shape == (2, arch.num_classes), f"{name} (init {init}): logits {tuple(logits.shape)}"
        assert torch.isfinite(logits).all(), f"{name} (init {init}): non-finite logits"
        logits.sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{name} (init {init}): no finite gradient for {', '.join(missing[:5])}"
        model.eval()
        with torch.no_grad():
            codes = model.features(x)
        assert codes.dim() == 2 and codes.shape[0] == 2 and codes.shape[1] >= 1, f"{name}: features {tuple(codes.shape)}"
        got = shapes(model)
        assert list(got) == list(factory.stages), f"{name}: stages {list(factory.stages)} gave shapes for {list(got)}"
        torch.manual_seed(0)
        again, _ = build_model(arch)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values())), \
            f"{name} (init {init}): the same seed gives different weights"


CHECKS = {"activation": check_activation, "norm": check_norm, "pool": check_pool,
          "augmentation": check_augmentation, "architecture": check_architecture}  # one per kind of alexcli.specs

# Small settings for the built-in architectures' checks (a plugin architecture is checked at its
# own defaults unless its package says otherwise).
SMALL = {"alexnet": {"width": 0.125, "crop": 64}, "cifar-local": {"width": 0.25}}


def check_registered(kind: str, name: str) -> None:
    """The registered KIND/NAME loads (fits its contract on load) and passes its kind's check."""
    factory = plugins.get(kind, name)
    if kind == "architecture":
        check_architecture(factory, name, **SMALL.get(name, {}))
    else:
        CHECKS[kind](factory)


try:
    import pytest
except ImportError:  # pragma: no cover - the fixture is for test suites, which have pytest
    pytest = None

if pytest is not None:
    @pytest.fixture
    def registry(monkeypatch):
        """A fresh plugin registry that loads every installed package, whatever the caller's
        ALEXCLI_LOAD_PLUGINS; reset again afterwards."""
        monkeypatch.delenv(plugins.ENV_LOAD, raising=False)
        plugins.reset()
        yield plugins
        plugins.reset()
