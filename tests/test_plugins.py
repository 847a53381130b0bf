import json
import sys

import pytest

from alexcli import plugins as reg
from alexcli.errors import PluginError
from conftest import run_cli


def install_fake(site, dist, version, entries, modules=None):
    """Make `dist` look installed to importlib.metadata: a dist-info folder on a sys.path entry."""
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


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    reg.reset()
    yield site
    reg.reset()


def test_builtins_are_registered_through_entry_points():
    reg.reset()
    got = {(p.kind, p.name): p for p in reg.discover()}
    for key in [("activation", "relu"), ("activation", "tanh"), ("norm", "lrn"), ("norm", "lrn-convnet"),
                ("norm", "none"), ("pool", "overlap"), ("pool", "2x2")]:
        assert got[key].package == "alexcli" and got[key].builtin
    assert callable(reg.get("norm", "lrn"))


def test_unknown_name_lists_the_available_ones():
    reg.reset()
    with pytest.raises(PluginError, match=r"unknown norm 'bn'; available: .*lrn, lrn-convnet, none"):
        reg.info("norm", "bn")


def test_broken_plugin_is_reported_and_the_rest_works(site):
    install_fake(site, "alexcli-broken", "0.3", {"alexcli.layers.norm": {"broken": "broken_mod:factory"}},
                 {"broken_mod": "raise RuntimeError('boom at import')\n"})
    names = [p.name for p in reg.discover("norm")]
    assert "broken" in names  # listed from metadata, not imported
    with pytest.raises(PluginError, match=r"norm 'broken' from package alexcli-broken 0.3 failed to load: "
                                          r"RuntimeError: boom at import"):
        reg.get("norm", "broken")
    assert reg.get("norm", "lrn") is not None
    errors = {p.name: e for p, e in reg.check_all()}
    assert errors["lrn"] is None and "boom at import" in errors["broken"]


def test_two_packages_claiming_a_name_is_an_error_naming_both(site):
    for dist in ("alexcli-bn-a", "alexcli-bn-b"):
        install_fake(site, dist, "1.0", {"alexcli.layers.norm": {"bn": "x:y"}})
    with pytest.raises(PluginError, match=r"norm 'bn' is registered by more than one package: "
                                          r"alexcli-bn-[ab] 1.0 \(x:y\) and alexcli-bn-[ab] 1.0 \(x:y\)"):
        reg.get("norm", "bn")
    assert [c[0].name for c in reg.conflicts()] == ["bn"]


def test_env_var_chooses_which_packages_load(site, monkeypatch):
    install_fake(site, "alexcli-extra", "1.0", {"alexcli.layers.activation": {"gelu": "m:f"}})
    assert "gelu" in reg.names("activation")
    monkeypatch.setenv("ALEXCLI_LOAD_PLUGINS", "")
    reg.reset()
    assert "gelu" not in reg.names("activation") and "relu" in reg.names("activation")
    monkeypatch.setenv("ALEXCLI_LOAD_PLUGINS", "alexcli_extra")
    reg.reset()
    assert "gelu" in reg.names("activation")


def test_cli_plugins_with_a_broken_plugin_installed(tmp_path, demo_src):
    site = tmp_path / "site"
    install_fake(site, "alexcli-broken", "0.3", {"alexcli.augmentations": {"explode": "broken_mod:factory"}},
                 {"broken_mod": "raise ImportError('needs a GPU library')\n"})
    env = {"PYTHONPATH": str(site)}
    listed = run_cli("plugins", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)["plugins"]}
    assert rows["explode"]["package"] == "alexcli-broken" and rows["relu"]["package"] == "alexcli"
    checked = run_cli("plugins", "--check", env=env, cwd=tmp_path)
    assert checked.returncode == 1
    assert "alexcli-broken" in checked.stdout
    assert ("augmentation explode: error: augmentation 'explode' from package alexcli-broken 0.3 failed to load: "
            "ImportError: needs a GPU library") in checked.stderr
    # Commands that don't use it keep working.
    prep = run_cli("prepare", demo_src, "--out", tmp_path / "o", "--size", 16, "--workers", 1, env=env, cwd=tmp_path)
    assert prep.returncode == 0, prep.stderr
    assert run_cli("--help", env=env, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("kind,source,problem", [
    ("norm", "factory = 3\n", "int is not callable"),
    ("norm", "def factory():\n    pass\n", "must take 1 positional argument(s) (factory(channels))"),
    ("activation", "def factory(channels):\n    pass\n", "must take 0 positional argument(s) (factory())"),
    ("architecture", "def factory(arch, layers):\n    pass\n", "lacks the attribute 'defaults'"),
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {'depth': 9}\nfactory.inits = ('x',)\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\n", "'defaults' name fields Arch does not have: depth"),
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {}\nfactory.inits = ()\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\n", "'inits' must name at least one --init preset"),
])
def test_a_plugin_that_does_not_fit_its_contract_is_refused_naming_the_package(site, kind, source, problem,
                                                                              monkeypatch):
    from alexcli.specs import GROUPS

    monkeypatch.delitem(sys.modules, "misfit_mod", raising=False)  # each case imports its own version
    install_fake(site, "alexcli-misfit", "0.1", {GROUPS[kind]: {"misfit": "misfit_mod:factory"}},
                 {"misfit_mod": source})
    with pytest.raises(PluginError) as err:
        reg.get(kind, "misfit")
    assert str(err.value).startswith(f"{kind} 'misfit' from package alexcli-misfit 0.1 (misfit_mod:factory) does not "
                                     f"fit the {kind} contract: ")
    assert problem in str(err.value) and "\n" not in str(err.value)
    errors = {p.name: e for p, e in reg.check_all()}
    assert problem in errors["misfit"] and errors["relu"] is None


def test_a_factory_may_be_given_as_a_class_or_by_name():
    from torch import nn

    from alexcli.model.registry import Arch, build_model

    model, used = build_model(Arch(num_classes=4, width=0.125, crop=64), layers={"norm": nn.BatchNorm2d})
    assert isinstance(model.norm1.cols[0], nn.BatchNorm2d) and model.norm1.cols[0].num_features == 6
    assert "norm" not in used  # no registered variant to record: the checkpoint cannot name a package for it
    assert reg.resolve("norm", "lrn") is reg.get("norm", "lrn")
    def no_channels():
        return nn.Identity()

    with pytest.raises(PluginError, match=r"norm 'no_channels' does not fit the norm contract: it must take 1"):
        reg.resolve("norm", no_channels)
