"""Tests for the alexcli-batchnorm plugin. Run from the repository root:
    .venv/bin/python -m pytest -q plugins/
The package must be installed (`pip install -e plugins/alexcli-batchnorm`) so that its entry
point is visible to alexcli's registry."""

from __future__ import annotations

import importlib.metadata as md
import math

import pytest
import torch
from torch import nn

try:
    DIST = md.distribution("alexcli-batchnorm")
except md.PackageNotFoundError:
    pytest.skip("alexcli-batchnorm is not installed: pip install -e plugins/alexcli-batchnorm",
                allow_module_level=True)

import alexcli_batchnorm
from alexcli.model.registry import Arch, build_model
from alexcli.testing import check_norm, registry  # noqa: F401  (registry is a pytest fixture)

EPS = 1e-5  # BatchNorm2d's default


def test_fits_the_norm_contract():
    check_norm(alexcli_batchnorm.batchnorm)


def batch(seed: int = 0, n: int = 8, c: int = 6, side: int = 5) -> torch.Tensor:
    """Channels with very different means and scales, so normalising them is visible."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 20.0, c)[None, :, None, None]
    shift = torch.linspace(-30.0, 30.0, c)[None, :, None, None]
    return torch.randn(n, c, side, side, generator=g, dtype=torch.float64) * scale + shift


def manual(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), per channel, written out element by element."""
    out = torch.empty_like(x)
    for ch in range(x.shape[1]):
        out[:, ch] = (x[:, ch] - mean[ch]) / math.sqrt(var[ch] + EPS)
    return out


def test_factory_is_a_fresh_batchnorm_of_the_given_width():
    a, b = alexcli_batchnorm.batchnorm(48), alexcli_batchnorm.batchnorm(48)
    assert isinstance(a, nn.BatchNorm2d) and a.num_features == 48 and a is not b
    assert a.affine and a.track_running_stats


def test_train_mode_normalises_each_channel_with_the_batch_statistics():
    x = batch()
    bn = alexcli_batchnorm.batchnorm(x.shape[1]).double().train()
    y = bn(x)
    # Statistics over batch and space, computed by hand (biased variance, as the paper).
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.sum(1) / flat.shape[1]
    var = ((flat - mean[:, None]) ** 2).sum(1) / flat.shape[1]
    torch.testing.assert_close(y, manual(x, mean, var), rtol=1e-9, atol=1e-9)
    per_channel = y.transpose(0, 1).reshape(x.shape[1], -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(x.shape[1], dtype=x.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(per_channel.var(1, unbiased=False), torch.ones(x.shape[1], dtype=x.dtype),
                               rtol=0, atol=1e-4)  # 1 - eps/var: var >= 0.25 here
    # ... and the running averages move towards them (momentum 0.1, unbiased variance).
    unbiased = var * flat.shape[1] / (flat.shape[1] - 1)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * unbiased)


def test_eval_mode_uses_the_running_statistics_not_the_batch():
    bn = alexcli_batchnorm.batchnorm(6).double().train()
    for seed in range(5):
        bn(batch(seed))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():  # a learnt scale and shift, to see they are applied
        bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    bn.eval()
    x = batch(99)
    y = bn(x)
    expected = manual(x, rm, rv) * bn.weight.detach()[None, :, None, None] + bn.bias.detach()[None, :, None, None]
    torch.testing.assert_close(y, expected)
    # The same image gives the same output alone or in a batch, and eval leaves the averages alone.
    torch.testing.assert_close(bn(x[3:4]), y[3:4])
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)


def test_registry_finds_it_by_name_with_its_package(registry):
    info = registry.info("norm", "batchnorm")
    assert info.package == "alexcli-batchnorm" and info.version == DIST.version and not info.builtin
    assert info.target == "alexcli_batchnorm:batchnorm"
    assert registry.get("norm", "batchnorm") is alexcli_batchnorm.batchnorm
    assert "batchnorm" in registry.names("norm")


def test_alexnet_with_batchnorm_names_the_package_and_trains(registry):
    torch.manual_seed(0)
    model, used = build_model(Arch(num_classes=10, crop=64, width=0.25, norm="batchnorm"))
    assert used["norm"] == {"name": "batchnorm", "package": "alexcli-batchnorm", "version": DIST.version}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # After conv1 and conv2, one per column (groups=2): 24 and 64 channels at width 0.25 -> 12 and 32.
    assert [m.num_features for m in bns] == [12, 12, 32, 32]
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all() for m in bns)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_building_alexnet_leaves_batchnorm_statistics_fresh(registry):
    model, _ = build_model(Arch(num_classes=10, crop=64, width=0.25, norm="batchnorm"))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4  # norm1 and norm2, one per column each
    for m in bns:
        assert int(m.num_batches_tracked) == 0
        assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
        assert torch.equal(m.running_var, torch.ones_like(m.running_var))
