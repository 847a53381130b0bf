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
