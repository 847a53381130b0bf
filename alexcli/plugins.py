"""The plugin registry: one entry-point group per extension point (the kinds of `alexcli.specs`).

alexcli's own architectures, layer variants and augmentations are registered in its
pyproject.toml through the same groups as any third-party package's, so there is one code path
for both. Names (and the package that provides each) come from package metadata alone, so listing
is fast and a broken plugin cannot break a command that does not use it; a plugin's module is
imported the first time its name is used, and what it names is checked against its kind's
contract (`alexcli.specs.check`) before anything calls it.

A name claimed by more than one package:
- alexcli's built-in and third-party packages: the built-in is always the one used, so no installed
  package can change what `--layer norm=lrn` or an existing checkpoint means. The other claims are
  never imported; they are listed by `shadowed()` and `alexcli plugins`, and the first use of the
  name in a process warns (`PluginShadowWarning`) naming the package to uninstall.
- two or more third-party packages: using the name is an error (`PluginConflictError`) naming
  them all; there is no way to tell which one a user meant.

Set ALEXCLI_LOAD_PLUGINS to a comma-separated list of package names to load only those
third-party packages (alexcli's built-ins are always loaded); set it to an empty string to load
none.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata as md
import os
import re
import warnings
from dataclasses import dataclass

from alexcli.errors import PluginError
from alexcli.specs import GROUPS, check

BUILTIN_PACKAGE = "alexcli"
ENV_LOAD = "ALEXCLI_LOAD_PLUGINS"


class PluginConflictError(PluginError):
    """Two or more third-party packages register one name, and it was used."""


class PluginShadowWarning(UserWarning):
    """A third-party package registers the name of a built-in; the built-in is used."""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginInfo:
    """One registered name, known from metadata without importing anything."""

    kind: str
    name: str
    target: str  # "module:attr"
    package: str
    version: str

    @property
    def builtin(self) -> bool:
        return _canon(self.package) == BUILTIN_PACKAGE

    def provenance(self) -> dict:
        """What a checkpoint records of each variant it used, so loading it names the package."""
        return {"name": self.name, "package": self.package, "version": self.version}

    def as_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "target": self.target,
                "package": self.package, "version": self.version, "builtin": self.builtin}


def _allowed_packages() -> set[str] | None:
    raw = os.environ.get(ENV_LOAD)
    if raw is None:
        return None
    return {_canon(p) for p in raw.split(",") if p.strip()}


@dataclass(frozen=True)
class Registry:
    """What the installed packages register, from metadata: the usable names, the names two or more
    third-party packages claim (errors when used), and the built-in names third-party packages
    also claim (the built-in is used)."""

    usable: tuple[PluginInfo, ...]
    conflicts: tuple[tuple[PluginInfo, ...], ...]
    shadowed: tuple[tuple[PluginInfo, tuple[PluginInfo, ...]], ...]


@functools.lru_cache(maxsize=None)
def _scan() -> Registry:
    allowed = _allowed_packages()
    by_key: dict[tuple[str, str], dict[str, PluginInfo]] = {}
    for kind, group in GROUPS.items():
        for ep in md.entry_points(group=group):
            dist = ep.dist
            package = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else "?"
            if allowed is not None and _canon(package) != BUILTIN_PACKAGE and _canon(package) not in allowed:
                continue
            info = PluginInfo(kind, ep.name, ep.value, package, version)
            # The same distribution seen twice on sys.path (an editable install beside a copy)
            # is one claim, not a conflict.
            by_key.setdefault((kind, ep.name), {}).setdefault(_canon(package), info)
    usable, conflicts, shadowed = [], [], []
    for (_kind, _name), claims in sorted(by_key.items()):
        builtin = claims.pop(BUILTIN_PACKAGE, None)
        others = tuple(claims.values())
        if builtin is not None:
            usable.append(builtin)
            if others:
                shadowed.append((builtin, others))
        elif len(others) == 1:
            usable.append(others[0])
        else:
            conflicts.append(others)
    return Registry(tuple(usable), tuple(conflicts), tuple(shadowed))


_warned: set[tuple[str, str]] = set()


def reset() -> None:
    """Forget what was discovered and imported (tests install plugins at run time)."""
    _scan.cache_clear()
    _load.cache_clear()
    _warned.clear()


def discover(kind: str | None = None) -> list[PluginInfo]:
    """Every usable registered name, optionally of one kind, without importing any plugin."""
    return [p for p in _scan().usable if kind is None or p.kind == kind]


def conflicts() -> list[tuple[PluginInfo, ...]]:
    """Names claimed by more than one third-party package (and no built-in); using one is an error."""
    return list(_scan().conflicts)


def shadowed() -> list[tuple[PluginInfo, tuple[PluginInfo, ...]]]:
    """Built-in names that third-party packages also register: (the built-in, which is what the
    name resolves to; the other packages' claims, which are never imported)."""
    return list(_scan().shadowed)


def _packages(infos) -> str:
    return " and ".join(f"{p.package} {p.version}" for p in infos)


def shadow_message(builtin: PluginInfo, others: tuple[PluginInfo, ...]) -> str:
    """One line: which packages register BUILTIN's name, which one is used, what to do."""
    by = (f"both {builtin.package} {builtin.version} (built-in) and {_packages(others)}" if len(others) == 1 else
          f"{builtin.package} {builtin.version} (built-in) and by {_packages(others)}")
    fix = (f"uninstall {others[0].package} or rename its entry point" if len(others) == 1 else
           f"uninstall {' and '.join(p.package for p in others)} or rename their entry points")
    return (f"{builtin.kind} {builtin.name!r} is registered by {by}; a plugin cannot replace a built-in, "
            f"so {builtin.package}'s is used: {fix}")


def _warn_if_shadowed(p: PluginInfo) -> None:
    if (p.kind, p.name) in _warned:
        return
    for builtin, others in _scan().shadowed:
        if builtin == p:
            _warned.add((p.kind, p.name))
            # warn_explicit: one line on stderr ("alexcli:0: PluginShadowWarning: ..."), not a
            # source line of whichever caller asked for the name.
            warnings.warn_explicit(shadow_message(builtin, others), PluginShadowWarning, filename="alexcli",
                                   lineno=0, module=__name__)
            return


def names(kind: str) -> list[str]:
    _check_kind(kind)
    return sorted({p.name for p in discover(kind)} | {c[0].name for c in conflicts() if c[0].kind == kind})


def _check_kind(kind: str) -> None:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(GROUPS)}")


def info(kind: str, name: str) -> PluginInfo:
    """The registration of KIND/NAME, or a PluginError that says what to do."""
    _check_kind(kind)
    for claim in conflicts():
        if claim[0].kind == kind and claim[0].name == name:
            who = " and ".join(f"{p.package} {p.version} ({p.target})" for p in claim)
            raise PluginConflictError(f"{kind} {name!r} is registered by more than one package: {who}; "
                                      f"uninstall one of them")
    for p in discover(kind):
        if p.name == name:
            _warn_if_shadowed(p)
            return p
    available = ", ".join(names(kind)) or "none"
    raise PluginError(f"unknown {kind} {name!r}; available: {available}")


@functools.lru_cache(maxsize=None)
def _load(info: PluginInfo):
    module, _, attr = info.target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as exc:  # a plugin may raise anything at import; report it, don't crash
        raise PluginError(f"{info.kind} {info.name!r} from package {info.package} {info.version} "
                          f"failed to load: {type(exc).__name__}: {exc}") from exc
    problem = check(info.kind, obj)
    if problem is not None:
        raise PluginError(f"{info.kind} {info.name!r} from package {info.package} {info.version} ({info.target}) "
                          f"does not fit the {info.kind} contract: {problem}")
    return obj


def get(kind: str, name: str):
    """Import and return the factory registered as KIND/NAME, checked against its contract."""
    return _load(info(kind, name))


def resolve(kind: str, value):
    """A factory of KIND from a registered name or from the factory itself (a class or function,
    as tests and notebooks pass them): either way checked against the kind's contract."""
    if isinstance(value, str):
        return get(kind, value)
    _check_kind(kind)
    problem = check(kind, value)
    if problem is not None:
        raise PluginError(f"{kind} {getattr(value, '__name__', value)!r} does not fit the {kind} contract: {problem}")
    return value


def check_all() -> list[tuple[PluginInfo, str | None]]:
    """Import every usable plugin; returns (info, error message or None) for each."""
    out = []
    for p in discover():
        try:
            _load(p)
            out.append((p, None))
        except PluginError as exc:
            out.append((p, str(exc)))
    return out
