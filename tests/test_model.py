"""The 2012 network: parameter counts, every intermediate shape, variants, initialisation."""

import pytest
import torch

from alexcli.errors import UsageError
from alexcli.model.registry import Arch, build_model, count_parameters, shapes, with_layers


def conv(cin, cout, k, groups=1):
    return cin // groups * cout * k * k + cout


def fc(n_in, n_out):
    return n_in * n_out + n_out


def expected_params(classes=1000, groups=2, side=6):
    """The table of section 3.5 (docs/design.md), computed from the layer sizes."""
    return (conv(3, 96, 11) + conv(96, 256, 5, groups) + conv(256, 384, 3) + conv(384, 384, 3, groups)
            + conv(384, 256, 3, groups) + fc(256 * side * side, 4096) + fc(4096, 4096) + fc(4096, classes))


def test_paper_network_has_60965224_parameters():
    model, _ = build_model(Arch())
    assert count_parameters(model) == 60_965_224 == expected_params()
    per_layer = {name: sum(p.numel() for p in getattr(model, name).parameters())
                 for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")}
    assert per_layer == {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936,
                         "conv5": 442_624, "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}


@pytest.mark.parametrize("crop", [224, 227])
def test_every_intermediate_shape(crop):
    model, _ = build_model(Arch(crop=crop))
    assert shapes(model, batch=2) == {
        "conv1": (2, 96, 55, 55), "pool1": (2, 96, 27, 27), "conv2": (2, 256, 27, 27), "pool2": (2, 256, 13, 13),
        "conv3": (2, 384, 13, 13), "conv4": (2, 384, 13, 13), "conv5": (2, 256, 13, 13), "pool5": (2, 256, 6, 6),
        "fc6": (2, 4096), "fc7": (2, 4096), "fc8": (2, 1000)}
    assert model.conv1.padding == ((2, 2) if crop == 224 else (0, 0))


def test_one_column_and_class_count():
    model, _ = build_model(Arch(groups=1, num_classes=10))
    assert count_parameters(model) == expected_params(classes=10, groups=1)
    assert model.conv2.groups == model.conv4.groups == model.conv5.groups == 1


def test_width_keeps_the_structure():
    model, _ = build_model(Arch(width=0.25, crop=64, num_classes=8))
    assert [getattr(model, f"conv{i}").out_channels for i in range(1, 6)] == [24, 64, 96, 96, 64]
    assert model.conv2.groups == 2 and model.fc7.out_features == 1024
    assert shapes(model)["pool5"] == (1, 64, 1, 1)


def test_too_small_crop_is_a_clear_error():
    with pytest.raises(UsageError, match="--crop 48 is too small"):
        build_model(Arch(crop=48, width=0.25))


def test_lrn_runs_within_each_column():
    """Section 3.5: each GPU normalises its own maps, so channel 47's window does not reach 48."""
    model, _ = build_model(Arch())
    a = torch.rand(1, 96, 3, 3) * 40
    got = model.norm1(a)
    lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)
    torch.testing.assert_close(got, torch.cat([lrn(a[:, :48]), lrn(a[:, 48:])], 1))
    assert not torch.allclose(got, lrn(a))


@pytest.mark.parametrize("layers,attr,cls", [
    (["activation=tanh"], "act1", torch.nn.Tanh), (["act=tanh"], "act1", torch.nn.Tanh),  # act: the kept alias
    (["norm=none"], "norm1", torch.nn.Identity), (["pool=2x2"], "pool1", torch.nn.MaxPool2d)])
def test_layer_variants_by_name(layers, attr, cls):
    arch = with_layers(Arch(width=0.25, crop=64, num_classes=8), layers)
    model, used = build_model(arch)
    module = getattr(model, attr)
    inner = module.cols[0] if hasattr(module, "cols") else module
    assert isinstance(inner, cls)
    kind, name = layers[0].split("=")
    assert used[{"act": "activation"}.get(kind, kind)] == {"name": name, "package": "alexcli",
                                                             "version": used["activation"]["version"]}
    if layers == ["pool=2x2"]:
        assert model.pool1.kernel_size == 2 and model.pool1.stride == 2


def test_bad_layer_spec_and_unknown_name():
    from alexcli.errors import PluginError

    with pytest.raises(UsageError, match=r"^--layer 'norm': expected KIND=NAME with KIND one of activation, norm, "
                                         r"pool \(or act\)$"):
        with_layers(Arch(), ["norm"])
    with pytest.raises(PluginError, match="unknown norm 'nope'; available: .*lrn"):
        build_model(with_layers(Arch(), ["norm=nope"]))


def test_paper_init():
    torch.manual_seed(0)
    model, _ = build_model(Arch())
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(model, name)
        assert abs(layer.weight.std().item() - 0.01) < 0.0005, name
        assert abs(layer.weight.mean().item()) < 0.001, name
        want = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == want), name


def test_caffe_init():
    torch.manual_seed(0)
    model, _ = build_model(Arch(init="caffe"))
    assert abs(model.fc6.weight.std().item() - 0.005) < 0.0003
    assert abs(model.fc8.weight.std().item() - 0.01) < 0.0005
    assert torch.all(model.conv2.bias == 0.1) and torch.all(model.conv3.bias == 0)


def test_input_scale_multiplies_the_input_before_conv1():
    """input_scale=255 is the same network fed 255 times the input: the paper's raw pixel values.
    On such input LRN is no longer a constant factor, which is what the option is for."""
    torch.manual_seed(0)
    raw, _ = build_model(Arch(num_classes=10, width=0.125, crop=100, init="kaiming", input_scale=255.0))
    plain, _ = build_model(Arch(num_classes=10, width=0.125, crop=100, init="kaiming"))
    plain.load_state_dict(raw.state_dict())
    raw, plain = raw.double().eval(), plain.double().eval()
    x = torch.rand(2, 3, 100, 100, dtype=torch.float64) - 0.5
    torch.testing.assert_close(raw(x), plain(x * 255.0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(raw(x), plain(x) * 255.0)  # not homogeneous: LRN sees the scale
    with pytest.raises(UsageError, match="--input-scale must be in"):
        build_model(Arch(input_scale=0.0))


def test_old_checkpoint_arch_takes_the_architecture_default_scale():
    """Arch dicts written before input_scale existed: AlexNet's were trained at 1, the CIFAR net's
    at cuda-convnet's 255, so each missing field takes its architecture's default."""
    old_alexnet = {k: v for k, v in Arch().to_dict().items() if k != "input_scale"}
    assert Arch.from_dict(old_alexnet).input_scale == 1.0
    old_cifar = {k: v for k, v in Arch(name="cifar-local", crop=24).to_dict().items() if k != "input_scale"}
    assert Arch.from_dict(old_cifar).input_scale == 255.0 and Arch.from_dict(old_cifar).crop == 24
    assert Arch.from_dict({**old_cifar, "input_scale": 1.0}).input_scale == 1.0
    assert Arch.from_dict({"name": "not-installed"}).name == "not-installed"  # build_model names it
