"""The 2012 network: parameter counts, every intermediate shape, variants, initialisation."""

import math

import pytest
import torch

from alexcli.errors import UsageError
from alexcli.model.registry import Arch, build_model, count_parameters, make_arch, shapes, with_layers


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


@pytest.mark.parametrize("name", ["alexnet", "owt"])
def test_too_small_crop_is_a_clear_error(name):
    with pytest.raises(UsageError, match="--crop 48 is too small for this network: the maps vanish before fc6"):
        build_model(make_arch(name, crop=48, width=0.25))


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


# The presets' numbers at the paper's size, written out from their sources: section 5 of the paper,
# cuda-convnet2's layers-imagenet-2gpu-model.cfg (initW, initB) and Caffe's bvlc_alexnet
# train_val.prototxt (weight_filler std, bias_filler value).
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
PRESET_TABLE = {
    "paper": {"conv1": (0.01, 0), "conv2": (0.01, 1), "conv3": (0.01, 0), "conv4": (0.01, 1), "conv5": (0.01, 1),
              "fc6": (0.01, 1), "fc7": (0.01, 1), "fc8": (0.01, 0)},
    "convnet2": {"conv1": (0.01, 0), "conv2": (0.01, 1), "conv3": (0.03, 0), "conv4": (0.03, 1), "conv5": (0.03, 1),
                 "fc6": (0.01, 1), "fc7": (0.01, 1), "fc8": (0.01, 0)},
    "caffe": {"conv1": (0.01, 0), "conv2": (0.01, 0.1), "conv3": (0.01, 0), "conv4": (0.01, 0.1),
              "conv5": (0.01, 0.1), "fc6": (0.005, 0.1), "fc7": (0.005, 0.1), "fc8": (0.01, 0)},
}


def assert_drawn_with(model, stds: dict, biases: dict, seed: int) -> None:
    """MODEL's weights are exactly N(0, stds[layer]) draws from SEED in layer order (replayed
    here), and its biases exactly BIASES: the std each layer was drawn with, not a sample estimate."""
    torch.manual_seed(seed)
    for name in LAYER_NAMES:
        layer = getattr(model, name)
        want = torch.empty_like(layer.weight).normal_(0.0, stds[name])
        assert torch.equal(layer.weight, want), f"{name}: not drawn with std {stds[name]}"
        assert torch.all(layer.bias == biases[name]), name


def reinit(model, preset: str, seed: int = 7):
    from alexcli.model.alexnet import init_weights

    torch.manual_seed(seed)
    with torch.no_grad():
        init_weights(model, preset)
    return model


@pytest.mark.parametrize("preset", sorted(PRESET_TABLE))
def test_presets_at_the_papers_size_are_their_sources_numbers_exactly(preset):
    model, _ = build_model(Arch(init=preset))
    table = PRESET_TABLE[preset]
    assert_drawn_with(reinit(model, preset), {n: sd for n, (sd, _) in table.items()},
                      {n: b for n, (_, b) in table.items()}, seed=7)
    assert abs(model.conv3.weight.std().item() - table["conv3"][0]) < 0.02 * table["conv3"][0]  # and they look it


def test_kaiming_draws_each_layer_from_its_own_fan_in():
    model, _ = build_model(Arch(num_classes=10, width=0.25, crop=64, init="kaiming"))
    fan_in = {"conv1": 363, "conv2": 12 * 25, "conv3": 64 * 9, "conv4": 48 * 9, "conv5": 48 * 9, "fc6": 64,
              "fc7": 1024, "fc8": 1024}  # width 0.25: 24-64-96-96-64 conv, fc 1024; pool5 1x1 at crop 64
    assert_drawn_with(reinit(model, "kaiming"), {n: math.sqrt(2 / f) for n, f in fan_in.items()},
                      dict.fromkeys(LAYER_NAMES, 0.0), seed=7)


@pytest.mark.parametrize("fields, factor", [
    # width 0.5: every fan-in but conv1's (3 x 11 x 11) halves, so those stds grow by sqrt(2)
    ({"width": 0.5}, {n: math.sqrt(2) for n in LAYER_NAMES if n != "conv1"}),
    # crop 64: pool5 is 1x1 instead of 6x6, so fc6 sees 256 inputs instead of 9,216
    ({"crop": 64}, {"fc6": 6.0}),
    # one column: conv2, conv4 and conv5 see both columns' maps, twice the fan-in
    ({"groups": 1}, {n: 1 / math.sqrt(2) for n in ("conv2", "conv4", "conv5")}),
])
@pytest.mark.parametrize("preset", sorted(PRESET_TABLE))
def test_presets_scale_with_the_fan_in(preset, fields, factor):
    """Away from the paper's size each std is the preset's times sqrt(paper fan-in / fan-in)."""
    model, _ = build_model(Arch(num_classes=10, **fields, init=preset))
    table = PRESET_TABLE[preset]
    assert_drawn_with(reinit(model, preset), {n: sd * factor.get(n, 1.0) for n, (sd, _) in table.items()},
                      {n: b for n, (_, b) in table.items()}, seed=7)


def activation_stds(width: float, preset: str, scale: float, seeds) -> dict[str, float]:
    """Each layer's output std in the first forward pass (eval mode, the same input batch),
    as the root mean square over initialisation SEEDS (one narrow net's draw varies by ~20%)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 128, 128, generator=g) - 0.5  # zero-mean pixels, as after the mean image
    var = dict.fromkeys(LAYER_NAMES, 0.0)
    for seed in seeds:
        torch.manual_seed(seed)
        model, _ = build_model(Arch(num_classes=1000, width=width, crop=128, init=preset, input_scale=scale))
        got = {}
        hooks = [getattr(model, n).register_forward_hook(lambda _m, _i, y, n=n: got.__setitem__(n, y.var().item()))
                 for n in LAYER_NAMES]
        with torch.no_grad():
            model.eval()(x)
        for h in hooks:
            h.remove()
        for n in LAYER_NAMES:
            var[n] += got[n] / len(seeds)
    return {n: math.sqrt(v) for n, v in var.items()}


@pytest.mark.parametrize("preset, scale", [("paper", 1.0), ("paper", 255.0), ("convnet2", 255.0), ("caffe", 1.0)])
def test_quarter_width_starts_with_the_full_width_activation_statistics(preset, scale):
    full = activation_stds(1.0, preset, scale, seeds=range(3))
    quarter = activation_stds(0.25, preset, scale, seeds=range(10, 34))
    ratio = {n: quarter[n] / full[n] for n in LAYER_NAMES}
    assert all(0.9 <= r <= 1.1 for r in ratio.values()), ratio


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


def test_each_preset_brings_the_input_scale_its_source_fed():
    """AlexNet's default is convnet2 at the paper's 0..255 scale; the paper's and Caffe's presets
    come at 255 too, He's at 1; --input-scale given explicitly wins."""
    from alexcli.model.registry import make_arch

    default = make_arch("alexnet")
    assert (default.init, default.input_scale) == ("convnet2", 255.0)
    assert {p: make_arch("alexnet", init=p).input_scale for p in ("paper", "convnet2", "caffe", "kaiming")} == {
        "paper": 255.0, "convnet2": 255.0, "caffe": 255.0, "kaiming": 1.0}
    assert make_arch("alexnet", init="kaiming", input_scale=255.0).input_scale == 255.0
    assert make_arch("alexnet", init="paper", input_scale=None).input_scale == 255.0  # None: not given
    assert make_arch("cifar-local", init="kaiming").input_scale == 255.0  # its own default; no init_fields


def test_old_checkpoint_arch_takes_the_architecture_default_scale():
    """Arch dicts written before input_scale existed: AlexNet's were trained at 1 (its default is
    255 now), the CIFAR net's at cuda-convnet's 255, so a missing field takes the value it had."""
    old_alexnet = {k: v for k, v in Arch().to_dict().items() if k != "input_scale"}
    assert Arch.from_dict(old_alexnet).input_scale == 1.0
    old_cifar = {k: v for k, v in Arch(name="cifar-local", crop=24).to_dict().items() if k != "input_scale"}
    assert Arch.from_dict(old_cifar).input_scale == 255.0 and Arch.from_dict(old_cifar).crop == 24
    assert Arch.from_dict({**old_cifar, "input_scale": 1.0}).input_scale == 1.0
    assert Arch.from_dict({"name": "not-installed"}).name == "not-installed"  # build_model names it
