"""Every registered plugin of every kind, built-ins and installed packages alike, through its kind's
check (alexcli.testing), as timm runs every model through the same test; and the meta-checks that
every kind has a contract, a check and a section of the plugin guide."""

from pathlib import Path

import pytest

from alexcli import plugins
from alexcli.specs import GROUPS, SPECS
from alexcli.testing import CHECKS, check_registered

REGISTERED = [(kind, name) for kind in GROUPS for name in plugins.names(kind)]


@pytest.mark.parametrize("kind,name", REGISTERED, ids=[f"{k}:{n}" for k, n in REGISTERED])
def test_every_registered_plugin_passes_its_kinds_check(kind, name):
    check_registered(kind, name)


def test_no_installed_package_registers_a_name_another_does():
    """A plugin package installed here must use names of its own: a built-in's name is ignored (the
    built-in is used) and one shared with another package is an error wherever it is used."""
    assert [plugins.shadow_message(b, others) for b, others in plugins.shadowed()] == []
    assert [f"{c[0].kind} {c[0].name!r}: " + " and ".join(p.package for p in c) for c in plugins.conflicts()] == []


def test_the_built_ins_and_the_example_packages_are_all_checked():
    got = set(REGISTERED)
    assert {("architecture", "alexnet"), ("architecture", "cifar-local"), ("activation", "relu"),
            ("activation", "tanh"), ("norm", "lrn"), ("norm", "lrn-convnet"), ("norm", "none"), ("pool", "overlap"),
            ("pool", "2x2"), ("augmentation", "mean"), ("augmentation", "crop"), ("augmentation", "flip"),
            ("augmentation", "pca"), ("norm", "batchnorm"), ("augmentation", "cutout")} <= got


def test_every_kind_has_a_contract_a_check_and_a_section_in_the_guide():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text(encoding="utf-8")
    for kind, group in GROUPS.items():
        assert kind in SPECS and kind in CHECKS, kind
        assert f"`{group}`" in guide, f"docs/plugins.md does not document {group}"
        assert f"check_{kind}" in guide, f"docs/plugins.md does not name alexcli.testing.check_{kind}"
