"""The two-column split (section 3.2) computes what the one-device model computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexcli.errors import UsageError
from alexcli.model.alexnet import AlexNet
from alexcli.model.columns import ColumnAlexNet
from alexcli.model.registry import Arch, build_model, count_parameters

CPU2 = [torch.device("cpu")] * 2
CROP = 100  # pool5 maps are 2x2, so fc6's input order (channel-major flatten) matters
TOL = dict(rtol=1e-5, atol=1e-9)  # double precision: far tighter in practice


def small(seed=0, norm="lrn", **kw) -> AlexNet:
    """A narrow network in double precision. `norm="batchnorm"` plugs in nn.BatchNorm2d, a norm
    with parameters and running statistics, given to build_model as a class, as a plugin's would be."""
    torch.manual_seed(seed)
    arch = Arch(num_classes=10, crop=CROP, width=0.125, init="kaiming",
                norm="none" if norm == "batchnorm" else norm, **kw)
    model, _ = build_model(arch, layers={"norm": nn.BatchNorm2d} if norm == "batchnorm" else None)
    return model.double()


def batch(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, CROP, CROP, generator=g, dtype=torch.float64) * 30  # large, so LRN acts
    return x, torch.randint(0, 10, (n,), generator=g)


def step(model: nn.Module, x, y) -> torch.Tensor:
    model.zero_grad()
    out = model(x)
    F.cross_entropy(out, y.to(out.device)).backward()
    return out


def assert_same(merged: dict, ref: dict):
    assert sorted(merged) == sorted(ref)
    for name in ref:
        torch.testing.assert_close(merged[name].cpu(), ref[name].cpu(), **TOL, msg=name)


VARIANTS = [dict(norm="lrn"), dict(norm="lrn-convnet", conv6=True), dict(norm="none", pool="2x2"),
            dict(norm="batchnorm"), dict(norm="lrn", input_scale=255.0)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_outputs_gradients_and_a_step_equal_the_one_device_model(variant):
    model = small(dropout=0.0, **variant).train()  # dropout 0: the two RNG streams differ
    col = ColumnAlexNet(model, CPU2)
    assert col.training
    x, y = batch()
    torch.testing.assert_close(step(col, x, y), step(model, x, y), **TOL)
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    assert_same(col.merged_grads(), ref_grads)
    # the optimizer runs on the columns' own parameters
    for m in (model, col):
        torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4).step()
    assert_same(col.merged_state_dict(), model.state_dict())  # BN's running stats included


@pytest.mark.parametrize("variant", VARIANTS[:2], ids=lambda v: v["norm"])
def test_eval_outputs_and_features_equal_with_dropout(variant):
    model = small(**variant).eval()  # dropout 0.5, inactive in eval
    col = ColumnAlexNet(model, CPU2)
    x, _ = batch(n=3)
    with torch.no_grad():
        torch.testing.assert_close(col(x), model(x), **TOL)
        torch.testing.assert_close(col.features(x), model.features(x), **TOL)


def test_lrn_runs_within_each_column():
    model = small(norm="lrn")
    col = ColumnAlexNet(model, CPU2)
    x, _ = batch()
    with torch.no_grad():
        a = model.act1(model.conv1(x))
        within = model.norm1(a)
        across = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(a)
        # the inputs are large enough that a window crossing the column boundary would differ
        assert not torch.allclose(within, across, rtol=1e-3)
        for k, c in enumerate(col.columns):
            torch.testing.assert_close(c.norm1(c.act1(c.conv1(x))), within.chunk(2, dim=1)[k], **TOL)


def test_dropout_acts_per_unit_before_the_crossing():
    """Both fc7 halves see the same dropped fc6 units, scaled by 1/(1-p) like nn.Dropout."""
    col = ColumnAlexNet(small(dropout=0.5), CPU2)
    x, _ = batch()
    seen = []
    for c in col.columns:
        c.fc7.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].clone()))
    with torch.no_grad():
        col.eval()(x)
        col.train()(x)
    clean, left, right = seen[0], seen[2], seen[3]
    assert torch.equal(left, right)
    kept = left != 0
    torch.testing.assert_close(left[kept], 2 * clean[kept])
    dropped = (~kept & (clean != 0)).sum() / (clean != 0).sum()
    assert 0.4 < dropped < 0.6


def test_full_size_structure():
    """The paper's network at width 1, 1000 classes, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        model, _ = build_model(Arch())
    col = ColumnAlexNet(model, [torch.device("meta")] * 2)
    assert count_parameters(col) == count_parameters(model) == 60_965_224
    halves = {"conv1": (48, 3, 11, 11), "conv2": (128, 48, 5, 5), "conv3": (192, 256, 3, 3),
              "conv4": (192, 192, 3, 3), "conv5": (128, 192, 3, 3), "fc6": (2048, 6 * 6 * 256),
              "fc7": (2048, 4096)}
    for c in col.columns:
        assert {name: tuple(getattr(c, name).weight.shape) for name in halves} == halves
    assert tuple(col.fc8.weight.shape) == (1000, 4096)
    seen = {}
    for k, c in enumerate(col.columns):
        for name in ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5", "fc6", "fc7"):
            getattr(c, name).register_forward_hook(
                lambda _m, _i, out, key=(k, name): seen.__setitem__(key, tuple(out.shape)))
    assert tuple(col(torch.zeros(2, 3, 224, 224, device="meta")).shape) == (2, 1000)
    per_column = {"conv1": (2, 48, 55, 55), "pool1": (2, 48, 27, 27), "conv2": (2, 128, 27, 27),
                  "pool2": (2, 128, 13, 13), "conv3": (2, 192, 13, 13), "conv4": (2, 192, 13, 13),
                  "conv5": (2, 128, 13, 13), "pool5": (2, 128, 6, 6), "fc6": (2, 2048), "fc7": (2, 2048)}
    assert seen == {(k, name): shape for k in (0, 1) for name, shape in per_column.items()}
    merged = col.merged_state_dict()
    assert {n: t.shape for n, t in merged.items()} == {n: t.shape for n, t in model.state_dict().items()}


def test_state_dict_round_trip_is_exact():
    model = small(norm="lrn", conv6=True)
    col = ColumnAlexNet(model, CPU2)
    for ref in (model.state_dict(), small(seed=7, norm="lrn", conv6=True).state_dict()):
        col.load_merged_state_dict(ref)
        merged = col.merged_state_dict()
        assert sorted(merged) == sorted(ref)
        for name in ref:
            assert merged[name].dtype == ref[name].dtype and torch.equal(merged[name], ref[name]), name
    # the columns own their weights: training them leaves the source model alone
    before = model.conv1.weight.clone()
    with torch.no_grad():
        col.columns[0].conv1.weight.zero_()
    assert torch.equal(model.conv1.weight, before)


def test_bad_input_is_a_one_line_usage_error():
    cases = [(small(groups=1), CPU2), (small(), CPU2 + CPU2[:1]), (small(), CPU2[:1])]
    torch.manual_seed(0)
    arch = Arch(num_classes=10, crop=CROP, width=0.125)
    cases.append((build_model(arch, layers={"activation": nn.PReLU})[0], CPU2))  # one slope for both columns
    for model, devices in cases:
        with pytest.raises(UsageError) as err:
            ColumnAlexNet(model, devices)
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError):
        ColumnAlexNet(small(), CPU2).load_merged_state_dict({"conv9.weight": torch.zeros(2)})
    # Caffe's LRN runs across both columns' maps: no device holds them both
    with pytest.raises(UsageError, match=r"^--parallel columns cannot split norm1 \(LRNAcrossColumns\): it "
                                         r"normalises across both columns' maps"):
        ColumnAlexNet(small(norm="lrn-caffe"), CPU2)


def test_caffe_lrn_window_crosses_the_columns():
    """bvlc_alexnet's LRN has no groups: in the two-column net its window crosses from column 0's
    maps into column 1's, where the paper's stays inside a column (test_lrn_runs_within_each_column)."""
    from alexcli.model.layers import LRN, lrn_caffe

    x = torch.rand(2, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 30
    whole = LRN(5, 1e-4 / 5, 0.75, 1.0)(x)
    torch.testing.assert_close(lrn_caffe(4).forward_grouped(x, 2), whole)
    assert not torch.allclose(LRN(5, 1e-4 / 5, 0.75, 1.0).forward_grouped(x, 2), whole)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_both_columns_on_one_device_train_as_the_one_device_model(device):
    """`--column-devices cuda:0,cuda:0`: both columns on one GPU (what a one-GPU machine can check of
    the split's CUDA code) give the one-device model's weights after each of five SGD steps with
    momentum, in fp32 as training runs (TF32 off: its 10-bit mantissa alone would part the two
    layouts' sums by 1e-3). After each step the column model takes the one-device model's weights
    again: left to drift, fp32 differences of 1e-7 grow into a ReLU or max-pool choice that flips
    and parts the weights by 3e-3 within five steps on some CPUs (seen on an AVX2-only EPYC;
    with the weights shared, each step measured 8e-7 of each tensor's largest value there)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _train_both_ways(device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _train_both_ways(device):
    model = small(dropout=0.0).float().to(device).train()
    col = ColumnAlexNet(small(dropout=0.0).float(), [device, device])
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for m in (model, col)]
    for k in range(5):
        x, y = batch(seed=k + 1)
        x = (x / 30).float().to(device)  # unit scale: batch()'s x30 makes five steps at lr 0.01 diverge
        for m, opt in zip((model, col), opts):
            step(m, x, y.to(device))
            opt.step()
        merged = col.merged_state_dict()
        for name, ref in model.state_dict().items():
            torch.testing.assert_close(merged[name].cpu(), ref.cpu(), rtol=1e-4, atol=1e-5, msg=f"step {k + 1}: {name}")
        col.load_merged_state_dict(model.state_dict())  # the same weights again (the momentum is each one's own)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_columns_on_two_real_devices():
    """Each column on its own device (two GPUs, or a GPU and the CPU): any tensor crossing
    outside conv3 and the FC layers would raise a device mismatch."""
    devices = [torch.device("cuda:0"), torch.device("cuda:1" if torch.cuda.device_count() > 1 else "cpu")]
    model = small(dropout=0.0)
    col = ColumnAlexNet(model, devices)
    for k, c in enumerate(col.columns):
        assert all(p.device == devices[k] for p in c.parameters())
    assert col.fc8.weight.device == devices[0]
    x, y = batch()
    out = step(col, x.to(devices[0]), y)
    assert out.device == devices[0]
    torch.testing.assert_close(out.cpu(), step(model, x, y), **TOL)
    assert_same(col.merged_grads(), {n: p.grad for n, p in model.named_parameters()})
