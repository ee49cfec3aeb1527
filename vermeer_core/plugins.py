"""Loading plugins, tox-style: the built-ins from an explicit tuple, then third-party entry
points of the ``vermeer`` group, then ``check_pending()``.

Environment switches:

* ``VERMEER_DISABLE_PLUGIN_AUTOLOAD=1`` loads no *third-party* entry point; the built-in
  components are still there (register your own with ``load(extra=[...])``).
* ``VERMEER_DISABLED_PLUGINS=a,b`` blocks the plugins named ``a`` and ``b``, built-in
  (names in :data:`BUILTIN_PLUGINS`) or third-party (entry-point names).

A third-party plugin that fails to import, or whose entry-point name is a built-in's, is
reported (a warning and an entry in :attr:`Plugins.failures` naming the entry point and its
distribution); the others still load, and a spec that asks for a component such a plugin
would have provided says which plugins failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import pluggy

from vermeer_core import __version__, hookspecs
from vermeer_core.registry import Registry

__all__ = [
    "BUILTIN_PLUGINS",
    "GROUP",
    "PluginError",
    "PluginFailure",
    "Plugins",
    "load",
    "get_plugins",
    "get_registry",
]

GROUP = "vermeer"

#: The built-in plugins, registered first and in this order: (plugin name, module). They use
#: only the public plugin API; core never imports them except by name, here.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("attention", "vermeer_plugins.attention"),
    ("shallow-uvit", "vermeer_plugins.shallow_uvit"),
    ("resblock", "vermeer_plugins.resblock"),
    ("schedules", "vermeer_plugins.schedules"),
    ("samplers", "vermeer_plugins.samplers"),
    ("growth", "vermeer_plugins.growth"),
    ("text", "vermeer_plugins.text"),
    ("synthetic", "vermeer_plugins.synthetic"),
    ("text-pretrained", "vermeer_plugins.text_pretrained"),
    ("webdataset", "vermeer_plugins.webdataset"),
    ("alignment", "vermeer_plugins.alignment"),
    ("swd", "vermeer_plugins.swd"),
    ("fd-efficientnet", "vermeer_plugins.fd_efficientnet"),
    ("clip", "vermeer_plugins.clip_score"),
)

_BUILTIN_DIST = ("vermeer", __version__)


class PluginError(RuntimeError):
    """A plugin could not be used; the message names it and what to do."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was not loaded, with its origin and why."""

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
    #: plugin name -> (distribution, version): built-ins and entry points
    origins: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def hook(self) -> Any:
        return self.manager.hook


def _dist_label(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("<unknown>", "")
    return (dist.metadata["Name"], dist.version)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _load_entry_points(plugins: Plugins, disabled: set[str]) -> None:
    """Register every third-party entry point of :data:`GROUP`, recording failures."""
    pm = plugins.manager
    builtin_modules = {module for _, module in BUILTIN_PLUGINS}
    builtin_names = dict(BUILTIN_PLUGINS)
    for ep in sorted(md.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        if ep.module in builtin_modules:
            continue  # our own distribution's (an older install listed the built-ins here)
        if ep.name in disabled:
            continue
        dist, version = _dist_label(ep)
        label = f"{dist} {version}".strip()
        if ep.name in builtin_names or pm.get_plugin(ep.name) is not None:
            owner = (
                f"the built-in plugin {ep.name!r} ({builtin_names[ep.name]})"
                if ep.name in builtin_names
                else f"the plugin {ep.name!r} of distribution {' '.join(plugins.origins.get(ep.name, ('?', ''))).strip()}"
            )
            error = (
                f"its name is already taken by {owner}, so {ep.value} was not loaded; "
                "give the entry point another name"
            )
            _fail(plugins, PluginFailure(ep.name, label, error))
            continue
        try:
            obj = ep.load()
            pm.register(obj, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any import error of a third party's code
            _fail(plugins, PluginFailure(ep.name, label, f"{type(exc).__name__}: {exc}"))
            continue
        plugins.origins[ep.name] = (dist, version)


def _fail(plugins: Plugins, failure: PluginFailure) -> None:
    plugins.failures.append(failure)
    warnings.warn(str(failure), RuntimeWarning, stacklevel=4)


def load(extra: Iterable[object] = (), *, autoload: bool | None = None, builtins: bool = True) -> Plugins:
    """Build a plugin manager and ask every plugin to register its components.

    Order: the built-ins (:data:`BUILTIN_PLUGINS`, unless ``builtins=False``), then third-party
    entry points (unless ``autoload`` is false; by default it follows
    ``VERMEER_DISABLE_PLUGIN_AUTOLOAD``), then the ``extra`` plugin objects (one already
    registered, e.g. a built-in module, is not registered twice), then ``check_pending()``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if autoload is None:
        autoload = not _env_flag("VERMEER_DISABLE_PLUGIN_AUTOLOAD")
    disabled = {s.strip() for s in os.environ.get("VERMEER_DISABLED_PLUGINS", "").split(",") if s.strip()}
    plugins = Plugins(pm, Registry())
    if builtins:
        for name, module in BUILTIN_PLUGINS:
            if name not in disabled:
                pm.register(importlib.import_module(module), name=name)
                plugins.origins[name] = _BUILTIN_DIST
    if autoload:
        _load_entry_points(plugins, disabled)
    for obj in extra:
        if not pm.is_registered(obj):
            pm.register(obj)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook vermeer does not define: {exc}") from None
    plugins.registry.load_failures = [str(f) for f in plugins.failures]
    # Call each implementation ourselves, in registration order (pluggy keeps them so; it
    # would *call* them last-registered first), so that the registry knows which plugin is
    # adding, and a duplicate is blamed on the later plugin, never on a built-in.
    for impl in pm.hook.vermeer_register.get_hookimpls():
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
