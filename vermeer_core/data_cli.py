"""``vermeer data``: a command whose actions come from plugins, through the
:func:`~vermeer_core.hookspecs.vermeer_data_commands` hook (the built-in ``synthetic`` plugin
adds ``synth``, ``webdataset`` adds ``inspect`` and ``from-folder``). Core knows no action."""

from __future__ import annotations

import argparse
from typing import Any

from vermeer_core.plugins import PluginError

__all__ = ["register"]


def register(subparsers: Any, manager: Any) -> None:
    """Add ``data`` to the CLI's ``subparsers`` and let every plugin of the pluggy ``manager``
    add its actions (each sets ``func``). A plugin that fails, reuses a name or adds an action
    without a handler raises :class:`PluginError` naming it."""
    data = subparsers.add_parser("data", help="make and inspect training data (actions from plugins)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    owners: dict[str, str] = {}
    for impl in manager.hook.vermeer_data_commands.get_hookimpls():  # registration order: built-ins first
        name = impl.plugin_name
        before = set(sub.choices)
        try:
            impl.function(subparsers=sub)
        except argparse.ArgumentError as exc:  # "conflicting subparser: <action>"
            taken = ", ".join(f"{a!r} (plugin {p!r})" for a, p in owners.items() if a in str(exc)) or str(exc)
            raise PluginError(
                f"plugin {name!r} adds a `vermeer data` action that already exists: {taken}; "
                f"rename it or disable a plugin with VERMEER_DISABLED_PLUGINS"
            ) from None
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin's code, reported with its name
            raise PluginError(f"plugin {name!r} failed in vermeer_data_commands: {type(exc).__name__}: {exc}") from exc
        for action in set(sub.choices) - before:
            if not callable(sub.choices[action].get_default("func")):
                raise PluginError(
                    f"plugin {name!r} added `vermeer data {action}` without a handler: call "
                    "set_defaults(func=handler) on its parser"
                )
            owners[action] = name
