"""Loading plugins: entry points of the ``vermeer`` group, environment switches, the registry.

``VERMEER_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry point at all (register plugins yourself
with ``load(extra=[...])``); ``VERMEER_DISABLED_PLUGINS=a,b`` skips the entry points named
``a`` and ``b``. A plugin that fails to import is reported with its entry point and
distribution; the others still load.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from vermeer_core import hookspecs
from vermeer_core.registry import Registry

__all__ = ["PluginError", "PluginFailure", "Plugins", "load", "get_plugins", "get_registry"]

GROUP = "vermeer"


class PluginError(RuntimeError):
    """A plugin could not be used; the message names it and what to do."""


@dataclass(frozen=True)
class PluginFailure:
    entry_point: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return (
            f"plugin entry point {self.entry_point!r} (distribution {self.distribution}) "
            f"failed to load: {self.error}; disable it with VERMEER_DISABLED_PLUGINS="
            f"{self.entry_point}"
        )


@dataclass
class Plugins:
    manager: pluggy.PluginManager
    registry: Registry
    failures: list[PluginFailure] = field(default_factory=list)
    #: plugin name -> (distribution, version) for those that came from an entry point
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.manager.hook


def _dist_label(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("<unknown>", "")
    return (dist.metadata["Name"], dist.version)


def load(extra: Iterable[object] = (), *, autoload: bool | None = None) -> Plugins:
    """Build a plugin manager: entry points (unless disabled), then ``extra`` plugin objects,
    then ask every plugin to register its components."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = os.environ.get("VERMEER_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("", "0", "false", "no")
    disabled = {s.strip() for s in os.environ.get("VERMEER_DISABLED_PLUGINS", "").split(",") if s.strip()}
    plugins = Plugins(pm, Registry())
    if autoload:
        for ep in sorted(md.entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in disabled or pm.is_registered(ep.name) or pm.get_plugin(ep.name):
                continue
            dist, version = _dist_label(ep)
            try:
                obj = ep.load()
                pm.register(obj, name=ep.name)
            except Exception as exc:  # noqa: BLE001 - any import error of a third party's code
                failure = PluginFailure(ep.name, f"{dist} {version}".strip(), f"{type(exc).__name__}: {exc}")
                plugins.failures.append(failure)
                warnings.warn(str(failure), RuntimeWarning, stacklevel=2)
                continue
            plugins.origins[ep.name] = (dist, version)
    for obj in extra:
        pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook vermeer does not define: {exc}") from None
    # Call each implementation ourselves (in registration order) so that the registry knows
    # which plugin is adding, for duplicate-name messages.
    for impl in reversed(pm.hook.vermeer_register.get_hookimpls()):
        name = impl.plugin_name
        plugins.registry.set_current_plugin(name)
        try:
            impl.function(registry=plugins.registry)
        except Exception as exc:  # noqa: BLE001 - report any failure with the plugin's origin
            dist = " ".join(plugins.origins.get(name, ("<not from an entry point>", ""))).strip()
            raise PluginError(
                f"plugin {name!r} (distribution {dist}) failed in vermeer_register: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    plugins.registry.set_current_plugin("<direct>")
    return plugins


@lru_cache(maxsize=1)
def get_plugins() -> Plugins:
    """The process-wide plugins (loaded once). Tests that change plugins call ``load`` instead."""
    return load()


def get_registry() -> Registry:
    return get_plugins().registry
