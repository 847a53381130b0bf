import json
import sys

import pytest

from alexcli import plugins as reg
from alexcli.errors import PluginError
from alexcli.testing import fake_distribution as install_fake
from conftest import run_cli


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
    with pytest.raises(PluginError, match=r"unknown norm 'bn'; available: .*lrn, lrn-caffe, lrn-convnet, none"):
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


# A third-party package that registers built-in names: what each factory returns is marked, so a
# test can tell whose module was built; importing it at all is a failure (the built-in must win
# without the plugin's code ever running).
EVIL = {"alexcli.layers.norm": {"lrn": "evil_mod:lrn"}, "alexcli.layers.activation": {"relu": "evil_mod:relu"}}
EVIL_SOURCE = ("import os\n"
               "if os.environ.get('EVIL_MOD_MUST_NOT_IMPORT'):\n"
               "    raise RuntimeError('evil_mod was imported')\n"
               "from torch import nn\n"
               "class Evil(nn.Identity):\n    pass\n"
               "def lrn(channels):\n    return Evil()\n"
               "def relu():\n    return Evil()\n")


def shadow_line(kind, name, builtin_version):
    return (f"{kind} {name!r} is registered by both alexcli {builtin_version} (built-in) and evilpkg 1.0; a plugin "
            f"cannot replace a built-in, so alexcli's is used: uninstall evilpkg or rename its entry point")


def test_a_plugin_registering_a_builtin_name_cannot_replace_it(site, monkeypatch):
    from alexcli import __version__
    from alexcli.model import layers
    from alexcli.model.registry import Arch, build_model

    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    install_fake(site, "evilpkg", "1.0", EVIL, {"evil_mod": EVIL_SOURCE})
    monkeypatch.setenv("EVIL_MOD_MUST_NOT_IMPORT", "1")
    # Listed: the built-in is what resolves; the package that also claims the name is reported.
    assert {(p.kind, p.name): p.package for p in reg.discover()}[("norm", "lrn")] == "alexcli"
    assert reg.conflicts() == []  # not an error: nothing that uses lrn or relu breaks
    assert [(b.kind, b.name, b.package, [o.package for o in others]) for b, others in reg.shadowed()] == [
        ("activation", "relu", "alexcli", ["evilpkg"]), ("norm", "lrn", "alexcli", ["evilpkg"])]
    # Used: alexcli's own factory, with a warning (once per name) that says what to do.
    with pytest.warns(reg.PluginShadowWarning) as caught:
        assert reg.info("norm", "lrn").package == "alexcli"
        assert reg.get("norm", "lrn") is layers.lrn_paper
        assert reg.get("activation", "relu") is layers.relu
    assert [str(w.message) for w in caught] == [shadow_line("norm", "lrn", __version__),
                                                 shadow_line("activation", "relu", __version__)]
    model, used = build_model(Arch(num_classes=4, width=0.125, crop=64))
    assert used["norm"] == {"name": "lrn", "package": "alexcli", "version": __version__}
    assert used["activation"]["package"] == "alexcli"
    assert type(model.norm1.cols[0]) is layers.LRN and type(model.act1) is __import__("torch").nn.ReLU
    assert not [m for m in model.modules() if type(m).__name__ == "Evil"]
    assert "evil_mod" not in sys.modules
    # --check imports every usable plugin, never the one that is shadowed.
    assert {p.name: e for p, e in reg.check_all()}["lrn"] is None


def test_a_builtin_name_claimed_by_two_plugins_is_still_the_builtin(site):
    from alexcli.model import layers

    for dist in ("evil-a", "evil-b"):
        install_fake(site, dist, "2.0", {"alexcli.layers.norm": {"lrn": "x:y"}})
    with pytest.warns(reg.PluginShadowWarning, match=r"norm 'lrn' is registered by alexcli .* \(built-in\) and by "
                                                     r"evil-[ab] 2.0 and evil-[ab] 2.0; a plugin cannot replace a "
                                                     r"built-in, so alexcli's is used: uninstall evil-[ab] and "
                                                     r"evil-[ab] or rename their entry points"):
        assert reg.get("norm", "lrn") is layers.lrn_paper
    assert reg.conflicts() == [] and len(reg.shadowed()) == 1


def test_a_conflict_between_two_plugins_is_its_own_error_type(site):
    for dist in ("alexcli-bn-a", "alexcli-bn-b"):
        install_fake(site, dist, "1.0", {"alexcli.layers.norm": {"bn": "x:y"}})
    with pytest.raises(reg.PluginConflictError):
        reg.info("norm", "bn")
    with pytest.raises(PluginError, match="unknown norm 'gn'") as err:
        reg.info("norm", "gn")
    assert not isinstance(err.value, reg.PluginConflictError)


def test_cli_plugins_lists_a_plugin_that_shadows_a_builtin(tmp_path):
    from alexcli import __version__

    site = tmp_path / "site"
    install_fake(site, "evilpkg", "1.0", EVIL, {"evil_mod": EVIL_SOURCE})
    env = {"PYTHONPATH": str(site), "EVIL_MOD_MUST_NOT_IMPORT": "1"}
    listed = run_cli("plugins", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr  # nothing is broken: the built-ins work
    rows = json.loads(listed.stdout)["plugins"]
    lrn = [r for r in rows if r["kind"] == "norm" and r["name"] == "lrn"]
    assert [(r["package"], r["builtin"]) for r in lrn] == [("alexcli", True), ("evilpkg", False)]
    assert lrn[0]["status"] == "not loaded"
    assert lrn[1]["status"] == "warning: " + shadow_line("norm", "lrn", __version__)
    assert json.loads(listed.stdout)["warnings"] == 2
    table = run_cli("plugins", env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert f"norm lrn: warning: {shadow_line('norm', 'lrn', __version__)}" in table.stderr.splitlines()
    assert f"activation relu: warning: {shadow_line('activation', 'relu', __version__)}" in table.stderr.splitlines()
    assert "evilpkg" in table.stdout
    # --check is the installation's health check: a plugin that can never be used fails it, and
    # its module is not imported to find that out.
    checked = run_cli("plugins", "--check", env=env, cwd=tmp_path)
    assert checked.returncode == 1
    assert "evil_mod was imported" not in checked.stdout + checked.stderr
    assert f"norm lrn: warning: {shadow_line('norm', 'lrn', __version__)}" in checked.stderr.splitlines()
    # Loading only alexcli's own packages hides it.
    quiet = run_cli("plugins", "--json", env=dict(env, ALEXCLI_LOAD_PLUGINS=""), cwd=tmp_path)
    assert quiet.returncode == 0 and "evilpkg" not in quiet.stdout


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
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {}\nfactory.inits = ('x',)\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\nfactory.init_fields = {'y': {'crop': 9}}\n",
     "'init_fields' name presets it does not have: y"),
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {}\nfactory.inits = ('x',)\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\nfactory.legacy = {'depth': 1}\n",
     "'init_fields' or 'legacy' name fields Arch does not have: depth"),
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {}\nfactory.inits = ('x',)\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\nfactory.fixed = {'groups': 1}\n",
     "its 'fixed' fields groups differ from its defaults"),
    ("architecture", "def factory(arch, layers):\n    pass\nfactory.defaults = {}\nfactory.inits = ('x',)\n"
                     "factory.stages = ()\nfactory.feature_layer = 'fc'\nfactory.fixed = {'depth': 1}\n",
     "its 'fixed' must map Arch fields to the one value each has"),
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
