"""Batch augmentations (section 4.1) against per-image references, and every registered one."""

import pytest
import torch

from alexcli import transforms as aug
from alexcli.errors import UsageError


def ctx(size=12, crop=8):
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    return aug.AugmentContext(crop=crop, mean_image=torch.rand(3, size, size, generator=g),
                              eigval=torch.tensor([0.2, 0.02, 0.004]), eigvec=q)


def batch(n=6, size=12, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_crop_equals_slicing_at_the_drawn_offsets():
    x, c = batch(), ctx()
    got = aug.crop(c)(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    for i in range(6):
        assert torch.equal(got[i], x[i, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8])
    assert len({(int(a), int(b)) for a, b in zip(oy, ox)}) > 1  # offsets really vary per image


def test_flip_reflects_about_half():
    x = batch(n=200)
    got = aug.flip(ctx())(x, torch.Generator().manual_seed(2))
    flipped = [torch.equal(got[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(got[i], x[i]) for i in range(200)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 70 < sum(flipped) < 130


def test_pca_noise_is_the_papers_formula():
    x, c = batch(), ctx()
    got = aug.pca(c)(x, torch.Generator().manual_seed(3))
    alpha = torch.randn(6, 3, generator=torch.Generator().manual_seed(3)) * 0.1
    for i in range(6):
        shift = c.eigvec @ (alpha[i] * c.eigval)  # [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T
        torch.testing.assert_close(got[i], x[i] + shift[:, None, None])


def test_mean_subtraction_and_its_order():
    x, c = batch(), ctx()
    torch.testing.assert_close(aug.mean(c)(x, None), x - c.mean_image)
    with pytest.raises(UsageError, match="put it before 'crop'"):
        aug.mean(c)(x[..., :8, :8], None)


def test_pipeline_follows_the_seed():
    pipeline, used = aug.build(aug.parse("mean,crop,flip,pca"), ctx())
    a = pipeline(batch(), torch.Generator().manual_seed(7))
    b = pipeline(batch(), torch.Generator().manual_seed(7))
    c = pipeline(batch(), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (6, 3, 8, 8)
    assert list(used) == ["mean", "crop", "flip", "pca"] and used["pca"]["package"] == "alexcli"


def test_ten_crops_are_the_corners_centre_and_reflections():
    x = batch(n=2, size=10)
    t = aug.ten_crops(x, 6)
    assert t.shape == (2, 10, 3, 6, 6)
    assert torch.equal(t[:, 0], x[..., :6, :6]) and torch.equal(t[:, 3], x[..., 4:, 4:])
    assert torch.equal(t[:, 4], x[..., 2:8, 2:8])
    for k in range(5):
        assert torch.equal(t[:, k + 5], t[:, k].flip(-1))


def test_unknown_augmentation_lists_the_available():
    from alexcli.errors import PluginError

    with pytest.raises(PluginError, match="unknown augmentation 'nope'; available: .*crop"):
        aug.parse("mean,nope")


def test_augment_list_empty_is_none_and_an_empty_entry_is_an_error():
    from alexcli.errors import UsageError

    assert aug.parse("") == [] and aug.parse(" mean , flip ") == ["mean", "flip"]
    with pytest.raises(UsageError, match=r"^--augment 'mean,,flip': an empty entry between commas; expected "):
        aug.parse("mean,,flip")
    with pytest.raises(UsageError, match=r"^--augment mean,mean: mean given more than once$"):
        aug.parse("mean,mean")
