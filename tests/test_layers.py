"""Every registered layer variant through the same checks (as timm does over list_models())."""

import pytest
import torch

from alexcli import plugins as reg


def lrn_loop(a, n, alpha, beta, k):
    """Section 3.3 written as the formula: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    N = a.shape[1]
    out = torch.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = sum(a[:, j] ** 2 for j in range(lo, hi + 1))
        out[:, i] = a[:, i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("name,alpha", [("lrn", 1e-4), ("lrn-convnet", 1e-4 / 5)])
def test_lrn_variants_equal_the_formula(name, alpha):
    torch.manual_seed(0)
    a = torch.rand(2, 12, 5, 5, dtype=torch.float64) * 30  # large activations so alpha matters
    got = reg.get("norm", name)(12).double()(a)
    torch.testing.assert_close(got, lrn_loop(a, 5, alpha, 0.75, 2.0), rtol=1e-12, atol=1e-12)
    # and the two really differ
    assert not torch.allclose(got, lrn_loop(a, 5, 1e-4 * (5 if name == "lrn-convnet" else 1 / 5), 0.75, 2.0))


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradient_equals_autograd_of_the_formula(groups):
    """The built-in LRN's hand-written CPU backward against autograd through the plain formula."""
    from alexcli.model.layers import lrn_paper

    torch.manual_seed(0)
    a = (torch.rand(2, 12, 4, 4, dtype=torch.float64) * 30).requires_grad_()
    g = torch.randn(2, 12, 4, 4, dtype=torch.float64)
    got = torch.autograd.grad(lrn_paper(12).forward_grouped(a, groups), a, g)[0]
    want = torch.autograd.grad(torch.cat([lrn_loop(part, 5, 1e-4, 0.75, 2.0) for part in a.chunk(groups, 1)], 1),
                               a, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: lrn_paper(12).forward_grouped(t, groups), (a.detach()[:1, :, :2, :2]
                                                                                       .clone().requires_grad_(),))


def test_pools_give_the_paper_sizes():
    x = torch.randn(1, 4, 55, 55)
    assert reg.get("pool", "overlap")()(x).shape[-1] == 27
    assert reg.get("pool", "2x2")()(x).shape[-1] == 27


def test_max_pool_without_gradients_gives_the_same_maxima_faster_layout():
    """Without gradients on the CPU the pool runs in channels-last layout (torch's NCHW max pool is
    the slowest op of a CPU forward pass): the same values, handed back in the usual layout; with
    gradients it is nn.MaxPool2d itself, so ties route the gradient as before."""
    from alexcli.model.layers import pool_2x2, pool_overlapping

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(4, 16, 27, 27, generator=g))  # ReLU: many tied zeros
    for make, (k, s) in ((pool_overlapping, (3, 2)), (pool_2x2, (2, 2))):
        pool = make()
        with torch.no_grad():
            y = pool(x)
        assert torch.equal(y, torch.nn.functional.max_pool2d(x, k, s)) and y.is_contiguous()
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        pool(a).sum().backward()
        torch.nn.functional.max_pool2d(b, k, s).sum().backward()
        assert torch.equal(a.grad, b.grad)
