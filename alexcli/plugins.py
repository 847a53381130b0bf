"""The plugin registry: one entry-point group per extension point (the kinds of `alexcli.specs`).

alexcli's own architectures, layer variants and augmentations are registered in its
pyproject.toml through the same groups as any third-party package's, so there is one code path
for both. Names (and the package that provides each) come from package metadata alone, so listing
is fast and a broken plugin cannot break a command that does not use it; a plugin's module is
imported the first time its name is used, and what it names is checked against its kind's
contract (`alexcli.specs.check`) before anything calls it.

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
from dataclasses import dataclass

from alexcli.errors import PluginError
from alexcli.specs import GROUPS, check

BUILTIN_PACKAGE = "alexcli"
ENV_LOAD = "ALEXCLI_LOAD_PLUGINS"


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


@functools.lru_cache(maxsize=None)
def _scan() -> tuple[tuple[PluginInfo, ...], tuple[tuple[PluginInfo, ...], ...]]:
    """All entry points of our groups: (usable, conflicts). A conflict is a tuple of the
    PluginInfos from different packages that claim one kind/name."""
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
    usable, conflicts = [], []
    for (_kind, _name), claims in sorted(by_key.items()):
        infos = tuple(claims.values())
        (usable if len(infos) == 1 else conflicts).append(infos[0] if len(infos) == 1 else infos)
    return tuple(usable), tuple(conflicts)


def reset() -> None:
    """Forget what was discovered and imported (tests install plugins at run time)."""
    _scan.cache_clear()
    _load.cache_clear()


def discover(kind: str | None = None) -> list[PluginInfo]:
    """Every usable registered name, optionally of one kind, without importing any plugin."""
    usable, _ = _scan()
    return [p for p in usable if kind is None or p.kind == kind]


def conflicts() -> list[tuple[PluginInfo, ...]]:
    """Names claimed by more than one package; using one of them is an error."""
    return list(_scan()[1])


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
            raise PluginError(f"{kind} {name!r} is registered by more than one package: {who}; "
                              f"uninstall one of them")
    for p in discover(kind):
        if p.name == name:
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
