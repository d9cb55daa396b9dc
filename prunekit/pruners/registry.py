"""Pruner plugins, found through the ``prunekit.pruners`` entry-point group.

Names are read from package metadata without importing anything; a plugin's module is
imported on first use. Built-ins are declared in prunekit's own pyproject, exactly as a
third-party plugin declares its pruners. ``PRUNEKIT_PLUGINS=a,b`` restricts third-party
plugins to those pruner or distribution names ("" leaves the built-ins only).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from prunekit.contract.pruner import CONTRACT_VERSION, Pruner
from prunekit.contract.statistics import STATISTICS
from prunekit.errors import PluginError, UnknownNameError, did_you_mean
from prunekit.version import __version__

GROUP = "prunekit.pruners"
BUILTIN_DISTRIBUTION = "prunekit"
ENV_FILTER = "PRUNEKIT_PLUGINS"


@dataclass(frozen=True)
class PluginInfo:
    """One entry point of the group, as declared by a distribution."""

    name: str
    value: str
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


def _info(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        value=ep.value,
        distribution=dist.metadata["Name"] if dist else "?",
        version=dist.version if dist else "?",
    )


def _allowed(info: PluginInfo) -> bool:
    raw = os.environ.get(ENV_FILTER)
    if info.builtin or raw is None:
        return True
    wanted = {part.strip() for part in raw.split(",") if part.strip()}
    return info.name in wanted or info.distribution in wanted


def discover() -> dict[str, list[PluginInfo]]:
    """Map each pruner name to its declarations (more than one means a conflict)."""
    found: dict[str, list[PluginInfo]] = {}
    seen: set[tuple[str, str]] = set()
    for ep in entry_points(group=GROUP):
        info = _info(ep)
        if (info.name, info.distribution) in seen or not _allowed(info):
            continue
        seen.add((info.name, info.distribution))
        found.setdefault(info.name, []).append(info)
    return dict(sorted(found.items()))


def names() -> list[str]:
    return list(discover())


def _single(name: str, plugins: dict[str, list[PluginInfo]]) -> PluginInfo:
    if name not in plugins:
        hidden = [ep for ep in entry_points(group=GROUP) if ep.name == name]
        if hidden:
            raise UnknownNameError(
                f"pruner '{name}' from {_info(hidden[0]).distribution} is hidden by "
                f"{ENV_FILTER}={os.environ.get(ENV_FILTER, '')!r}: add {name} to it or unset it"
            )
        hint = did_you_mean(name, list(plugins))
        raise UnknownNameError(
            f"unknown pruner '{name}': {hint}see `prunekit pruners list` "
            f"(known: {', '.join(plugins) or 'none'})"
        )
    infos = plugins[name]
    if len(infos) > 1:
        owners = " and ".join(f"{i.distribution} ({i.value})" for i in infos)
        raise PluginError(f"pruner '{name}' is registered by both {owners}: uninstall one of them")
    return infos[0]


def _import(info: PluginInfo) -> type[Pruner]:
    try:  # whatever the plugin prints at import goes to stderr, so --json stays clean
        with contextlib.redirect_stdout(sys.stderr):
            obj = EntryPoint(info.name, info.value, GROUP).load()
    except (Exception, SystemExit) as exc:  # a plugin may fail in any way; never crash the CLI
        raise PluginError(
            f"pruner '{info.name}' from {info.distribution} {info.version} failed to import "
            f"({type(exc).__name__}: {exc}); reinstall or fix that distribution"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, Pruner)):
        raise PluginError(
            f"pruner '{info.name}' from {info.distribution} points at {info.value}, which is "
            "not a prunekit.api.Pruner subclass; fix its entry point"
        )
    declared = obj.declared_contract()
    if declared != CONTRACT_VERSION:
        written = (
            f"plugin contract {declared}"
            if declared is not None
            else "no plugin contract (prunekit before contract 1)"
        )
        raise PluginError(
            f"pruner '{info.name}' from {info.distribution} {info.version} is written for "
            f"{written}, and this prunekit {__version__} speaks contract {CONTRACT_VERSION}: "
            f"install a matching version of the plugin, or declare contract = "
            f"{CONTRACT_VERSION} once it follows prunekit.api"
        )
    unknown = sorted(set(obj.needs) - set(STATISTICS))
    if unknown:
        raise PluginError(
            f"pruner '{info.name}' from {info.distribution} needs {', '.join(unknown)}, which "
            f"prunekit does not collect (known: {', '.join(STATISTICS)}); fix the plugin"
        )
    return obj


def load(name: str) -> type[Pruner]:
    """Import and return the pruner class registered as ``name``."""
    return _import(_single(name, discover()))


def create(name: str, params: dict[str, Any] | None = None) -> Pruner:
    """Instantiate pruner ``name`` with validated hyperparameters."""
    return load(name)(**(params or {}))


def describe() -> list[dict[str, Any]]:
    """One row per declared pruner for `prunekit pruners list` (imports each one)."""
    rows = []
    for name, infos in discover().items():
        for info in infos:
            row: dict[str, Any] = {
                "name": name,
                "distribution": info.distribution,
                "version": info.version,
                "summary": "",
                "error": None,
            }
            try:
                row["summary"] = _import(_single(name, {name: infos})).summary()
            except PluginError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows
