"""Tests for the alexcli-cutout plugin. Run from the repository root:
    .venv/bin/python -m pytest -q plugins/
The package must be installed (`pip install -e plugins/alexcli-cutout`) so that its entry point
is visible to alexcli's registry."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

try:
    DIST = md.distribution("alexcli-cutout")
except md.PackageNotFoundError:
    pytest.skip("alexcli-cutout is not installed: pip install -e plugins/alexcli-cutout",
                allow_module_level=True)

import alexcli_cutout
from alexcli import transforms
from alexcli.specs import AugmentContext
from alexcli.testing import check_augmentation, context, registry  # noqa: F401  (registry is a pytest fixture)

CROP = 32


def test_fits_the_augmentation_contract():
    check_augmentation(alexcli_cutout.cutout, context(crop=CROP, full=40))


def images(n: int = 16, side: int = CROP, seed: int = 0) -> torch.Tensor:
    """Values in [1, 2): no pixel is 0 before cutout, so every 0 afterwards is the patch."""
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed)) + 1.0


def reference(x: torch.Tensor, seed: int, side: int) -> torch.Tensor:
    """The plain per-image loop: centres drawn as documented (rows, then columns, uniform over the
    image from the CPU generator), each square clipped at the borders by slicing."""
    n, _, h, w = x.shape
    gen = torch.Generator().manual_seed(seed)
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    out = x.clone()
    for i in range(n):
        y0, x0 = int(cy[i]) - side // 2, int(cx[i]) - side // 2
        out[i, :, max(0, y0):min(h, y0 + side), max(0, x0):min(w, x0 + side)] = 0.0
    return out


def run(x: torch.Tensor, seed: int, ctx: AugmentContext | None = None) -> torch.Tensor:
    return alexcli_cutout.cutout(ctx or context())(x, torch.Generator().manual_seed(seed))


def test_exactly_the_expected_squares_are_zeroed():
    x = images(64)
    for seed in range(5):
        got = run(x, seed)
        torch.testing.assert_close(got, reference(x, seed, CROP // 2), rtol=0, atol=0)
        # Away from the patch nothing changes; the patch is all channels of one clipped square.
        zero = got == 0
        assert torch.equal(got[~zero], x[~zero])
        assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
        area = zero[:, 0].sum((1, 2))
        assert (area > 0).all() and (area <= (CROP // 2) ** 2).all()
    # With 64 uniform centres some squares are clipped at a border and some are whole.
    area = (run(x, 0) == 0)[:, 0].sum((1, 2))
    assert (area == (CROP // 2) ** 2).any() and (area < (CROP // 2) ** 2).any()


def test_square_clipped_at_corners_and_odd_sides():
    x = torch.ones(3, 2, 9, 7)
    cy, cx = torch.tensor([0, 8, 4]), torch.tensor([0, 6, 3])
    got = alexcli_cutout.cutout_at(x, cy, cx, side=5)  # rows/cols [c - 2, c + 3)
    expected = x.clone()
    expected[0, :, 0:3, 0:3] = 0
    expected[1, :, 6:9, 4:7] = 0
    expected[2, :, 2:7, 1:6] = 0
    assert torch.equal(got, expected)
    assert torch.equal(x, torch.ones(3, 2, 9, 7))  # the input is not modified


def test_patch_side_is_half_the_crop():
    x = torch.ones(200, 3, 64, 64)
    area = (run(x, 3, context(crop=48)) == 0)[:, 0].sum((1, 2))
    assert int(area.max()) == 24 * 24  # crop 48 -> side 24, even on a 64x64 image
    with pytest.raises(ValueError):
        alexcli_cutout.cutout_with(0)


def test_same_seed_same_output_different_seed_different():
    x = images()
    assert torch.equal(run(x, 7), run(x, 7))
    assert not torch.equal(run(x, 7), run(x, 8))
    # The generator advances, so two passes over the same batch cut different squares.
    gen = torch.Generator().manual_seed(7)
    aug = alexcli_cutout.cutout(context())
    assert not torch.equal(aug(x, gen), aug(x, gen))


def test_shape_dtype_and_device_preserved_on_cpu():
    for x in (images(5, side=CROP), images(1, side=57), torch.rand(4, 3, 20, 33) + 1):
        y = run(x, 0)
        assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    x = images(4).to(torch.float64)
    assert run(x, 0).dtype == torch.float64


def test_works_without_cuda(monkeypatch):
    """CPU tensors and a CPU generator need no CUDA: make any CUDA call fail and run it."""
    def no_cuda(*_a, **_k):
        raise AssertionError("cutout touched CUDA on a CPU batch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    x = images(8)
    torch.testing.assert_close(run(x, 1), reference(x, 1, CROP // 2), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_batch_cuts_the_same_squares_as_cpu():
    x = images(32)
    torch.testing.assert_close(run(x.cuda(), 4).cpu(), run(x, 4), rtol=0, atol=0)



def test_registry_finds_it_and_the_pipeline_runs_it(registry):
    info = registry.info("augmentation", "cutout")
    assert info.package == "alexcli-cutout" and info.version == DIST.version and not info.builtin
    assert registry.get("augmentation", "cutout") is alexcli_cutout.cutout
    names = transforms.parse("mean,crop,flip,pca,cutout")
    ctx = context(crop=CROP, full=40)
    pipeline, used = transforms.build(names, ctx)
    assert used["cutout"] == {"name": "cutout", "package": "alexcli-cutout", "version": DIST.version}
    assert used["mean"]["package"] == "alexcli"
    x = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    y = pipeline(x, torch.Generator().manual_seed(0))
    assert y.shape == (6, 3, CROP, CROP) and torch.isfinite(y).all()
    assert ((y == 0).all(1).sum((1, 2)) > 0).all()  # every image has its patch (all channels 0)
    assert torch.equal(y, pipeline(x, torch.Generator().manual_seed(0)))
