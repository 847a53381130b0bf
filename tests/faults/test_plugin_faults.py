"""Plugin faults end to end: a third-party package that registers a built-in's name, two packages
that register one name, and a checkpoint whose plugin package is not installed. Each runs the
real `alexcli train` / `alexcli eval` with the fake packages on PYTHONPATH (dist-info folders made by
`alexcli.testing.fake_distribution`), since that is how a user meets them."""

import json
import sys

import pytest

from alexcli import __version__
from alexcli import plugins as reg
from alexcli.testing import fake_distribution
from conftest import TINY_TRAIN, run_cli

# evilpkg registers alexcli's `lrn` and `relu` with factories whose modules are marked (Evil); it
# must never be imported, which EVIL_MOD_MUST_NOT_IMPORT turns into an error if it is.
EVIL_ENTRIES = {"alexcli.layers.norm": {"lrn": "evil_mod:lrn"}, "alexcli.layers.activation": {"relu": "evil_mod:relu"}}
EVIL_SOURCE = """\
import os
if os.environ.get("EVIL_MOD_MUST_NOT_IMPORT"):
    raise RuntimeError("evil_mod was imported")
from torch import nn

class Evil(nn.Identity):
    pass

def lrn(channels):
    return Evil()

def relu():
    return Evil()
"""

# A real third-party norm (group norm over all maps), to train a checkpoint that needs its package.
GN_ENTRIES = {"alexcli.layers.norm": {"gn": "gn_mod:gn"}}
GN_SOURCE = """\
from torch import nn

def gn(channels):
    return nn.GroupNorm(1, channels)
"""


def shadow_line(kind, name):
    return (f"{kind} {name!r} is registered by both alexcli {__version__} (built-in) and evilpkg 1.0; a plugin "
            f"cannot replace a built-in, so alexcli's is used: uninstall evilpkg or rename its entry point")


def train(data, out, *extra, env=None):
    return run_cli("train", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "1", *extra, env=env)


@pytest.fixture
def evil_site(tmp_path):
    site = tmp_path / "evil-site"
    fake_distribution(site, "evilpkg", "1.0", EVIL_ENTRIES, {"evil_mod": EVIL_SOURCE})
    return site


def test_a_plugin_shadowing_lrn_and_relu_changes_neither_eval_nor_train(train_data, tmp_path, evil_site,
                                                                        monkeypatch):
    from torch import nn

    from alexcli.checkpoint import load_model
    from alexcli.model.layers import LRN

    env = {"PYTHONPATH": str(evil_site), "EVIL_MOD_MUST_NOT_IMPORT": "1"}
    before = train(train_data, tmp_path / "before")  # an existing checkpoint, trained with the built-ins
    assert before.returncode == 0, before.stderr
    ckpt = tmp_path / "before" / "ckpt-e001.safetensors"

    # eval of it, once evilpkg is installed: the built-ins, the same numbers, a warning per name
    plain = run_cli("eval", ckpt, "--data", train_data, "--json")
    shadowed = run_cli("eval", ckpt, "--data", train_data, "--json", env=env)
    assert shadowed.returncode == 0, shadowed.stderr
    assert "not installed" not in shadowed.stderr and "evil_mod was imported" not in shadowed.stderr
    assert shadow_line("norm", "lrn") in shadowed.stderr and shadow_line("activation", "relu") in shadowed.stderr
    assert json.loads(shadowed.stdout)["models"] == json.loads(plain.stdout)["models"]

    # train with it installed: the built-ins are used and recorded as alexcli's
    during = train(train_data, tmp_path / "during", env=env)
    assert during.returncode == 0, during.stderr
    assert shadow_line("norm", "lrn") in during.stderr
    from alexcli.checkpoint import read_meta

    variants = read_meta(tmp_path / "during" / "ckpt-e001.safetensors")["variants"]
    assert variants["norm"] == {"name": "lrn", "package": "alexcli", "version": __version__}
    assert variants["activation"] == {"name": "relu", "package": "alexcli", "version": __version__}

    # and the network rebuilt from either checkpoint here, with evilpkg on sys.path, is alexcli's
    monkeypatch.syspath_prepend(str(evil_site))
    monkeypatch.setenv("EVIL_MOD_MUST_NOT_IMPORT", "1")
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    reg.reset()
    try:
        for path in (ckpt, tmp_path / "during" / "ckpt-e001.safetensors"):
            with pytest.warns(reg.PluginShadowWarning):
                model, _ = load_model(path)
            assert type(model.norm1.cols[0]) is LRN and type(model.norm2.cols[0]) is LRN
            assert type(model.act1) is nn.ReLU and type(model.act7) is nn.ReLU
            assert not [m for m in model.modules() if type(m).__name__ == "Evil"]
            reg.reset()  # warn again for the second checkpoint
        assert "evil_mod" not in sys.modules
    finally:
        reg.reset()


@pytest.fixture
def gn_checkpoint(train_data, tmp_path):
    """A checkpoint trained with norm 'gn' from package alexcli-gn 0.2."""
    site = tmp_path / "gn-site"
    fake_distribution(site, "alexcli-gn", "0.2", GN_ENTRIES, {"gn_mod": GN_SOURCE})
    r = train(train_data, tmp_path / "gn", "--layer", "norm=gn", env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    return tmp_path / "gn" / "ckpt-e001.safetensors", site


def test_a_missing_plugin_package_is_named_when_it_is_truly_absent(gn_checkpoint, train_data, evil_site):
    ckpt, gn_site = gn_checkpoint
    missing = (f"error: {ckpt} was trained with norm 'gn' from package alexcli-gn 0.2, which is not installed: "
               f"pip install alexcli-gn")
    r = run_cli("eval", ckpt, "--data", train_data)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == missing, r.stderr
    # a package shadowing the built-ins the checkpoint also used (relu) does not change that message
    r = run_cli("eval", ckpt, "--data", train_data, env={"PYTHONPATH": str(evil_site), "EVIL_MOD_MUST_NOT_IMPORT": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == missing, r.stderr
    # installed again, it evaluates
    r = run_cli("eval", ckpt, "--data", train_data, env={"PYTHONPATH": str(gn_site)})
    assert r.returncode == 0, r.stderr


def test_a_checkpoint_plugin_claimed_by_two_packages_says_so(gn_checkpoint, train_data, tmp_path):
    ckpt, gn_site = gn_checkpoint
    fake_distribution(gn_site, "alexcli-gn-fork", "9.0", GN_ENTRIES)
    r = run_cli("eval", ckpt, "--data", train_data, env={"PYTHONPATH": str(gn_site)})
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: norm 'gn' is registered by more than one package: ") and "not installed" not in last
    assert "alexcli-gn 0.2" in last and "alexcli-gn-fork 9.0" in last
